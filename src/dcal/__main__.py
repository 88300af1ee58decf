"""``python -m dcal`` (and ``torchrun -m dcal train ...``) runs the command line."""

import sys

from dcal.cli import main

sys.exit(main())
