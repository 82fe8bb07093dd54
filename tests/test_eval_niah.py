"""Needle-in-a-haystack generator and scoring (hope_scale.eval.niah)."""

import re

import pytest
import torch
from torch import nn

from hope_scale.data.tokenizer import HFTokenizer, load_tokenizer
from hope_scale.eval.niah import (TASKS, NIAHGenerator, accuracy_grid, evaluate_samples, get_task,
                                  split_sentences, string_match_all)

CORPUS = " ".join(
    f"Sentence number {i} talks about the {w} and the weather in town {i % 7}. It is rather long, is it not? "
    f"Yes! Indeed it has several words in it, {w} included."
    for i, w in enumerate(["river", "castle", "orchard", "meadow", "harbor", "forest", "garden", "canyon"] * 6))


@pytest.fixture(scope="module")
def byte_tok():
    return load_tokenizer("byte")


@pytest.fixture(scope="module")
def bpe_tok():
    """A small BPE tokenizer trained in the test (no download): NIAH must work with any tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS, "The grass is green. The sky is blue. One of the special magic numbers"] * 3,
                            trainer)
    return HFTokenizer(tok, "test-bpe")


def _generator(name, tok, seed=0, **overrides):
    return NIAHGenerator(get_task(name, **overrides), tok, seed=seed, haystack_text=CORPUS, name=name)


def test_generator_is_deterministic_given_seed(byte_tok):
    a = _generator("multikey", byte_tok, seed=3).sample(1200, 0.4, index=2)
    b = _generator("multikey", byte_tok, seed=3).sample(1200, 0.4, index=2)
    c = _generator("multikey", byte_tok, seed=4).sample(1200, 0.4, index=2)
    assert a.to_dict() == b.to_dict()
    assert a.prompt != c.prompt


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_fits_its_length_and_has_each_answer_exactly_once(name, byte_tok):
    gen = _generator(name, byte_tok, seed=1)
    task = TASKS[name]
    for length in (1500, 3000):
        s = gen.sample(length, 0.5, index=0)
        assert s.prompt_tokens + s.answer_tokens <= length
        assert s.prompt_tokens + s.answer_tokens > 0.8 * length  # the haystack fills the budget
        assert len(s.answers) == task.num_queries * task.num_values
        for value in s.answers:
            assert s.prompt.count(value) == 1, value
        # the question names the asked keys, and the needles sit inside the context
        if task.value_type == "numbers":
            assert all(re.fullmatch(r"\d{7}", v) for v in s.answers)
        if task.value_type == "uuids":
            assert all(re.fullmatch(r"[0-9a-f-]{36}", v) for v in s.answers)


@pytest.mark.parametrize("name", ["passkey", "number", "multikey-needle"])
@pytest.mark.parametrize("tok_name", ["byte", "bpe"])
def test_needle_is_where_the_depth_says(name, tok_name, byte_tok, bpe_tok):
    tok = byte_tok if tok_name == "byte" else bpe_tok
    gen = _generator(name, tok, seed=5)
    units = split_sentences(CORPUS)
    max_unit = max(len(tok.encode(u + " ")) for u in units + ["One of the special magic numbers for x is: 1."])
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = gen.sample(1000, depth, index=1)
        # the needle starts at the token the sample says, inside the context span
        enc = tok.encode(s.prompt)
        assert len(enc) == s.prompt_tokens
        assert s.context_token_start <= s.needle_token_start <= s.context_token_end
        assert tok.decode(enc[s.needle_token_start:s.needle_token_start + 4]).strip().split()[0] in ("One", "The")
        hay = s.context_token_end - s.context_token_start - s.needle_tokens
        tolerance = max_unit / hay + 0.02
        assert abs(s.measured_depth - depth) <= tolerance, (depth, s.measured_depth, tolerance)
    # depth 0 puts the needle first, depth 1 last
    first = gen.sample(1000, 0.0, index=0)
    last = gen.sample(1000, 1.0, index=0)
    assert first.needle_token_start - first.context_token_start <= 2
    assert last.context_token_end - (last.needle_token_start + last.needle_tokens) <= 2


def test_noise_haystack_repeats_ruler_sentences_and_short_template(byte_tok):
    gen = NIAHGenerator(get_task("passkey", template="short", num_digits=5), byte_tok, seed=0)
    s = gen.sample(300, 0.5)
    assert "The grass is green. The sky is blue." in s.prompt
    assert re.search(r"The magic number for [a-z]+-[a-z]+ is \d{5}\.", s.prompt)
    assert s.prompt.endswith(" is")
    assert s.prompt_tokens + s.answer_tokens <= 300


def test_text_haystack_needs_text_and_length_must_fit(byte_tok):
    with pytest.raises(ValueError, match="haystack_text"):
        NIAHGenerator(get_task("number"), byte_tok)
    with pytest.raises(ValueError, match="too short"):
        _generator("multiquery", byte_tok).sample(100, 0.5)
    with pytest.raises(ValueError):
        get_task("passkey", template="nope")


def test_string_match_all_on_hand_made_cases():
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert string_match_all(" 7654321.", ["1234567"]) == 0.0
    assert string_match_all("alpha, BETA", ["Alpha", "beta", "gamma", "delta"]) == 0.5


class OracleLM(nn.Module):
    """Emits a fixed token sequence after each known prompt (the right answers, or wrong ones)."""

    def __init__(self, prompts_to_answer: dict[tuple, list[int]], vocab: int):
        super().__init__()
        self.table, self.vocab = prompts_to_answer, vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def init_state(self, b):
        return [[] for _ in range(b)]

    def _logits(self, history):
        for prompt, answer in self.table.items():
            n = len(prompt)
            if tuple(history[:n]) == prompt:
                k = len(history) - n
                tok = answer[k] if k < len(answer) else 256
                return torch.nn.functional.one_hot(torch.tensor(tok), self.vocab).float() * 10
        raise AssertionError("unknown prompt")

    def forward(self, x, state=None):
        state = [h + x[i].tolist() for i, h in enumerate(state)]
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab)
        for i, h in enumerate(state):
            logits[i, -1] = self._logits(h)
        return logits, state

    def step(self, tok, state):
        logits, state = self(tok[:, None], state)
        return logits[:, -1], state


def test_scoring_is_100_for_right_answers_and_0_for_wrong(byte_tok):
    gen = _generator("multivalue", byte_tok, seed=2)
    lengths, depths = [800, 1200], [0.0, 1.0]
    samples = gen.grid(lengths, depths, samples_per_cell=2)

    def oracle(wrong: bool):
        table = {}
        for s in samples:
            answers = [a[::-1] if wrong else a for a in s.answers]  # reversed digits: a wrong value
            table[tuple(byte_tok.encode(s.prompt))] = byte_tok.encode(" " + ", ".join(answers) + ".")
        return OracleLM(table, 258)

    right = evaluate_samples(oracle(False), byte_tok, samples, batch_size=3)
    wrong = evaluate_samples(oracle(True), byte_tok, samples, batch_size=3)
    assert [r["score"] for r in right] == [1.0] * len(samples)
    assert all(r["score"] == 0.0 for r in wrong)
    assert accuracy_grid(right, lengths, depths) == [[100.0, 100.0], [100.0, 100.0]]
    assert accuracy_grid(wrong, lengths, depths) == [[0.0, 0.0], [0.0, 0.0]]
