"""Data at training time: tokenizers, the prepared-dataset format, and the streaming loader.

Modules (imported explicitly, so importing this package stays light):

* ``tokenizer``: ``load_tokenizer(spec)`` -> byte-level or Hugging Face tokenizer;
* ``manifest``: the layout of a prepared dataset folder;
* ``loader``: ``build_train_loader`` / ``build_val_loader`` over MDS shards, resumable and elastic.
"""
