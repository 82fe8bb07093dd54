"""Corpus preparation: raw text (files, JSONL, Parquet, Hub datasets, the built-in corpus) to tokenized MDS shards.

Commands: ``hope-scale prepare-data`` (``data_prep.prepare``) and ``hope-scale train-tokenizer``
(``data_prep.train_tokenizer``). See docs/data.md.
"""
