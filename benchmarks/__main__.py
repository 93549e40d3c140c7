"""`python -m benchmarks ...`: see `benchmarks/run.py` and docs/benchmarks.md."""

from .run import main

raise SystemExit(main())
