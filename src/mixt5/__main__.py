"""`python -m mixt5` is the `mixt5` console script (so `torchrun -m mixt5 ...` works)."""

import sys

from .cli import main

sys.exit(main())
