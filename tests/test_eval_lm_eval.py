"""lm-evaluation-harness adapter (hope_scale.eval.lm_eval_adapter): its numbers are the model's own."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json data only: never reach for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hope_scale.data.tokenizer import load_tokenizer  # noqa: E402
from hope_scale.eval.generation import greedy_generate  # noqa: E402
from hope_scale.eval.lm_eval_adapter import HopeScaleLM  # noqa: E402
from hope_scale.model import ModelConfig, build_model  # noqa: E402

TINY = dict(d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8, chunk_size_projection=16)


@pytest.fixture(scope="module")
def hope():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="hope", cms_levels=[{"period": 1, "hidden_mult": 1.0}], **TINY)).eval()


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def own_loglikelihood(model, ctx_ids, cont_ids):
    tokens = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[:, :-1]).float(), -1)[0]
    pos = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    lps = [logp[p, t].item() for p, t in zip(pos, cont_ids)]
    greedy = all(logp[p].argmax().item() == t for p, t in zip(pos, cont_ids))
    return sum(lps), greedy


def test_loglikelihood_equals_the_models_own(hope):
    tok = load_tokenizer("byte")
    lm = HopeScaleLM(model=hope, tokenizer=tok, batch_size=3)
    pairs = [("The cat sat on the", " mat"), ("A", " much longer continuation here."), ("", "empty context"),
             ("Trailing space ", "moves"), ("x" * 40, "y"), ("Some context", " and more")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        if ctx.endswith(" "):
            ctx, cont = ctx.rstrip(), " " + cont
        ctx_ids = tok.encode(ctx) or [tok.eos_id]
        ref_lp, ref_greedy = own_loglikelihood(hope, ctx_ids, tok.encode(cont))
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4)
        assert greedy == ref_greedy
    # a continuation that is the model's own greedy output is greedy
    ctx = tok.encode("Hello")
    cont = greedy_generate(hope, [ctx], 5)[0]
    (lp, greedy), = lm.loglikelihood([req("loglikelihood", "Hello", tok.decode(cont))])
    assert greedy and lp == pytest.approx(own_loglikelihood(hope, ctx, cont)[0], rel=1e-5, abs=1e-4)


def test_memory_is_reset_per_request(hope):
    tok = load_tokenizer("byte")
    lm = HopeScaleLM(model=hope, tokenizer=tok, batch_size=4)
    a = lm.loglikelihood([req("loglikelihood", "alpha beta", " gamma")])
    b = lm.loglikelihood([req("loglikelihood", "something else entirely, longer", " x"),
                          req("loglikelihood", "alpha beta", " gamma")])
    assert a[0][0] == pytest.approx(b[1][0], rel=1e-5, abs=1e-5)


def test_rolling_loglikelihood_streaming_and_fixed(hope):
    tok = load_tokenizer("byte")
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    ids = [tok.eos_id] + tok.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(hope(torch.tensor([ids[:-1]])).float(), -1)[0]
    full = sum(logp[i, t].item() for i, t in enumerate(ids[1:]))
    stream = HopeScaleLM(model=hope, tokenizer=tok, max_length=16)  # hope: streaming by default
    assert stream.rolling == "streaming"
    (ll,) = stream.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert ll == pytest.approx(full, rel=1e-4)  # memory carried across 16-token segments = one pass
    fixed = HopeScaleLM(model=hope, tokenizer=tok, max_length=16, rolling="fixed")
    (ll_fixed,) = fixed.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    windows = 0.0
    for a in range(0, len(ids) - 1, 16):
        seg = ids[a:a + 17]
        with torch.no_grad():
            lp = F.log_softmax(hope(torch.tensor([seg[:-1]])).float(), -1)[0]
        windows += sum(lp[i, t].item() for i, t in enumerate(seg[1:]))
    assert ll_fixed == pytest.approx(windows, rel=1e-4)
    assert ll_fixed != pytest.approx(ll, rel=1e-6)


def test_generate_until_stops_at_the_stop_string(hope):
    tok = load_tokenizer("byte")
    lm = HopeScaleLM(model=hope, tokenizer=tok, batch_size=2)
    prompts = ["Once upon", "Once upon", "A different prompt"]
    free = greedy_generate(hope, [tok.encode(p) for p in prompts], 12)
    texts = [tok.decode(f) for f in free]
    stop = texts[0][3:5]  # a substring the greedy output contains
    out = lm.generate_until([req("generate_until", p, {"until": [stop], "max_gen_toks": 12}) for p in prompts])
    assert out[0] == out[1] == texts[0][:texts[0].index(stop)]
    expected2 = texts[2][:texts[2].index(stop)] if stop in texts[2] else texts[2]
    assert out[2] == expected2


def test_runs_a_local_lm_eval_task(tmp_path, hope):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok = load_tokenizer("byte")
    docs = [{"q": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
            {"q": "Two plus two is", "choices": [" four", " five"], "label": 0},
            {"q": "Fire is", "choices": [" cold", " hot"], "label": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    texts = tmp_path / "text.jsonl"
    passages = ["A short passage of plain text.", "Another one, with two clauses and ten words here."]
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    kw = {"cache_dir": str(tmp_path / "hf_cache")}
    mc = {"task": "tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}, **kw},
          "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
          "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    ppl = {"task": "tiny_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(texts)}, **kw},
           "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
           "metric_list": [{"metric": "word_perplexity"}]}
    lm = HopeScaleLM(model=hope, tokenizer=tok, batch_size=4)
    res = lm_eval.simple_evaluate(model=lm, tasks=[mc, ppl], bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_defaults=False))["results"]
    # accuracy from the model's own log-likelihoods
    hits = 0
    for d in docs:
        lps = [own_loglikelihood(hope, tok.encode(d["q"]), tok.encode(c))[0] for c in d["choices"]]
        hits += int(max(range(len(lps)), key=lambda i: lps[i]) == d["label"])
    assert res["tiny_mc"]["acc,none"] == pytest.approx(hits / len(docs))
    # word perplexity from the model's own streaming log-likelihood
    total_ll, words = 0.0, 0
    for t in passages:
        ids = [tok.eos_id] + tok.encode(t)
        with torch.no_grad():
            lp = F.log_softmax(hope(torch.tensor([ids[:-1]])).float(), -1)[0]
        total_ll += sum(lp[i, x].item() for i, x in enumerate(ids[1:]))
        words += len(t.split())
    assert res["tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
