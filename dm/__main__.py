from dm.cli import main

raise SystemExit(main())
