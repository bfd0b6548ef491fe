#!/usr/bin/env bash
# Creates the two nnsight anchor venvs the benchmarks compare against, as
# /work/shared/BUILD-NOTES.md says (nnsight 0.8.1 and 0.4.11 cannot share a process:
# same package name, transformers 5 vs 4.51), and makes fastinterleave importable in
# each without compiling there: one wheel is built with the main venv and installed
# into both (every venv has the same torch==2.13.0 CPU wheel, so the extension loads).
#
#   bash benchmarks/setup_anchors.sh              # create what is missing, refresh the wheel
#   bash benchmarks/setup_anchors.sh --wheel-only # only rebuild + reinstall fastinterleave
#                                                 # (after a change to python/ or csrc/)
#   bash benchmarks/setup_anchors.sh --force      # recreate both venvs from scratch
#
# Result (repo root, git-ignored): .venv-nnsight04/  .venv-nnsight08/  build/wheel/
# Needs the main venv (.venv, see the README's quick start) for the wheel build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MAIN=.venv/bin/python
WHEEL_ONLY=0
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --wheel-only) WHEEL_ONLY=1 ;;
    --force) FORCE=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

if [ ! -x "$MAIN" ]; then
  echo "the main venv (.venv) is missing: create it first (README quick start)" >&2
  exit 1
fi

# -- 1. one fastinterleave wheel, built once with the main venv's torch ----------------
echo "== building the fastinterleave wheel (build/wheel/)"
rm -rf build/wheel
"$MAIN" -m pip wheel -q --no-build-isolation --no-deps . -w build/wheel
WHEEL=$(ls build/wheel/fastinterleave-*.whl)
echo "   $WHEEL"

# -- 2. nnsight 0.8.1 (current release): resolves cleanly with transformers 5.x ----------
make_nn08() {
  local V=.venv-nnsight08
  echo "== $V: nnsight 0.8.1"
  "$PY" -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0 numpy
  "$V/bin/pip" install -q nnsight==0.8.1 torch==2.13.0
}

# -- 3. nnsight 0.4.11 (the API fastinterleave matches) ----------------------------------
# Its full dependency set pulls torchvision (does not import beside the CPU torch) and
# diffusers: install it without deps, then the deps it needs, torch pinned.
make_nn04() {
  local V=.venv-nnsight04
  echo "== $V: nnsight 0.4.11"
  "$PY" -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0 numpy
  "$V/bin/pip" install -q --no-deps nnsight==0.4.11
  "$V/bin/pip" install -q torch==2.13.0 transformers==4.51.3 protobuf "python-socketio[client]" \
    "pydantic>=2.9" sentencepiece accelerate einops msgspec toml ipython pyyaml pillow pytest
}

has_version() {  # venv, version: true if that venv imports nnsight at that version
  [ -x "$1/bin/python" ] && "$1/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('nnsight') != '$2')" 2>/dev/null
}

if [ "$WHEEL_ONLY" = 0 ]; then
  if [ "$FORCE" = 1 ]; then rm -rf .venv-nnsight08 .venv-nnsight04; fi
  has_version .venv-nnsight08 0.8.1 || { rm -rf .venv-nnsight08; make_nn08; }
  has_version .venv-nnsight04 0.4.11 || { rm -rf .venv-nnsight04; make_nn04; }
fi

# -- 4. fastinterleave into each (no rebuild: same torch wheel) ---------------------------
for V in .venv-nnsight08 .venv-nnsight04; do
  if [ ! -x "$V/bin/python" ]; then
    echo "$V is missing: run without --wheel-only first" >&2
    exit 1
  fi
  "$V/bin/pip" install -q --no-deps --force-reinstall "$WHEEL"
  "$V/bin/python" - <<'EOF'
import importlib.metadata as m
# fastinterleave first: nnsight 0.8.1 mounts `save` onto `object`, after which pybind11
# refuses to define fastinterleave's `save` method ("Cannot overload existing non-function").
import torch, fastinterleave, nnsight, sys
print(f"   {sys.prefix}: torch {torch.__version__}, nnsight {m.version('nnsight')}, "
      f"transformers {m.version('transformers')}, fastinterleave {fastinterleave.__version__}")
EOF
done
echo "== done: python benchmarks/run.py now also runs the nnsight anchors"
