"""The ``hope-scale`` command line: one subcommand per task, each implemented in its own module.

Every subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand is used, so ``hope-scale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("data_prep.prepare", "Tokenize a corpus into MDS shards of fixed-length samples"),
    "train-tokenizer": ("data_prep.train_tokenizer", "Train a byte-level BPE tokenizer (tokenizer.json) on a corpus"),
    "pretrain": ("hope_scale.train.pretrain", "Pretrain a model from a YAML config with key=value overrides"),
    "eval": ("hope_scale.eval.cli", "Evaluate a checkpoint: perplexity, niah, mqar, continual, lm-eval"),
    "generate": ("hope_scale.eval.generate_cli", "Sample text from a checkpoint (streaming; optional test-time --memorize)"),
    "train-synthetic": ("hope_scale.eval.train_synthetic_cli", "Train a small model on CPU (mqar, passkey, text) for evaluation"),
    "export": ("hope_scale.export.cli", "Export a checkpoint to a Hugging Face transformers folder (hf, llama; bf16, int8)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hope-scale",
        allow_abbrev=False,
        description="Pretrain, evaluate and deploy Hope language models "
        "(self-modifying Titans + Continuum Memory System).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Parsers are configured lazily (see main) unless we are printing help for this command.
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """A mistyped option (``--resum``) is an error, never taken for the option it abbreviates (``--resume``):
    turn argparse's prefix matching off in ``parser`` and every sub-command parser under it."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"hope-scale {name}", description=help_text)
    module.configure_parser(sub_parser)
    _no_abbreviations(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
