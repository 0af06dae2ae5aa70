"""distsgd: a distributed data-parallel SGD trainer (README.md says how to use it)."""

# The one place the version is written: pyproject.toml reads it from here (setuptools' dynamic
# version), so a source checkout, installed or not, reports the version of the code it holds.
__version__ = "0.1.0"
