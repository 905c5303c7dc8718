"""surgery: model surgery on Hugging Face checkpoints from declarative YAML plans."""

from surgery.version import __version__

__all__ = ["__version__"]
