"""``python -m tvq`` is the ``tvq`` command."""

import sys

from tvq.cli import main

sys.exit(main())
