"""python -m qmpjobd: the daemon."""

import sys

from .cli import main

sys.exit(main())
