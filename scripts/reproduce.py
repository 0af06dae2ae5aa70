"""Run a reproduction study: ``python scripts/reproduce.py NAME`` (see distsgd/studies/__init__.py
and docs/reproductions.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's distsgd, installed or not

from distsgd.studies import main  # noqa: E402

if __name__ == "__main__":
    main()
