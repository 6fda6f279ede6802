"""`python -m kvmem`: the same command line as the `kvmem` console script."""

from kvmem.cli import main

raise SystemExit(main())
