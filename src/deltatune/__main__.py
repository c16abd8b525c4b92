"""`python -m deltatune ...` (also what `torchrun -m deltatune train ...` runs)."""

import sys

from deltatune.cli import main

sys.exit(main())
