"""``python -m tvq.bench`` is ``tvq bench``."""

import sys

from tvq.bench.runner import main

sys.exit(main())
