"""``train.precision=bf16`` on CPU (autocast) for every tiny preset: a 30-step run's loss curve stays within
bench/train_curves.py's stated tolerance of the committed CPU fp32 curve of the same run
(bench/results/train_curves_cpu_fp32.json, the one the GPU check compares with too): mean |Δloss| ≤ 0.08
and the mean of the last 10 steps within 0.08. This catches dtype bugs in the non-Triton code that GPU
runs use (bf16 autocast everywhere but the Triton kernels). One preset per test; slow.

After a change that moves the fp32 curves on purpose, regenerate the reference:
``python bench/train_curves.py --device cpu --precision fp32 --write bench/results/train_curves_cpu_fp32.json``.
"""

from __future__ import annotations

import json

import pytest

from helpers import load_bench

train_curves = load_bench("train_curves")


def test_curve_comparison_judges_level_not_single_steps():
    ref = [5.0 - 0.1 * i for i in range(30)]
    assert train_curves.compare([x + 0.01 for x in ref], ref)["passed"]
    spike = list(ref)
    spike[10] += 0.5  # one run's loss spike: reported, not a failure
    assert train_curves.compare(spike, ref)["passed"] and train_curves.compare(spike, ref)["max_abs_diff"] > 0.4
    assert not train_curves.compare([x + 0.1 for x in ref], ref)["passed"]  # a curve that stays higher
    assert not train_curves.compare(ref[:-10] + [x + 0.15 for x in ref[-10:]], ref)["passed"]  # a worse end
    assert not train_curves.compare(ref[:-1], ref)["passed"]
    assert not train_curves.compare(ref[:-1] + [float("nan")], ref)["passed"]


def test_reference_covers_every_tiny_preset():
    ref = json.loads(train_curves.REFERENCE.read_text())
    assert ref["precision"] == "fp32" and ref["device"] == "cpu" and ref["steps"] == train_curves.STEPS
    assert sorted(ref["curves"]) == sorted(train_curves.tiny_presets())
    assert all(len(c) == train_curves.STEPS and c[-1] < c[0] - 2 for c in ref["curves"].values())


@pytest.mark.slow
@pytest.mark.parametrize("preset", train_curves.tiny_presets())
def test_bf16_autocast_on_cpu_tracks_fp32(preset):
    ref = json.loads(train_curves.REFERENCE.read_text())["curves"][preset]
    bf16 = train_curves.run_curve(preset, "cpu", "bf16")
    result = train_curves.compare(bf16, ref)
    assert result["passed"], f"{preset}: bf16 vs the fp32 reference {result}"
