"""``python -m TuckerSegmentLib.worker``: the worker process (see ``server``)."""
import sys

from .server import main

sys.exit(main())
