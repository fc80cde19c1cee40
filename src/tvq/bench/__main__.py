"""``python -m tvq.bench`` is ``tvq bench`` (bad options: one line, exit code 2)."""

import sys

from tvq.bench import run_bench
from tvq.bench.args import parser
from tvq.runtime import tune_cpu_allocator
from tvq.usage import run_command

tune_cpu_allocator()
sys.exit(run_command(lambda: run_bench(parser().parse_args(sys.argv[1:]))))
