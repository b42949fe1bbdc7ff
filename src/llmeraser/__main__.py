from llmeraser.cli import main

raise SystemExit(main())
