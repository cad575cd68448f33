"""``python -m kdreg``: the command line (what ``torchrun -m kdreg run ...`` starts)."""

import sys

from kdreg.cli import main

sys.exit(main())
