from bridge.main import main

raise SystemExit(main())
