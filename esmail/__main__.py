from esmail.cli import main

raise SystemExit(main())
