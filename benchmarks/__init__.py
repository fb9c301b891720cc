"""optjob's benchmark suite: ``python -m benchmarks [--quick] [--only NAME]`` (see README.md)."""
