# Sourced by demo.sh and test.sh: creates .venv when missing and installs distsgd with its dev
# extras; reinstalls when pyproject.toml changed since the last install.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    # Only when torch is missing: users who bring their own (CUDA) build keep it.
    "$py" -m pip install -q -c scripts/constraints.txt torch
fi
stamp=.venv/.distsgd-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    # Pinned to the torch now installed, ours or the user's, and not to scripts/constraints.txt,
    # whose version would replace a user's other build: so pip can neither swap it for another
    # (a CUDA download) nor upgrade it, and a torch too old for pyproject.toml fails here.
    "$py" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' >.venv/torch-pin.txt
    "$py" -m pip install -q -c .venv/torch-pin.txt -e ".[dev]"
    cp pyproject.toml "$stamp"
fi
export PATH="$repo/.venv/bin:$PATH"
