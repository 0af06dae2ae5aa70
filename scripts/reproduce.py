"""Run a reproduction study: ``python scripts/reproduce.py NAME`` (see distsgd/studies/__init__.py
and docs/reproductions.md)."""

from distsgd.studies import main

if __name__ == "__main__":
    main()
