from torchslim.cli import main

raise SystemExit(main())
