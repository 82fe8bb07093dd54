"""hope-scale: pretraining Hope (Nested Learning) language models at scale."""

__version__ = "0.1.0"
