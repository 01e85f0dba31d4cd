"""`python -m quartet ...` is the `quartet` command."""

from quartet.cli import main

raise SystemExit(main())
