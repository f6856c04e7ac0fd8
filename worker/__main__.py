"""`python -m worker` is the `iotflow` command."""

from worker.cli import main

raise SystemExit(main())
