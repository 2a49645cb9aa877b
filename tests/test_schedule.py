"""Learning-rate schedules: warmup, cosine, warmup-stable-decay, constant."""

from __future__ import annotations

import math

import pytest

from braid.config import TrainConfig
from braid.trainer.schedule import lr_at

LR = 1e-3
FLOOR = 0.1 * LR


def cfg(**kw) -> TrainConfig:
    fields = dict(steps=100, warmup_steps=10, lr=LR, min_lr_ratio=0.1, schedule="cosine", decay_fraction=0.2)
    fields.update(kw)
    return TrainConfig(**fields)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup(schedule):
    c = cfg(schedule=schedule)
    for s in range(10):
        assert lr_at(s, c) == pytest.approx((s + 1) / 10 * LR, rel=1e-12)
    assert all(lr_at(s, c) < lr_at(s + 1, c) for s in range(9))


def test_cosine_peak_right_after_warmup():
    assert lr_at(10, cfg()) == pytest.approx(LR, rel=1e-12)


def test_cosine_reaches_floor_at_end():
    c = cfg()
    assert lr_at(100, c) == pytest.approx(FLOOR, rel=1e-9)
    assert lr_at(150, c) == pytest.approx(FLOOR, rel=1e-9)  # stays there past the end
    # The last trained step (99) is one step short of the floor, i.e. within one step's decrement.
    assert FLOOR < lr_at(99, c) < FLOOR + (LR - FLOOR) * (1 - math.cos(math.pi / 90)) / 2 + 1e-12


def test_cosine_midpoint():
    # Halfway through the decay (step 10 + 90/2) the cosine factor is 1/2.
    assert lr_at(55, cfg()) == pytest.approx((LR + FLOOR) / 2, rel=1e-9)


def test_cosine_monotone_non_increasing_after_warmup():
    c = cfg()
    values = [lr_at(s, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] > values[-1]


def test_cosine_min_lr_ratio_zero():
    c = cfg(min_lr_ratio=0.0)
    assert lr_at(100, c) == pytest.approx(0.0, abs=1e-15)


def test_wsd_constant_then_linear_decay():
    c = cfg(schedule="wsd")  # 100 steps, decay over the last 20: steps 80..100
    for s in range(10, 81):
        assert lr_at(s, c) == pytest.approx(LR, rel=1e-12), f"step {s}"
    decay = [lr_at(s, c) for s in range(80, 101)]
    diffs = [a - b for a, b in zip(decay, decay[1:])]
    assert all(d == pytest.approx((LR - FLOOR) / 20, rel=1e-9) for d in diffs)  # linear, strictly down
    assert lr_at(90, c) == pytest.approx((LR + FLOOR) / 2, rel=1e-9)
    assert lr_at(100, c) == pytest.approx(FLOOR, rel=1e-9)


def test_wsd_decay_fraction_zero_is_constant():
    c = cfg(schedule="wsd", decay_fraction=0.0)
    assert all(lr_at(s, c) == pytest.approx(LR, rel=1e-12) for s in range(10, 101))


def test_wsd_decay_longer_than_stable_phase_starts_after_warmup():
    c = cfg(schedule="wsd", decay_fraction=1.0)  # decay would start at 0: it starts after warmup instead
    assert lr_at(10, c) == pytest.approx(LR, rel=1e-12)
    assert lr_at(55, c) == pytest.approx((LR + FLOOR) / 2, rel=1e-9)
    assert lr_at(100, c) == pytest.approx(FLOOR, rel=1e-9)


def test_constant_schedule():
    c = cfg(schedule="constant")
    assert all(lr_at(s, c) == pytest.approx(LR, rel=1e-12) for s in range(10, 120))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_no_warmup_starts_at_peak(schedule):
    c = cfg(schedule=schedule, warmup_steps=0)
    assert lr_at(0, c) == pytest.approx(LR, rel=1e-12)
    expected_end = LR if schedule == "constant" else FLOOR
    assert lr_at(100, c) == pytest.approx(expected_end, rel=1e-9)


def test_warmup_over_all_steps():
    c = cfg(warmup_steps=100)
    assert lr_at(99, c) == pytest.approx(LR, rel=1e-12)
    assert lr_at(0, c) == pytest.approx(LR / 100, rel=1e-12)


def test_unknown_schedule_raises():
    c = cfg()
    c.schedule = "linear"
    with pytest.raises(ValueError):
        lr_at(50, c)
