"""LanguageModel under transformers 5.x: tests/test_language.py and tests/test_lm_*.py (sessions
and scanning, positions of invokes of different lengths, the README's LanguageModel example)
run again in .venv-tf5 (transformers 5, made by scripts/setup.sh beside .venv's transformers
4.51.3), with the same fastinterleave build."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv-tf5" / "bin" / "python"


def test_language_model_tests_pass_under_transformers_5():
    if not PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PYTHON} is missing: CI must run `bash scripts/setup.sh` first")
        pytest.skip("transformers 5 venv not installed")
    version = subprocess.run(
        [str(PYTHON), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip().startswith("5."), version.stdout
    files = ["tests/test_language.py", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_lm_*.py"))]
    assert len(files) > 1, files
    result = subprocess.run(
        [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
