"""The package's version, read by pyproject.toml and the adapter metadata."""

__version__ = "0.1.0"
