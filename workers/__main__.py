from workers.agent import main

raise SystemExit(main())
