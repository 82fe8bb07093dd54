"""Pretraining: config, learning-rate schedules, checkpoints, metrics and FLOPs, and the trainer.

    config.py       TrainConfig: one YAML + key.sub=value overrides, validated before any work
    schedules.py    cosine and WSD learning-rate schedules with warm-up
    checkpoint.py   sharded, atomic, checksummed checkpoints that resume at any parallel layout
    flops.py        training FLOPs per token (incl. Hope's memory updates), peak FLOP/s, MFU
    metrics.py      TensorBoard scalars, metrics.jsonl and the console progress line
    pretrain.py     ``hope-scale pretrain``: the training loop

See docs/training.md.
"""
