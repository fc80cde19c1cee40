"""``python -m tvq.bench`` is ``tvq bench`` (bad options: one line, exit code 2)."""

import sys

from tvq.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
