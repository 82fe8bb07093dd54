"""Why does a passkey-trained Hope lose needles beyond its training length? Interventions at evaluation.

    python benchmarks/quality.py --out runs/quality --only c --models Hope --seeds 3 --save-models
    python benchmarks/passkey_probe.py runs/quality/c-passkey-s3-Hope.safetensors

Loads a model that ``quality.py --only c --save-models`` trained (its config and weights, a safetensors file:
loading it runs no code), and scores the passkey test set of section (c) at 1x, 4x and 16x the training length
under each intervention below, by needle depth. Nothing is retrained; each intervention changes one thing in
every (self-modifying) Titans layer while the model reads the prompt (Hope or Titans; Titans has no projection
memories to freeze):

  as trained                      the model as it is
  no retention (alpha = 1)        retention switched off: every write is kept forever
  half the forgetting             every 1 - alpha_t halved
  no step bound (tau = 0)         the chunk step bound off (s_t = 1)
  projection memories frozen      M_k, M_v, M_q, M_eta, M_alpha keep their initial weights (no in-context update)
  main-memory drift bounded       after every chunk, W <- A + min(1, R / ||W - A||) (W - A) for W1 and W2 of the
                                  main memory (A: its initial weights, R: the largest ||W - A|| of that layer and
                                  head on test prompts at the longest training length, the schedule's if there
                                  is one): the weights never leave the range that training contexts produce
  haystack not written (oracle)   eta_t = 0 on every haystack token (the sample says where the needle is), so only
                                  the needle, the question and the answer are written; prompts run one at a time

and prints, per layer, what the main memory does along the longest prompts: its mean eta and alpha, the product
of alpha over the prompt, the step bound's mean scale and overshoot, and ||W1|| and ||W - A|| (W1 and W2 stacked)
after the 1x, 4x and 16x prefixes. docs/hope-design.md §6.6 has a run of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hope_scale.data.tokenizer import load_tokenizer  # noqa: E402
from hope_scale.eval.niah import NIAHGenerator, accuracy_grid, evaluate_samples, get_task  # noqa: E402
from hope_scale.model import ModelConfig, build_model  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans  # noqa: E402
from hope_scale.train.safe_tree import load_tree  # noqa: E402

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
ORACLE = "haystack not written (oracle)"
INTERVENTIONS = ("as trained", "no retention (alpha = 1)", "half the forgetting", "no step bound (tau = 0)",
                 "projection memories frozen", "main-memory drift bounded", ORACLE)


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model and the run record (seed, training length) a ``quality.py --save-models`` file holds."""
    tree = load_tree(path)
    model = build_model(ModelConfig.from_dict(tree["model"]))
    model.load_state_dict(tree["state_dict"])
    return model.eval(), tree["run"]


class Probe:
    """Hooks on every self-modifying Titans layer: the gates, the step bound and the chunk updates of its memories
    can be overridden (one intervention at a time) and the main memory's chunk results recorded."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
        if not self.layers:
            raise SystemExit("passkey_probe: the model has no Titans memory layer (Hope or Titans is needed)")
        self.intervention = "as trained"
        self.radius: list[torch.Tensor] | None = None  # per layer [H, 2]: the drift bound of W1 and W2
        self.records: list[dict] | None = None  # while ``read`` runs: per layer, chunk results and gates
        self.sample = None  # the NIAHSample being read (the oracle needs its haystack's token span)
        self.position = [0] * len(self.layers)  # per layer: tokens whose gates have been computed so far
        for i, layer in enumerate(self.layers):
            layer.eta_alpha = self._gates(i, type(layer).eta_alpha.__get__(layer))
            layer.chunk_step = self._chunk_step(i, layer, type(layer).chunk_step)

    def _chunk_step(self, i, layer, step):
        def chunk_step(state, keys, targets, eta, alpha, beta, erase, rule, queries=None, **kw):
            if self.intervention == "no step bound (tau = 0)":
                rule = dataclasses.replace(rule, step_bound=0.0)
            r = step(state, keys, targets, eta, alpha, beta, erase, rule, queries=queries, **kw)
            if queries is None:  # a projection memory's chunk (only the main memory's chunks read)
                if self.intervention == "projection memories frozen":
                    r = dataclasses.replace(r, w1=state.w1, w2=state.w2, s1=state.s1, s2=state.s2)
                return r
            bounded = self.intervention == "main-memory drift bounded"
            if not bounded and self.records is None:  # nothing to bound or record: the chunk as the model made it
                return r
            drift = torch.stack([(r.w1 - layer.mem_w1).norm(dim=(-2, -1)),
                                 (r.w2 - layer.mem_w2).norm(dim=(-2, -1))], -1)  # [B, H, 2]
            if bounded:  # only weights outside the ball move
                f = (self.radius[i] / drift.clamp_min(1e-12))[..., None, None]  # [B, H, 2, 1, 1]

                def into_ball(w, a, j):
                    return torch.where(f[..., j, :, :] < 1, a + f[..., j, :, :] * (w - a), w)
                r = dataclasses.replace(r, w1=into_ball(r.w1, layer.mem_w1, 0), w2=into_ball(r.w2, layer.mem_w2, 1))
            if self.records is not None:
                self.records[i]["chunks"].append({"drift": drift, "drift_norm": drift.norm(dim=-1),
                                                  "w1": r.w1.norm(dim=(-2, -1)), "scale": r.scale,
                                                  "overshoot": r.overshoot})
            return r
        return chunk_step

    def _gates(self, i, gates):
        def eta_alpha(eta_logit, alpha_logit):
            eta, alpha = gates(eta_logit, alpha_logit)
            if self.intervention == "no retention (alpha = 1)":
                alpha = torch.ones_like(alpha)
            elif self.intervention == "half the forgetting":
                alpha = 1 - 0.5 * (1 - alpha)
            elif self.intervention == ORACLE and self.sample is not None:
                eta = torch.where(self.haystack(self.position[i], eta.shape[-1]), 0.0, eta)
            self.position[i] += eta.shape[-1]
            if self.records is not None:
                self.records[i]["gates"].append((eta.detach(), alpha.detach()))
            return eta, alpha
        return eta_alpha

    def haystack(self, start: int, n: int) -> torch.Tensor:
        """Which of the tokens start .. start + n - 1 of ``self.sample``'s prompt are haystack (not the needle)."""
        s, t = self.sample, torch.arange(start, start + n)
        needle = (t >= s.needle_token_start) & (t < s.needle_token_start + s.needle_tokens)
        return (t >= s.context_token_start) & (t < s.context_token_end) & ~needle

    def score(self, model, tok, samples) -> list[dict]:
        """evaluate_samples under the current intervention; the oracle reads one prompt at a time from position 0."""
        if self.intervention != ORACLE:
            return evaluate_samples(model, tok, samples, batch_size=4)
        rows = []
        for sample in samples:
            self.sample, self.position = sample, [0] * len(self.layers)
            rows += evaluate_samples(model, tok, [sample], batch_size=1)
        self.sample = None
        return rows

    def read(self, model, ids: list[int]) -> list[dict]:
        """Run one prompt; per layer, its main memory's chunk results ("chunks") and the gates of every forward
        call ("gates": (eta, alpha) [1, H, T])."""
        self.records = [{"chunks": [], "gates": []} for _ in self.layers]
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
            return self.records
        finally:
            self.records = None


def drift_radius(model, probe: Probe, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The largest main-memory ||W - A|| per layer and head [H, 2] (W1, W2) over every chunk of ``prompts``."""
    seen = [probe.read(model, ids) for ids in prompts]
    return [torch.stack([c["drift"][0] for rec in seen for c in rec[i]["chunks"]]).amax(0)
            for i in range(len(probe.layers))]


def traces(model, probe: Probe, prompts: list[list[int]], lengths: list[int], chunk: int) -> list[dict]:
    """Per layer, along ``prompts``: mean eta and alpha, prod alpha over a prompt, the step bound's mean scale and
    overshoot, and ||W1|| and ||W - A|| after each of ``lengths`` tokens (means over prompts and heads; a prompt
    shorter than a length gives its last chunk)."""
    seen = [probe.read(model, ids) for ids in prompts]
    out = []
    for i in range(len(probe.layers)):
        chunks = [rec[i]["chunks"] for rec in seen]
        eta = torch.cat([e.flatten() for rec in seen for e, _ in rec[i]["gates"]])
        alpha = [torch.cat([a for _, a in rec[i]["gates"]], dim=-1) for rec in seen]  # per prompt [1, H, T]

        def at(L: int, key: str) -> float:
            return torch.stack([cs[min(L // chunk, len(cs)) - 1][key] for cs in chunks]).mean().item()

        every = [c for cs in chunks for c in cs]
        out.append({"eta": eta.mean().item(), "alpha": torch.cat(alpha, -1).mean().item(),
                    "prod_alpha": torch.stack([a.log().sum(-1).exp().mean() for a in alpha]).mean().item(),
                    "scale": torch.stack([c["scale"] for c in every]).mean().item(),
                    "overshoot": torch.stack([c["overshoot"] for c in every]).mean().item(),
                    "w1": {L: at(L, "w1") for L in lengths},
                    "drift": {L: at(L, "drift_norm") for L in lengths}})
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model file written by quality.py --only c --save-models")
    ap.add_argument("--samples", type=int, default=8, help="samples per (length, depth) cell (section (c): 8)")
    ap.add_argument("--multiples", default="1,4,16", help="evaluation lengths as multiples of the training length")
    ap.add_argument("--only", default=None, help="interventions to run, comma-separated (default: all): "
                                                 + "; ".join(INTERVENTIONS))
    ap.add_argument("--threads", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    chosen = INTERVENTIONS if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in chosen if s not in INTERVENTIONS]
    if unknown:
        raise SystemExit(f"passkey_probe: --only: unknown intervention(s) {unknown}; known: {list(INTERVENTIONS)}")
    torch.set_num_threads(args.threads)
    model, run = load_model(args.model)
    probe = Probe(model)
    tok = load_tokenizer("byte")
    train_len = run["train_length"]
    lengths = [int(m) * train_len for m in args.multiples.split(",")]
    task = get_task("passkey", template="short", num_digits=5)
    generator = NIAHGenerator(task, tok, seed=777, name="passkey")  # section (c)'s test set
    test = generator.grid(lengths, DEPTHS, samples_per_cell=args.samples)
    prompts = {L: [tok.encode(s.prompt) for s in test if s.length == L] for L in lengths}
    longest = max(train_len, *(run["mixed_in"] or [0])[:1])  # the longest training length (a schedule's)
    at_longest = generator.grid([longest], DEPTHS, samples_per_cell=args.samples)
    probe.radius = drift_radius(model, probe, [tok.encode(s.prompt) for s in at_longest])

    print(f"# {args.model}: seed {run['seed']}, trained at {train_len} tokens (longest: {longest}); accuracy % "
          f"(by needle depth {DEPTHS}; {args.samples} samples per cell)\n")
    print("| intervention | " + " | ".join(f"{L} ({L // train_len}x)" for L in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name in tqdm(chosen, desc="interventions", file=sys.stderr):
        probe.intervention = name
        grid = accuracy_grid(probe.score(model, tok, test), lengths, DEPTHS)
        cells = [f"{np.mean(line):.1f} ({' / '.join(f'{a:g}' for a in line)})" for line in grid]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    probe.intervention = "as trained"

    chunk = probe.layers[0].cfg.chunk_size_memory
    print(f"\nMain memory along the {lengths[-1]}-token prompts ({len(prompts[lengths[-1]])} prompts, as trained):\n")
    print("| layer | eta | alpha | prod alpha | step scale | overshoot | "
          + " | ".join(f"||W1|| at {L}" for L in lengths) + " | " + " | ".join(f"||W - A|| at {L}" for L in lengths)
          + " |")
    print("|---|" + "---|" * (5 + 2 * len(lengths)))
    for i, t in enumerate(traces(model, probe, prompts[lengths[-1]], lengths, chunk)):
        print(f"| {i} | {t['eta']:.3f} | {t['alpha']:.5f} | {t['prod_alpha']:.3g} | {t['scale']:.3f} | "
              f"{t['overshoot']:.2f} | " + " | ".join(f"{t['w1'][L]:.2f}" for L in lengths) + " | "
              + " | ".join(f"{t['drift'][L]:.2f}" for L in lengths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
