"""``python -m filter …`` works like ``mailgate …``."""

import sys

from filter.cli import main

sys.exit(main())
