from otabox.cli import main

raise SystemExit(main())
