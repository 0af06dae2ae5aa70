# Sourced by demo.sh and test.sh: creates .venv when missing and installs distsgd with its dev extras.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q -c scripts/constraints.txt torch
fi
if ! "$py" -c "import distsgd, hydra, tensorboard, tqdm, sklearn, pytest" 2>/dev/null; then
    "$py" -m pip install -q -e ".[dev]"
fi
export PATH="$repo/.venv/bin:$PATH"
