"""The one version string: pyproject.toml reads it (dynamic version), ik_fast.__version__ re-exports it."""

__version__ = "0.1.0"
