"""Benchmarks: each figure is printed next to a reference computed in the same run, as a
ratio. Run one with ``python -m bench.<name>``; none runs in the test suite."""
