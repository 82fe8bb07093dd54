"""``hope-scale train-synthetic``: train a small model on CPU, in minutes, and save an eval checkpoint.

Tasks:

* ``mqar``: multi-query associative recall (Zoology), a mixture of (sequence length, key-value pairs)
  settings; the loss is on query positions only, as in Zoology;
* ``passkey``: needle-in-a-haystack passkey retrieval at one training length (noise haystack, random
  depths), or on a schedule of lengths (``--length-schedule``, ``--schedule-from``); the loss is on the answer
  tokens;
* ``text``: next-token prediction on a text source (file, folder, .jsonl, builtin[:pydoc|:stdlib]) with
  the last ``--holdout-fraction`` held out (``hope-scale eval perplexity --holdout-fraction`` scores it).

The model is ``--model SPEC``: a named config (``hope-tiny``), a YAML file, or an architecture name, with
``:key=value`` overrides, e.g. ``hope:d_model=64,n_layers=2,n_heads=2,cms_levels=1/2+1024/2``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .trainer import length_schedule


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=["mqar", "passkey", "text"], required=True)
    parser.add_argument("--model", required=True, help="model spec, e.g. hope-tiny or transformer:d_model=64")
    parser.add_argument("--name", default=None, help="label stored in the checkpoint (default: the spec)")
    parser.add_argument("--out", required=True, help="checkpoint file to write (or a folder: <out>/model.pt)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--no-cms-schedule", action="store_true",
                        help="step CMS levels every optimizer step instead of at their periods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    g = parser.add_argument_group("mqar")
    g.add_argument("--vocab-size", type=int, default=256, help="MQAR vocabulary (the model gets at least this)")
    g.add_argument("--train-seq-lens", type=_ints, default=[64, 128])
    g.add_argument("--train-kv-pairs", type=_ints, default=[4, 8, 16])
    g.add_argument("--power-a", type=float, default=0.01)
    g = parser.add_argument_group("passkey")
    g.add_argument("--length", type=int, default=256, help="training length in tokens")
    g.add_argument("--num-digits", type=int, default=5)
    g.add_argument("--template", choices=["short", "ruler"], default="short")
    g.add_argument("--tokenizer", default="byte", help="tokenizer spec (byte or a tokenizer.json)")
    g.add_argument("--length-schedule", type=length_schedule, default=None, metavar="LEN:EVERY[:BATCH]",
                   help="every EVERY-th step trains on BATCH (default --batch-size) sequences of LEN tokens "
                        "instead of --length (none: off, the default). The benchmark's recipe (docs/evaluation.md "
                        "(c)): --length 128 --batch-size 8 --steps 5000 --length-schedule 512:4:2 --schedule-from 2500")
    g.add_argument("--schedule-from", type=int, default=0, metavar="STEP",
                   help="--length-schedule starts at this step (before it, every step is at --length)")
    g = parser.add_argument_group("text")
    g.add_argument("--data", default=None, help="text source for --task text")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--holdout-fraction", type=float, default=0.1)
    g.add_argument("--max-chars", type=int, default=None)


def build(args) -> tuple:
    """(model, tokenizer, batch_fn, meta) for the chosen task."""
    from hope_scale.data.tokenizer import load_tokenizer
    from hope_scale.model import build_model

    from .model_specs import config_from_spec

    tok = load_tokenizer(args.tokenizer)
    meta: dict = {"task": args.task, "name": args.name or args.model, "model_spec": args.model}
    if args.task == "mqar":
        from .mqar import MQARSpec, check_spec, mixed_batch

        specs = [MQARSpec(t, k) for t in args.train_seq_lens for k in args.train_kv_pairs if 4 * k <= t]
        if not specs:
            raise ValueError("no valid (seq_len, kv_pairs) training setting: need 4 * kv_pairs <= seq_len")
        for s in specs:
            check_spec(s.seq_len, s.num_kv_pairs, args.vocab_size)
        cfg = config_from_spec(args.model)
        cfg = config_from_spec(args.model, vocab_size=max(cfg.vocab_size, args.vocab_size))

        def batch_fn(step):
            return mixed_batch(specs, args.batch_size, args.vocab_size, seed=args.seed * 100_003 + step,
                               power_a=args.power_a)

        meta["mqar"] = {"vocab_size": args.vocab_size, "train_settings": [[s.seq_len, s.num_kv_pairs] for s in specs],
                        "power_a": args.power_a}
    elif args.task == "passkey":
        from .niah import NIAHGenerator, get_task
        from .trainer import scheduled_niah_batches

        task = get_task("passkey", template=args.template, num_digits=args.num_digits)
        gen = NIAHGenerator(task, tok, seed=args.seed + 1_000_000, name="passkey-train")
        cfg = config_from_spec(args.model)
        cfg = config_from_spec(args.model, vocab_size=max(cfg.vocab_size, tok.vocab_size))
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        batch_fn = scheduled_niah_batches(gen, args.batch_size, args.length, args.seed, pad, args.length_schedule,
                                          args.schedule_from)
        meta["niah"] = {"task": "passkey", "train_length": args.length, "template": args.template,
                        "num_digits": args.num_digits, "length_schedule": args.length_schedule,
                        "schedule_from": args.schedule_from if args.length_schedule else None}
    else:
        from .corpus import load_domain
        from .trainer import text_batches

        if not args.data:
            raise ValueError("--task text needs --data")
        dom = load_domain(args.data, tok, args.holdout_fraction, args.max_chars)
        cfg = config_from_spec(args.model)
        cfg = config_from_spec(args.model, vocab_size=max(cfg.vocab_size, tok.vocab_size))
        batch_fn = text_batches(dom.train, args.batch_size, args.seq_len, args.seed)
        meta["text"] = {"data": args.data, "seq_len": args.seq_len, "holdout_fraction": args.holdout_fraction,
                        "max_chars": args.max_chars, **dom.describe()}
    torch.manual_seed(args.seed)
    return build_model(cfg), tok, batch_fn, meta


def run(args: argparse.Namespace) -> int:
    from .checkpoint_io import save_checkpoint
    from .trainer import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, batch_fn, meta = build(args)
    except ValueError as err:
        print(f"hope-scale train-synthetic: error: {err}", file=sys.stderr)
        return 2
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                      cms_schedule=not args.no_cms_schedule, log_every=args.log_every, time_budget_s=args.time_budget)
    print(f"train-synthetic {args.task}: {model.cfg.arch} with {model.num_parameters()} parameters", file=sys.stderr)
    res = train(model, batch_fn, cfg, log=lambda m: print(m, file=sys.stderr, flush=True), name=meta["name"])
    meta["train"] = {**cfg.to_dict(), **{k: v for k, v in res.items() if k != "loss_history"},
                     "batch_size": args.batch_size, "seed": args.seed,
                     "loss_curve": res["loss_history"][:: max(1, len(res["loss_history"]) // 100)]}
    path = save_checkpoint(args.out, model, tok, meta)
    print(f"trained {res['steps']} steps ({res['tokens']} tokens, {res['seconds']:.1f}s), final loss "
          f"{res['final_loss']:.4f}; wrote {path}")
    return 0
