#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest "$@"
