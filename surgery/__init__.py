"""surgery: model surgery on Hugging Face checkpoints from declarative YAML plans."""

__version__ = "0.1.0"
