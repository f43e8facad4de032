"""``python -m benchmarks [options]``: the same entry as ``python -m sdecor bench [options]``."""

import os
import sys

try:
    import sdecor.bench
except ImportError:  # not installed: use the source tree this folder belongs to
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import sdecor.bench

sys.exit(sdecor.bench.main())
