"""nnsight 0.4.11's own tests (tests/test_tiny.py, tests/test_lm.py) run under fastinterleave.

The test files are not in this repository: ``harness.py`` fetches nnsight's sdist with pip,
rewrites the two files (a short, documented list of line-preserving rewrites) into a
temporary directory, and runs them twice with pytest -- once under nnsight 0.4.11 (the
reference), once under ``import fastinterleave as nnsight`` -- with a tiny local GPT-2 in
place of the hub's. ``tests/test_nnsight_suite.py`` compares the two runs.
"""
