"""``hope-scale export --checkpoint PATH --out DIR``: a checkpoint as a folder that ``transformers`` loads."""

from __future__ import annotations

import argparse
import sys

from hope_scale.export.safetensors_out import DEFAULT_MAX_SHARD_BYTES

DESCRIPTION = """\
Write a checkpoint as a folder that Hugging Face transformers loads (docs/export.md):

  hf     config.json, configuration_hope.py, modeling_hope.py, model.safetensors, generation_config.json and the
         tokenizer; any architecture. AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and
         AutoTokenizer.from_pretrained(DIR) load it; generate() carries the recurrent memory state between tokens.
  llama  a plain LlamaForCausalLM folder, no remote code (Transformer++ checkpoints only).

Only the weights are read, one tensor at a time (never the optimizer state). The folder is written under a
temporary name and renamed when complete; nothing but JSON, Python source and safetensors is written.

examples:
  hope-scale export --checkpoint runs/hope-125m/checkpoints --out exports/hope-125m
  hope-scale export --checkpoint runs/hope-125m/checkpoints --out exports/hope-125m-int8 --quantize int8
  hope-scale export --checkpoint runs/transformer-125m/checkpoints --out exports/tf-125m --format llama --dtype bf16

exit codes: 0 written; 2 a usage problem (an option, a non-empty --out without --overwrite, an unreadable checkpoint,
a format that does not fit the model); 1 anything unexpected.
"""


def byte_size(text: str) -> int:
    """'5GB', '200MB', '1024' -> bytes."""
    units = {"GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", required=True,
                        help="trainer checkpoint folder (a run's checkpoint dir: its newest valid checkpoint; or one "
                             "step_N folder; any TP/PP/DP/ZeRO layout) or a consolidated model.pt")
    parser.add_argument("--out", required=True, help="folder to write (must be empty or missing, see --overwrite)")
    parser.add_argument("--format", choices=["hf", "llama"], default="hf",
                        help="hf (default): Hugging Face folder with the Hope modeling code (trust_remote_code=True), "
                             "any architecture; llama: plain LlamaForCausalLM, Transformer++ checkpoints only")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="dtype of the exported floating-point weights (default fp32, the training weights)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8: weight-only int8 of the linear layers (one scale per output row); embedding, "
                             "norms and memory initial states stay in --dtype. --format hf only")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to ship: 'byte' or a tokenizer.json (default: the one the checkpoint was "
                             "trained with)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--max-shard-size", type=byte_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="split the weights into files of at most this size, with an index (default 5GB)")


def run(args: argparse.Namespace) -> int:
    from hope_scale.data.tokenizer import TokenizerError
    from hope_scale.eval.checkpoint_io import CheckpointError

    from .export import ExportError, export

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        export(args.checkpoint, args.out, fmt=args.format, dtype=args.dtype, quantize=args.quantize,
               tokenizer=args.tokenizer, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size, log=log)
    except (ExportError, CheckpointError, TokenizerError) as err:
        print(f"hope-scale export: error: {err}", file=sys.stderr)
        return 2
    return 0
