"""``hope-scale generate --checkpoint PATH --prompt TEXT``: sample a continuation, streamed to the terminal.

``--memorize`` turns on test-time learning while reading the prompt: the prompt is read as a stream by
``CMSStreamLearner`` (``--memorize-passes`` times), and every CMS level in ``--memorize-levels`` whose
period of tokens elapses during the reading takes one SGD step (``--memorize-lr``) on the mean next-token
gradient of that period, exactly as in deployment. Levels whose period is longer than what was read are
not changed (the command says how many updates each level made). Then generation starts from a fresh
memory state with the updated CMS weights; the checkpoint on disk is never modified (``--save-memorized``
writes the adapted model to a new checkpoint).
"""

from __future__ import annotations

import argparse
import sys

import torch


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    g = parser.add_argument_group("test-time learning")
    g.add_argument("--memorize", action="store_true", help="update CMS levels while reading the prompt")
    g.add_argument("--memorize-lr", type=float, default=1e-2)
    g.add_argument("--memorize-levels", type=_ints, default=None, help="CMS level indices that may change (default all)")
    g.add_argument("--memorize-passes", type=int, default=1, help="read the prompt this many times")
    g.add_argument("--memorize-segment", type=int, default=None,
                   help="tokens per forward/backward while reading (default: smallest trainable period)")
    g.add_argument("--save-memorized", default=None, help="write the adapted model to this checkpoint")


def memorize(model, prompt_ids: list[int], lr: float, levels: list[int] | None, passes: int,
             segment_len: int | None = None) -> dict:
    """Test-time CMS learning on the prompt; returns the per-level update counts and reading losses."""
    from hope_scale.model.cms import CMSStreamLearner, cms_level_parameters

    if not cms_level_parameters(model):
        raise ValueError(f"--memorize needs a model with CMS levels (hope, hope_attention); this one is "
                         f"{model.cfg.arch}")
    learner = CMSStreamLearner(model, lr=lr, trainable_levels=levels, segment_len=segment_len)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    losses = []
    for _ in range(passes):
        learner.reset_memory()
        losses.append(learner.feed(ids))
    return {"updates": {int(i): n for i, n in learner.updates.items()},
            "periods": {int(i): learner.periods[i] for i in learner.trainable}, "losses": losses,
            "segment_len": learner.segment_len}


def run(args: argparse.Namespace) -> int:
    from .checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
    from .generation import StreamDecoder, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_checkpoint(args.checkpoint, device=args.device)
    except CheckpointError as err:
        print(f"hope-scale generate: error: {err}", file=sys.stderr)
        return 2
    model, tok = loaded.model, loaded.tokenizer
    if args.prompt is not None:
        prompt = args.prompt
    elif args.prompt_file == "-":
        prompt = sys.stdin.read()
    else:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    ids = tok.encode(prompt) or [tok.eos_id]
    if args.memorize:
        try:
            info = memorize(model, ids, args.memorize_lr, args.memorize_levels, args.memorize_passes,
                            args.memorize_segment)
        except ValueError as err:
            print(f"hope-scale generate: error: {err}", file=sys.stderr)
            return 2
        print(f"[memorize] read {len(ids)} prompt tokens x{args.memorize_passes}: losses "
              f"{', '.join(f'{x:.3f}' for x in info['losses'])}; updates per level "
              + ", ".join(f"L{i} (period {info['periods'][i]}): {n}" for i, n in info["updates"].items()),
              file=sys.stderr)
        if args.save_memorized:
            save_checkpoint(args.save_memorized, model, tok, {**loaded.meta, "memorized_from": args.checkpoint,
                                                              "memorize": info})
    decoder = StreamDecoder(tok, ids)
    stream = not args.no_stream
    if stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def on_token(t: int) -> None:
        if args.stop_at_eos and t == tok.eos_id:
            return
        piece = decoder.push(t)
        if stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    new = sample(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                 eos_id=tok.eos_id if args.stop_at_eos else None, seed=args.seed, on_token=on_token)
    if stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(prompt + tok.decode(new) + "\n")
    sys.stdout.flush()
    return 0
