"""Evaluation and continual learning for Hope and the baselines.

Modules (imported explicitly, so ``import hope_scale.eval`` stays light):

* ``checkpoint_io``: the one place that loads a model for evaluation (``load_checkpoint``) and writes the
  simple single-process checkpoints of ``train-synthetic`` and the continual-learning benchmark;
* ``corpus``: text domains (files, folders, JSONL, the built-in offline corpus, MDS splits) as token streams;
* ``perplexity``: token/word/byte-level perplexity with fixed, sliding-window or streaming evaluation;
* ``niah``: RULER-style needle-in-a-haystack generators (passkey, number, UUID, multi-key/query/value);
* ``mqar``: Zoology-style multi-query associative recall generator and accuracy;
* ``trainer``: runs the shared training step of ``hope_scale.train.step`` on one process for the small
  models of the benchmarks (synthetic tasks and text), within wall / CPU-time budgets;
* ``continual``: the continual-learning benchmark (train A -> B, and test-time CMS learning on a stream);
* ``lm_eval_adapter``: ``@register_model("hope-scale")`` for lm-evaluation-harness;
* ``generation``: batched greedy decoding with per-sample memory, and streaming text output;
* ``plots`` / ``results``: PNG figures and JSON result files;
* ``cli`` / ``generate_cli`` / ``train_synthetic_cli``: the ``eval``, ``generate`` and ``train-synthetic``
  subcommands.
"""
