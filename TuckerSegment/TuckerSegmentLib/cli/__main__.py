"""``python -m TuckerSegmentLib.cli``."""
import sys

from .commands import main

sys.exit(main())
