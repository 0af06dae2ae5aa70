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
    # Constrained too, so that nothing can swap the torch build for a newer CUDA one.
    "$py" -m pip install -q -c scripts/constraints.txt -e ".[dev]"
    cp pyproject.toml "$stamp"
fi
export PATH="$repo/.venv/bin:$PATH"
