"""``python -m nbxent bench`` / ``python -m nbxent info``."""

import sys

from .cli import main

sys.exit(main())
