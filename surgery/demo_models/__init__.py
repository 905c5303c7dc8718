"""The demo models, built by the project itself from corpora that ship with Python and cached.

Nothing is downloaded: tiny random-weight checkpoints cover architectures and formats; tiny
trained models (a base, and prose and code specialists fine-tuned from it) give real task vectors,
real layer importance and real perplexity changes. Everything is deterministic. Plans name them
`demo:NAME`; `surgery demo` applies the example plans to them.
"""

from surgery.demo_models.cache import TRAINED, cache_root, demo_model, demo_names
from surgery.demo_models.plans import example_plans

__all__ = ["TRAINED", "cache_root", "demo_model", "demo_names", "example_plans"]
