from alldetect.cli import main

raise SystemExit(main())
