"""``train.precision=bf16`` on CPU (autocast) for every tiny preset: a short run's loss curve stays within
bench/train_curves.py's stated tolerance of the same run in fp32 (mean |Δloss| ≤ 0.05, every step
≤ 0.15). This catches dtype bugs in the non-Triton code that GPU runs use (bf16 autocast everywhere
but the Triton kernels). One preset per test; slow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_curves  # noqa: E402

STEPS = 20


def test_curve_comparison_fails_on_a_diverging_run():
    ref = [5.0 - 0.1 * i for i in range(STEPS)]
    assert train_curves.compare([x + 0.01 for x in ref], ref)["passed"]
    assert not train_curves.compare([x + 0.2 for x in ref], ref)["passed"]
    assert not train_curves.compare(ref[:-1], ref)["passed"]
    assert not train_curves.compare(ref[:-1] + [float("nan")], ref)["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", train_curves.tiny_presets())
def test_bf16_autocast_on_cpu_tracks_fp32(preset):
    fp32 = train_curves.run_curve(preset, "cpu", "fp32", STEPS)
    bf16 = train_curves.run_curve(preset, "cpu", "bf16", STEPS)
    assert fp32[-1] < fp32[0] - 1.0, f"{preset}: the fp32 run did not train ({fp32[0]:.2f} → {fp32[-1]:.2f})"
    result = train_curves.compare(bf16, fp32)
    assert result["passed"], f"{preset}: bf16 vs fp32 {result}"
