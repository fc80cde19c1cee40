"""Speed and memory benchmarks: ``tvq bench`` (see :mod:`tvq.bench.runner`)."""
