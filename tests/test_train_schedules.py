"""Learning-rate schedules: warm-up, cosine, WSD, constant."""

import math

import pytest

from hope_scale.train.schedules import LRSchedule, write_cost_factor


def test_warmup_is_linear_and_reaches_peak():
    s = LRSchedule("cosine", 1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [s(i) for i in range(10)] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)  # cosine starts at the peak right after warm-up


def test_cosine_shape_and_end():
    s = LRSchedule("cosine", 2.0, total_steps=101, warmup_steps=0, min_lr_ratio=0.25)
    assert s(0) == pytest.approx(2.0)
    assert s(50) == pytest.approx(0.5 + 1.5 * 0.5)  # half-way: mean of peak and min
    assert s(100) == pytest.approx(0.5)  # last step: exactly min
    assert s(1000) == pytest.approx(0.5)  # past the end: stays at min
    values = [s(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone
    assert s(25) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_wsd_phases():
    s = LRSchedule("wsd", 1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert s.decay_steps == 20
    assert s(4) == pytest.approx(0.5)
    assert all(s(i) == 1.0 for i in range(10, 90))  # stable phase
    decay = [s(i) for i in range(90, 110)]
    assert decay == pytest.approx([1.0 - (i + 1) / 20 for i in range(20)])  # linear to min
    assert s(109) == pytest.approx(0.0)
    assert s(500) == pytest.approx(0.0)


def test_constant_and_validation():
    s = LRSchedule("constant", 3e-4, total_steps=10, warmup_steps=2)
    assert [s(i) for i in range(4)] == pytest.approx([1.5e-4, 3e-4, 3e-4, 3e-4])
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule("cosine", 1.0, total_steps=5, warmup_steps=-1)
    short = LRSchedule("cosine", 1.0, total_steps=3, warmup_steps=10)  # shorter than its warm-up: only warms up
    assert [short(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="kind"):
        LRSchedule("linear", 1.0, total_steps=5)
    with pytest.raises(ValueError):
        s(-1)


def test_single_step_runs():
    assert LRSchedule("cosine", 1.0, total_steps=1, min_lr_ratio=0.1)(0) == pytest.approx(0.1)
    assert LRSchedule("wsd", 1.0, total_steps=1, min_lr_ratio=0.1)(0) == pytest.approx(0.1)


def test_write_cost_factor_starts_then_ramps():
    """0 before the start step, then (s - start + 1) / ramp up to 1; without a ramp 1 from the start."""
    assert [write_cost_factor(s) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [write_cost_factor(s, 2) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert [write_cost_factor(s, 2, 4) for s in range(8)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [write_cost_factor(s, 0, 2) for s in range(3)] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="ramp_steps"):
        write_cost_factor(0, 0, -1)
