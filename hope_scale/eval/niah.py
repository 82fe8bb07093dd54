"""Needle-in-a-haystack, generated offline following RULER's synthetic NIAH recipes (Hsieh et al., 2024).

A needle is the sentence ``One of the special magic {numbers} for {key} is: {value}.`` hidden in a haystack;
the question asks for the value(s) of one or more keys. Tasks (RULER name in brackets; the first three are
the S-NIAH-1/2/3 columns of the Titans and Hope papers):

==================  =========  =========  ========  ========================================================
task                haystack   key        value     needles
==================  =========  =========  ========  ========================================================
passkey             noise      word       number    1                                   [niah_single_1]
number              text       word       number    1                                   [niah_single_2]
uuid                text       word       UUID      1                                   [niah_single_3]
multikey            text       word       number    4 keys, 1 asked                     [niah_multikey_1]
multikey-needle     needle     word       number    haystack of distractor needles      [niah_multikey_2]
multikey-uuid       needle     UUID       UUID      haystack of distractor needles      [niah_multikey_3]
multivalue          text       word       number    1 key with 4 values, all asked      [niah_multivalue]
multiquery          text       word       number    4 keys, all 4 asked                 [niah_multiquery]
==================  =========  =========  ========  ========================================================

Haystacks: ``noise`` repeats "The grass is green. The sky is blue. ..." (RULER's ``repeat``); ``text`` is
consecutive sentences of a real corpus (RULER uses Paul Graham essays; here any text source, e.g. the
built-in offline corpus or ``tinyshakespeare.txt``); ``needle`` is made of distractor needles with other
keys and values.

Differences from RULER, on purpose:

* the needle is placed at a requested **depth**: the haystack unit boundary whose token offset is closest
  to ``depth`` x (haystack tokens), measured with the evaluated model's tokenizer (RULER draws random
  depths); with several needles the first asked needle is at ``depth`` and the others at random depths;
* lengths are exact token budgets for any tokenizer: the prompt plus the answer fits in ``length`` tokens
  (RULER counts input + ``tokens_to_generate``); the haystack size is found by bisection;
* every answer value occurs exactly once in the prompt (samples whose random draws collide with the
  haystack are re-drawn);
* a ``short`` template (needle ``The magic number for {key} is {value}.``, question ``The magic number
  for {key} is``) for tiny models trained from scratch, next to RULER's ``ruler`` template.

Scoring is RULER's ``string_match_all``: the fraction of expected values found (case-insensitive
substring) in the greedy continuation.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Sequence

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# Key words are adjective-noun pairs, as RULER builds them from word lists.
ADJECTIVES = ("ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "damp", "eager",
              "fancy", "fierce", "gentle", "giant", "golden", "hollow", "humble", "icy", "jolly", "kind",
              "lively", "lonely", "loud", "lucky", "mighty", "misty", "narrow", "noisy", "odd", "pale",
              "proud", "quick", "quiet", "rapid", "rough", "rusty", "shiny", "silent", "silver", "sleepy",
              "slow", "smooth", "solid", "sour", "steep", "sticky", "sunny", "tall", "tender", "tiny",
              "vast", "velvet", "wicked", "wild", "wise", "witty", "wooden", "young", "zesty", "zealous")
NOUNS = ("anchor", "apple", "badger", "banjo", "barrel", "beacon", "bicycle", "blossom", "bottle", "bridge",
         "candle", "canyon", "castle", "cactus", "comet", "cookie", "crayon", "dagger", "dolphin", "dragon",
         "engine", "falcon", "feather", "forest", "fountain", "garden", "glacier", "guitar", "hammer",
         "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "meadow", "mirror",
         "monkey", "mountain", "needle", "orchard", "otter", "paddle", "parrot", "pebble", "pepper", "piano",
         "pillow", "planet", "pocket", "puzzle", "rabbit", "river", "rocket", "saddle", "shadow", "spider",
         "stone", "tiger", "tunnel", "violin", "walnut", "whistle", "window", "wizard", "zebra")

TYPE_NAMES = {"numbers": ("numbers", "number"), "words": ("words", "word"), "uuids": ("uuids", "uuid")}
HAYSTACKS = ("noise", "text", "needle")
TEMPLATES = ("ruler", "short")


@dataclass(frozen=True)
class NIAHTask:
    """What one NIAH task generates (see the module table for the named tasks)."""

    haystack: str = "noise"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1  # needles with distinct keys in the context
    num_values: int = 1  # values (needles) per key
    num_queries: int = 1  # keys asked about (<= num_keys)
    template: str = "ruler"
    num_digits: int = 7  # digits of number values / keys

    def validate(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack {self.haystack!r} is not one of {HAYSTACKS}")
        for t in (self.key_type, self.value_type):
            if t not in TYPE_NAMES:
                raise ValueError(f"needle type {t!r} is not one of {tuple(TYPE_NAMES)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template {self.template!r} is not one of {TEMPLATES}")
        if not 1 <= self.num_queries <= self.num_keys or self.num_values < 1:
            raise ValueError("need 1 <= num_queries <= num_keys and num_values >= 1")
        if not 1 <= self.num_digits <= 18:
            raise ValueError("num_digits must be in [1, 18]")


TASKS: dict[str, NIAHTask] = {
    "passkey": NIAHTask(),
    "number": NIAHTask(haystack="text"),
    "uuid": NIAHTask(haystack="text", value_type="uuids"),
    "multikey": NIAHTask(haystack="text", num_keys=4),
    "multikey-needle": NIAHTask(haystack="needle"),
    "multikey-uuid": NIAHTask(haystack="needle", key_type="uuids", value_type="uuids"),
    "multivalue": NIAHTask(haystack="text", num_values=4),
    "multiquery": NIAHTask(haystack="text", num_keys=4, num_queries=4),
}


def get_task(name: str, **overrides) -> NIAHTask:
    if name not in TASKS:
        raise ValueError(f"unknown NIAH task {name!r}; choose from {sorted(TASKS)}")
    task = replace(TASKS[name], **{k: v for k, v in overrides.items() if v is not None})
    task.validate()
    return task


def split_sentences(text: str, max_words: int = 16) -> list[str]:
    """Sentences of a text (split after . ! ? followed by whitespace), whitespace collapsed; sentences longer
    than ``max_words`` words are cut into pieces of at most that many words, so needles can be placed finely."""
    text = re.sub(r"\s+", " ", text).strip()
    units = []
    for sent in re.split(r"(?<=[.!?])\s+", text):
        words = sent.split(" ")
        for a in range(0, len(words), max_words):
            piece = " ".join(words[a:a + max_words]).strip()
            if piece:
                units.append(piece)
    return units


@dataclass
class NIAHSample:
    task: str
    index: int
    length: int  # requested token budget
    depth: float  # requested depth of the first asked needle, in [0, 1]
    prompt: str
    answers: list[str]
    prompt_tokens: int
    answer_tokens: int
    needle_char_start: int  # where the first asked needle starts in ``prompt``
    needle_token_start: int  # index of the token holding the needle's first character in the encoded prompt
    context_token_start: int  # token span of the haystack (needles included)
    context_token_end: int
    needle_tokens: int  # tokens taken by all needles
    haystack_units: int
    measured_depth: float  # haystack tokens before the needle / all haystack tokens (needles excluded)

    def to_dict(self) -> dict:
        return asdict(self)


class NIAHGenerator:
    """Deterministic sample generator: the same (seed, task, length, depth, index) gives the same sample."""

    def __init__(self, task: NIAHTask, tokenizer, seed: int = 0, haystack_text: str | None = None,
                 name: str = "custom"):
        task.validate()
        self.task, self.tokenizer, self.seed, self.name = task, tokenizer, seed, name
        self.sentences: list[str] = []
        if task.haystack == "text":
            if not haystack_text:
                raise ValueError("a 'text' haystack needs haystack_text (a real corpus)")
            self.sentences = split_sentences(haystack_text)
            if len(self.sentences) < 2:
                raise ValueError("haystack_text has fewer than 2 sentences")
        self.words = sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})

    # -- random needles -------------------------------------------------------------------------------
    def _random(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            d = self.task.num_digits
            return str(rng.randint(10 ** (d - 1), 10 ** d - 1))
        if kind == "words":
            return rng.choice(self.words)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def _needle(self, key: str, value: str) -> str:
        plural, singular = TYPE_NAMES[self.task.value_type]
        if self.task.template == "short":
            return f"The magic {singular} for {key} is {value}."
        return f"One of the special magic {plural} for {key} is: {value}."

    def _frame(self, query_keys: list[str]) -> tuple[str, str]:
        """(text before the context, question after it) for the asked keys."""
        plural, singular = TYPE_NAMES[self.task.value_type]
        query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
        if self.task.template == "short":
            return "", f"\nThe magic {singular} for {query} is"
        single = self.task.num_queries * self.task.num_values == 1
        tv = singular if single else plural
        head = (f"{'A' if single else 'Some'} special magic {tv} {'is' if single else 'are'} hidden within the "
                f"following text. Make sure to memorize {'it' if single else 'them'}. I will quiz you about the "
                f"{tv} afterwards.\n")
        q = (f"\nWhat {'is the' if single else 'are all the'} special magic {tv} for {query} mentioned in the "
             f"provided text? The special magic {tv} for {query} mentioned in the provided text "
             f"{'is' if single else 'are'}")
        return head, q

    # -- haystack units --------------------------------------------------------------------------------
    def _unit_source(self, rng: random.Random, forbidden: Sequence[str]):
        """A function n -> the first n haystack units; the units of a smaller n are a prefix of a larger's."""
        if self.task.haystack == "noise":
            return lambda n: [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]
        if self.task.haystack == "text":
            start = rng.randrange(len(self.sentences))
            return lambda n: [self.sentences[(start + i) % len(self.sentences)] for i in range(n)]
        cache: list[str] = []
        needle_rng = random.Random(rng.random())

        def distractors(n: int) -> list[str]:  # needles with fresh keys and values
            while len(cache) < n:
                u = self._needle(self._random(needle_rng, self.task.key_type),
                                 self._random(needle_rng, self.task.value_type))
                if not any(f in u for f in forbidden):
                    cache.append(u)
            return cache[:n]

        return distractors

    def _separator(self) -> str:
        return "\n" if self.task.haystack == "needle" else " "

    def _assemble(self, units: list[str], needles: list[tuple[float, str]], head: str, question: str):
        """Insert needles (depth, text) between units at the boundary closest in tokens to each depth."""
        sep = self._separator()
        tok = self.tokenizer
        unit_tokens = [len(tok.encode_array(u + sep)) for u in units]
        total = sum(unit_tokens)
        cum = [0]
        for t in unit_tokens:
            cum.append(cum[-1] + t)
        slots: dict[int, list[str]] = {}
        for depth, text in needles:
            target = depth * total
            j = min(range(len(cum)), key=lambda i: (abs(cum[i] - target), i))
            slots.setdefault(j, []).append(text)
        pieces: list[str] = []
        for j in range(len(units) + 1):
            pieces.extend(slots.get(j, []))
            if j < len(units):
                pieces.append(units[j])
        context = sep.join(pieces)
        return head + context + question, head, context

    # -- samples ---------------------------------------------------------------------------------------
    def sample(self, length: int, depth: float, index: int = 0) -> NIAHSample:
        """One sample whose prompt + answer fit in ``length`` tokens, first asked needle at ``depth``."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        for attempt in range(100):
            rng = random.Random(f"niah/{self.name}/{self.seed}/{length}/{depth:.6f}/{index}/{attempt}")
            s = self._try_sample(rng, length, depth, index)
            if s is not None:
                return s
        raise RuntimeError(f"could not generate a NIAH sample of length {length} with unique answers")

    def _try_sample(self, rng: random.Random, length: int, depth: float, index: int) -> NIAHSample | None:
        t = self.task
        keys: list[str] = []
        while len(keys) < t.num_keys:
            k = self._random(rng, t.key_type)
            if k not in keys:
                keys.append(k)
        values = [[self._random(rng, t.value_type) for _ in range(t.num_values)] for _ in keys]
        flat_values = [v for vs in values for v in vs]
        if len(set(flat_values)) != len(flat_values):
            return None
        asked = sorted(rng.sample(range(t.num_keys), t.num_queries))
        answers = [v for i in asked for v in values[i]]
        first = (asked[0], 0)
        needles = []
        for i, k in enumerate(keys):
            for j, v in enumerate(values[i]):
                d = depth if (i, j) == first else rng.random()
                needles.append((d, self._needle(k, v), (i, j) == first))
        # RULER shuffles needle order; depth order decides placement here, the asked needle first at ties
        needles.sort(key=lambda x: (x[0], not x[2]))
        head, question = self._frame([keys[i] for i in asked])
        answer_text = " " + ", ".join(answers) + "."
        answer_tokens = len(self.tokenizer.encode_array(answer_text))
        forbidden = keys + flat_values

        units_of = self._unit_source(rng, forbidden)

        def build(n: int):
            units = units_of(n)
            return units, self._assemble(units, [(d, txt) for d, txt, _ in needles], head, question)

        def n_tokens(n: int) -> int:
            return len(self.tokenizer.encode_array(build(n)[1][0])) + answer_tokens

        if n_tokens(0) > length:
            raise ValueError(f"length {length} is too short for the question and needles alone "
                             f"({n_tokens(0)} tokens)")
        lo, hi = 0, 1
        while n_tokens(hi) <= length:
            lo, hi = hi, hi * 2
            if hi > 10_000_000:
                raise RuntimeError("haystack search did not converge")
        while hi - lo > 1:  # largest n with n_tokens(n) <= length
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if n_tokens(mid) <= length else (lo, mid)
        units, (prompt, head_text, context) = build(lo)
        text_of_haystack = " ".join(units)
        if any(f in text_of_haystack for f in forbidden):
            return None
        if any(prompt.count(v) != 1 for v in flat_values):
            return None
        first_needle = self._needle(keys[first[0]], values[first[0]][0])
        char_start = prompt.index(first_needle)
        enc = self.tokenizer.encode_array
        prompt_ids = self.tokenizer.encode(prompt)
        needle_tok = self._token_at(prompt_ids, char_start)
        ctx_start = self._token_at(prompt_ids, len(head_text))
        ctx_end = self._token_at(prompt_ids, len(head_text) + len(context) - 1) + 1
        needle_tokens = sum(len(enc(txt)) for _, txt, _ in needles)
        before_needles = sum(len(enc(txt + self._separator())) for d, txt, _ in needles
                             if prompt.index(txt) < char_start)
        hay_tokens = max(1, ctx_end - ctx_start - needle_tokens)
        measured = (needle_tok - ctx_start - before_needles) / hay_tokens
        return NIAHSample(
            task=self.name, index=index, length=length, depth=depth, prompt=prompt, answers=answers,
            prompt_tokens=len(prompt_ids), answer_tokens=answer_tokens, needle_char_start=char_start,
            needle_token_start=needle_tok, context_token_start=ctx_start, context_token_end=ctx_end,
            needle_tokens=needle_tokens, haystack_units=lo, measured_depth=min(1.0, max(0.0, measured)),
        )

    def _token_at(self, ids: list[int], char_pos: int) -> int:
        """Index of the token holding character ``char_pos`` of the decoded ``ids`` (tokenizer-agnostic:
        the smallest i with len(decode(ids[:i + 1])) > char_pos, found by bisection)."""
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid + 1])) > char_pos:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def grid(self, lengths: Sequence[int], depths: Sequence[float], samples_per_cell: int) -> list[NIAHSample]:
        return [self.sample(L, d, i) for L in lengths for d in depths for i in range(samples_per_cell)]


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's metric: fraction of the answers that occur in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / max(len(answers), 1)


def evaluate_samples(model, tokenizer, samples: Sequence[NIAHSample], batch_size: int = 8,
                     extra_tokens: int = 4) -> list[dict]:
    """Greedy-decode every sample (batched by prompt length, one memory per sample) and score it."""
    from .generation import greedy_generate

    prompts = [tokenizer.encode(s.prompt) for s in samples]
    max_new = max((s.answer_tokens for s in samples), default=1) + extra_tokens
    outs = greedy_generate(model, prompts, max_new, batch_size=batch_size, eos_id=tokenizer.eos_id)
    rows = []
    for s, out in zip(samples, outs):
        pred = tokenizer.decode(out)
        rows.append({"length": s.length, "depth": s.depth, "index": s.index, "prompt_tokens": s.prompt_tokens,
                     "answers": s.answers, "prediction": pred, "score": string_match_all(pred, s.answers)})
    return rows


def accuracy_grid(rows: Sequence[dict], lengths: Sequence[int], depths: Sequence[float]) -> list[list[float]]:
    """Mean score (in %) per (length, depth) cell."""
    grid = []
    for L in lengths:
        line = []
        for d in depths:
            cell = [r["score"] for r in rows if r["length"] == L and abs(r["depth"] - d) < 1e-9]
            line.append(100.0 * sum(cell) / len(cell) if cell else float("nan"))
        grid.append(line)
    return grid
