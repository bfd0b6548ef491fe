"""Proof that the engine does the work: with the Python fallback switched off,
the core tests still pass (only tests that run user Python code inside the
trace — nnsight.apply of a Python function, module calls, Python containers —
are left out, by their `python_fallback` marker)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_core_tests_pass_with_the_python_fallback_off():
    env = dict(os.environ, FASTINTERLEAVE_NO_FALLBACK="1")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not python_fallback",
        str(TESTS / "test_values.py"), str(TESTS / "test_gpt2.py"), str(TESTS / "test_schedule.py"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 80, summary
