"""Export a checkpoint to a Hugging Face folder (``hf``: remote-code Hope model) or a plain Llama folder (``llama``).

The folder is written under a temporary name next to ``out`` and renamed into place when complete: an export that
fails or is killed leaves ``out`` as it was (a killed one leaves a hidden ``.<out>.export-*`` folder, removed by
the next export to ``out``). Weights are read, converted and written one tensor at a time (``weights.py``,
``safetensors_out.py``): no optimizer state is read and no second copy of the model is held.

Every exported file is JSON, Python source or safetensors: loading the folder unpickles nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from hope_scale.data.tokenizer import Tokenizer, load_tokenizer

from .modeling_source import configuration_source, modeling_source
from .safetensors_out import DEFAULT_MAX_SHARD_BYTES, TensorGroup, TensorSpec, write_safetensors
from .weights import WeightSource, meta_model, open_weights

FORMATS = ("hf", "llama")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("int8",)
TMP_INFIX = ".export-"


class ExportError(ValueError):
    """The export cannot be done as asked (format, target folder, tokenizer): the message says what to change."""


def exported_model_config(cfg) -> dict:
    """The model config an exported folder carries: execution fields (``model.compile``) at their defaults, since
    the exported model runs eager PyTorch (modeling_hope.py leaves out ``build_model``, which compiles), and so are
    training-only fields (``model.write_cost``), at the defaults of the model's architecture."""
    from hope_scale.model.config import NON_MODEL_FIELDS, ModelConfig

    defaults = ModelConfig(arch=cfg.arch)
    return {**cfg.to_dict(), **{k: getattr(defaults, k) for k in NON_MODEL_FIELDS}}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight[n] ≈ scale[n] * q[n]``, |q| <= 127, scale = max |weight[n]| / 127."""
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def _cast_group(source: WeightSource, name: str, out_name: str, dtype: torch.dtype,
                convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> TensorGroup:
    spec = TensorSpec(out_name, source.shapes[name], dtype)
    return TensorGroup([spec], lambda: {out_name: convert(source.tensor(name)).to(dtype)})


def _int8_group(source: WeightSource, name: str, out_name: str) -> TensorGroup:
    base = out_name.removesuffix(".weight")
    specs = [TensorSpec(out_name, source.shapes[name], torch.int8),
             TensorSpec(f"{base}.scale", source.shapes[name][:1], torch.float32)]
    return TensorGroup(specs, lambda: dict(zip((s.name for s in specs), quantize_int8(source.tensor(name)))))


def hf_groups(source: WeightSource, dtype: torch.dtype, int8: bool) -> list[TensorGroup]:
    """The tensors of ``HopeForCausalLM``: hope-scale's names under ``model.``; with ``int8`` the linear layers
    of ``Int8Linear`` (``int8_linear_names``) as int8 weights and fp32 scales."""
    from .hf_model import int8_linear_names

    quantized = {f"{m}.weight" for m in int8_linear_names(meta_model(source.config))} if int8 else set()
    return [_int8_group(source, n, f"model.{n}") if n in quantized else _cast_group(source, n, f"model.{n}", dtype)
            for n in source.names]


def llama_groups(source: WeightSource, dtype: torch.dtype) -> list[TensorGroup]:
    from .llama import llama_name, llama_weight

    cfg = source.config
    return [_cast_group(source, n, llama_name(n), dtype, lambda t, n=n: llama_weight(n, t, cfg)) for n in source.names]


def _write_folder(folder: Path, source: WeightSource, tok: Tokenizer, fmt: str, dtype: torch.dtype,
                  quantize: str | None, max_shard_bytes: int, provenance: dict) -> list[str]:
    """All files of the export into ``folder``; returns the weight files."""
    from transformers import GenerationConfig

    from .tokenizer_out import write_tokenizer

    cfg = source.config
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if fmt == "llama":
        from .llama import llama_config

        llama_config(cfg, tok.eos_id, pad_id, dtype, hope_export=provenance).to_json_file(folder / "config.json")
        groups = llama_groups(source, dtype)
    else:
        from .hf_config import HopeConfig
        from .hf_model import INT8_WEIGHT_ONLY

        (folder / "configuration_hope.py").write_text(configuration_source(), encoding="utf-8")
        (folder / "modeling_hope.py").write_text(modeling_source(), encoding="utf-8")
        config = HopeConfig(hope_model=exported_model_config(cfg),
                            hope_quantization=INT8_WEIGHT_ONLY if quantize else None,
                            architectures=["HopeForCausalLM"], dtype=dtype, eos_token_id=tok.eos_id,
                            pad_token_id=pad_id, hope_export=provenance,
                            auto_map={"AutoConfig": "configuration_hope.HopeConfig",
                                      "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM"})
        config.to_json_file(folder / "config.json")
        groups = hf_groups(source, dtype, int8=quantize == "int8")
    GenerationConfig(eos_token_id=tok.eos_id, pad_token_id=pad_id).to_json_file(folder / "generation_config.json")
    write_tokenizer(tok, folder)
    return write_safetensors(folder, groups, max_shard_bytes)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(out: Path, overwrite: bool) -> None:
    """``out`` may be written: missing, an empty folder, or (``overwrite``) a folder to replace."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty; pass --overwrite to replace it")


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", dtype: str = "fp32",
           quantize: str | None = None, tokenizer: str | None = None, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log: Callable[[str], None] = print) -> Path:
    """Export ``checkpoint`` to the folder ``out`` (see the module docstring); returns ``out``.

    Raises ExportError for a request that cannot be done (the CLI's usage errors) and
    ``hope_scale.eval.checkpoint_io.CheckpointError`` for a checkpoint that cannot be read.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {FORMATS}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {tuple(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize {quantize!r} is not one of {QUANTIZATIONS}")
    if quantize and fmt == "llama":
        raise ExportError("--quantize int8 needs --format hf (its int8 layers are part of the Hope modeling code; "
                          "a plain Llama folder has no int8 layer that transformers loads without remote code)")
    out = Path(out).expanduser().absolute()
    check_target(out, overwrite)
    source = open_weights(checkpoint, log)
    cfg = source.config
    if fmt == "llama" and cfg.arch != "transformer":
        raise ExportError(f"--format llama needs a Transformer++ checkpoint (arch transformer); {source.path} is "
                          f"{cfg.arch!r}: use --format hf")
    tok = load_tokenizer(tokenizer) if tokenizer else source.tokenizer()
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    provenance = {"checkpoint": source.path, **{k: v for k, v in source.meta.items() if k in ("step", "tokens")},
                  "format": fmt, "dtype": dtype, "quantize": quantize}

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}{TMP_INFIX}*"):  # exports killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}", dir=out.parent))
    try:
        files = _write_folder(tmp, source, tok, fmt, DTYPES[dtype], quantize, max_shard_bytes, provenance)
        _fsync_tree(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is an ordinary folder
        if out.exists():  # an empty folder, or the one --overwrite replaces: moved aside, then removed
            old = out.parent / f".{out.name}{TMP_INFIX}old"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum((out / f).stat().st_size for f in files)
    log(f"export: wrote {out} ({fmt}, {dtype}{', int8 linear layers' if quantize else ''}; weights "
        f"{size / 2**20:.1f} MiB in {len([f for f in files if f.endswith('.safetensors')])} file(s))")
    return out

