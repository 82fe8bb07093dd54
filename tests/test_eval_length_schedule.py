"""hope_scale.eval.trainer's schedule of training lengths (train-synthetic --length-schedule, quality.py (c))."""

import argparse

import pytest

from hope_scale.data.tokenizer import load_tokenizer
from hope_scale.eval.niah import NIAHGenerator, get_task
from hope_scale.eval.trainer import length_schedule, scheduled_niah_batches


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


@pytest.fixture
def gen(tok):
    return NIAHGenerator(get_task("passkey", template="short", num_digits=5), tok, seed=1, name="passkey-train")


def test_length_schedule_parses_and_rejects():
    assert length_schedule("512:4") == (512, 4)
    assert length_schedule("512:4:2") == (512, 4, 2)
    assert length_schedule("none") is None
    for bad in ("512", "512:4:2:1", "512:x", "0:4", "512:4:0"):
        with pytest.raises(argparse.ArgumentTypeError):
            length_schedule(bad)


def test_passkey_batches_follow_the_schedule(tok, gen):
    """Every 4th step is 2 x 512 tokens (as many tokens as 8 x 128), the others 8 x 128; the long batches are
    passkey prompts with their answer labelled, and the schedule does not change the short batches."""
    plain = scheduled_niah_batches(gen, 8, 128, seed=0, pad_id=tok.pad_id)
    mixed = scheduled_niah_batches(gen, 8, 128, seed=0, pad_id=tok.pad_id, schedule=(512, 4, 2))
    shapes = [tuple(mixed(step)[0].shape) for step in range(8)]
    assert shapes == [(8, 128)] * 3 + [(2, 512)] + [(8, 128)] * 3 + [(2, 512)]
    x_long, y_long = mixed(3)
    assert ((y_long != -100).sum(dim=1) > 0).all() and (x_long != tok.pad_id).sum(dim=1).min() > 128
    for step in (0, 5):
        assert all((a == b).all() for a, b in zip(plain(step), mixed(step)))
    assert tuple(scheduled_niah_batches(gen, 8, 128, 0, tok.pad_id, schedule=(512, 4))(3)[0].shape) == (8, 512)


def test_passkey_schedule_can_start_late(tok, gen):
    """With ``start`` the first steps are all short (a short-to-long curriculum), then the schedule runs."""
    late = scheduled_niah_batches(gen, 8, 128, seed=0, pad_id=tok.pad_id, schedule=(512, 4, 2), start=6)
    assert [late(step)[0].shape[1] for step in range(12)] == [128] * 7 + [512] + [128] * 3 + [512]
