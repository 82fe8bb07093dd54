"""Load exported folders with `transformers` as a deployment machine would: hope_scale cannot be imported, nothing
can be unpickled. Run as a script (``python -I tests/export_loader.py JOB.json``) by tests/test_export.py.

JOB.json: {"inputs": a safetensors file with "prompts" [B, T] and "text" [1, N] token ids, "prompt_text": str,
"out": the safetensors file to write, "folders": {name: {"path": DIR, "generate": bool}}}. For each folder it
writes "<name>/logits" (the prompts' fp32 logits), "<name>/nll" (mean next-token loss on "text"), "<name>/generated"
(if asked: greedy ``generate(**tokenizer(prompt_text))`` of 64 new tokens) and "<name>/prompt_ids" (the exported
tokenizer's ids of "prompt_text").
"""

import importlib.abc
import json
import pickle
import sys


class _Refuse(importlib.abc.MetaPathFinder):
    """hope_scale (and this repository's other packages) must not be importable: the export is self-contained."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hope_scale", "data_prep", "tests"):
            raise ImportError(f"{name} imported while loading an exported model")
        return None


def _no_pickle(*args, **kwargs):
    raise RuntimeError("something tried to unpickle while loading an exported model")


class _NoUnpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        _no_pickle()


def main(job_file: str) -> None:
    sys.meta_path.insert(0, _Refuse())
    pickle.load, pickle.loads, pickle.Unpickler = _no_pickle, _no_pickle, _NoUnpickler
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.load = _no_pickle
    torch.set_num_threads(1)
    job = json.loads(open(job_file).read())
    inputs = load_file(job["inputs"])
    out = {}
    for name, spec in job["folders"].items():
        model = AutoModelForCausalLM.from_pretrained(spec["path"], trust_remote_code=True, dtype="auto").eval()
        tok = AutoTokenizer.from_pretrained(spec["path"])
        with torch.no_grad():
            out[f"{name}/logits"] = model(inputs["prompts"]).logits.float()
            out[f"{name}/nll"] = model(inputs["text"], labels=inputs["text"]).loss.float().reshape(1)
            prompt = tok(job["prompt_text"], return_tensors="pt")
            if spec["generate"]:
                out[f"{name}/generated"] = model.generate(**prompt, max_new_tokens=64, do_sample=False)
        out[f"{name}/prompt_ids"] = prompt["input_ids"][0]
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("hope_scale", "data_prep"))
    assert not leaked, leaked
    save_file({k: v.contiguous() for k, v in out.items()}, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
