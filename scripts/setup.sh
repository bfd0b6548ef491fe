#!/usr/bin/env bash
# Everything a fresh clone needs, idempotent (rerun it after a C++ change: it rebuilds):
#   .venv      requirements.txt + nnsight 0.4.11 (the parity reference: --no-deps plus
#              requirements-parity.txt) + fastinterleave, built once, editable
#   .venv-tf5  torch + transformers 5.x (requirements-tf5.txt); fastinterleave there is
#              .venv's editable install, linked in (same torch 2.13.0, so the same
#              extension: no second C++ build)
# .venv-tf5's downloads run in the background while .venv installs and builds.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '[setup %4ss] %s\n' "$SECONDS" "$*"; }
site_packages() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# pip, quiet; what it prints is shown less this machine's notices about missing local
# index folders (harmless). On failure everything is shown.
pip_q() {
    local out
    if ! out=$("$@" 2>&1); then printf '%s\n' "$out" >&2; return 1; fi
    [ -z "$out" ] || printf '%s\n' "$out" |
        grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" || true
}

setup_tf5() {
    [ -x .venv-tf5/bin/python ] || python3 -m venv .venv-tf5
    pip_q .venv-tf5/bin/pip install -q -r requirements-tf5.txt
}

step ".venv-tf5: create + install requirements-tf5.txt (in the background)"
TF5_LOG=$(mktemp)
trap 'rm -f "$TF5_LOG"' EXIT
setup_tf5 >"$TF5_LOG" 2>&1 &
TF5_PID=$!

step ".venv: create"
[ -x .venv/bin/python ] || python3 -m venv .venv
step ".venv: install requirements.txt + requirements-parity.txt"
pip_q .venv/bin/pip install -q -r requirements.txt -r requirements-parity.txt
step ".venv: install nnsight 0.4.11 (--no-deps)"
pip_q .venv/bin/pip install -q --no-deps nnsight==0.4.11
step ".venv: build fastinterleave (editable)"
pip_q .venv/bin/pip install -q --no-build-isolation -e .

step ".venv-tf5: wait for its install"
if ! wait "$TF5_PID"; then
    cat "$TF5_LOG" >&2
    echo "setup: installing .venv-tf5 failed" >&2
    exit 1
fi
[ ! -s "$TF5_LOG" ] || cat "$TF5_LOG"
step ".venv-tf5: link .venv's fastinterleave"
SP=$(site_packages .venv)
SP5=$(site_packages .venv-tf5)
# Whatever fastinterleave was there before (an earlier link, or a wheel) goes first.
rm -rf "$SP5"/fastinterleave "$SP5"/fastinterleave-*.dist-info "$SP5"/_editable_skbc_fastinterleave.*
# The editable finder (.pth + .py: maps the package to python/ and the extension to
# site-packages/fastinterleave/) and the built extension. Links, not copies: a rebuild
# in .venv is seen in .venv-tf5 at once. No dist-info: pip in .venv-tf5 must not think
# it owns (and may uninstall) these files.
for f in _editable_skbc_fastinterleave.pth _editable_skbc_fastinterleave.py fastinterleave; do
    ln -s "$SP/$f" "$SP5/$f"
done

step "check imports"
.venv/bin/python -c 'import fastinterleave, nnsight, transformers; print(f"  .venv:     fastinterleave {fastinterleave.__version__}, nnsight {nnsight.__version__}, transformers {transformers.__version__}")'
.venv-tf5/bin/python -c 'import fastinterleave, transformers; print(f"  .venv-tf5: fastinterleave {fastinterleave.__version__}, transformers {transformers.__version__}")'
step "done"
