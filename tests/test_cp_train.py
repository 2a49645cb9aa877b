"""Context parallelism through the trainer: 5 steps of a ``*-tiny`` preset with cp = 2 (and
cp = 2 × dp_shard = 2) give the one-process losses and gradient norms (fp32, CPU, gloo).

The launches reuse ``test_parallel_train`` (its file is the torchrun worker); the sequence of 32
tokens is cut into 4 zigzag chunks (8 with cp = 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from braid.config import DENSE_SOFTMAX
from braid.models.presets import load_preset
from test_parallel_train import (PRESETS, assert_same_trajectory, eval_losses, launch, overrides, run_one_process,
                                 train_records, LOSS_RTOL)

CP2 = {"parallel.cp": 2}
CP2_DP2 = {"parallel.cp": 2, "parallel.dp_shard": 2}
# The default run: one softmax preset and one hybrid (softmax + KDA + MoE) through ring attention.
FAST = ["llama-tiny", "hybrid-tiny"]


def _check(tmp: Path, preset: str, name: str) -> None:
    ref = train_records(tmp / f"ref_{preset}")
    assert_same_trajectory(train_records(tmp / f"{preset}_{name}"), ref, f"{preset} {name}")
    assert eval_losses(tmp / f"{preset}_{name}") == pytest.approx(eval_losses(tmp / f"ref_{preset}"), rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cp")
    for preset in FAST:
        run_one_process(tmp / f"ref_{preset}", preset)
    launch(tmp, 2, [overrides(tmp / f"{p}_cp2", p, **CP2) for p in FAST])
    return tmp


@pytest.mark.parametrize("preset", FAST)
def test_cp2_ring_matches_one_process(fast_runs, preset):
    _check(fast_runs, preset, "cp2")


def _every_preset(tmp_path: Path, presets: list[str], model: dict, kind: str) -> None:
    for preset in presets:
        run_one_process(tmp_path / f"ref_{preset}", preset, **model)
    launch(tmp_path, 2, [overrides(tmp_path / f"{p}_cp2", p, **model, **CP2, **{"parallel.cp_kind": kind})
                         for p in presets], timeout=3600)
    launch(tmp_path, 4, [overrides(tmp_path / f"{p}_cp2dp2", p, **model, **CP2_DP2, **{"parallel.cp_kind": kind})
                         for p in presets], timeout=3600)
    for preset in presets:
        _check(tmp_path, preset, "cp2")
        _check(tmp_path, preset, "cp2dp2")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ring", "tree", "ulysses"])
def test_every_preset_cp2_and_cp2_dp2_match_one_process(tmp_path, kind):
    _every_preset(tmp_path, PRESETS, {}, kind)


# cp_kind=s2 needs the S2 pattern (without it the config is refused; it used to run ring attention):
# the presets whose softmax mixers all take the pattern run with it, at cp = 1 too. Blocks of 4 tokens
# divide the zigzag chunks of 8.
S2 = {"model.s2.enabled": "true", "model.s2.block": 4, "model.s2.local_blocks": 1, "model.s2.vert_stride": 2}
S2_PRESETS = [p for p in PRESETS if not set(load_preset(p)["pattern"]) & set(DENSE_SOFTMAX)]


@pytest.mark.slow
def test_s2_presets_cp2_and_cp2_dp2_match_one_process(tmp_path):
    _every_preset(tmp_path, S2_PRESETS, S2, "s2")


def test_seq_len_not_divisible_is_a_one_line_error(tmp_path):
    from braid.config import load_config
    from braid.errors import ConfigError
    from braid.parallel.distributed import DistInfo
    from braid.trainer.trainer import Trainer
    import torch

    cfg = load_config(None, overrides(tmp_path, "llama-tiny", **{"parallel.cp": 2, "data.seq_len": 30}))
    with pytest.raises(ConfigError, match=r"data.seq_len.*multiple of 4") as err:
        Trainer(cfg, DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    assert "\n" not in str(err.value)


def test_ulysses_heads_not_divisible_is_a_one_line_error(tmp_path):
    from braid.config import load_config
    from braid.errors import ConfigError
    from braid.parallel.distributed import DistInfo
    from braid.trainer.trainer import Trainer
    import torch

    cfg = load_config(None, overrides(tmp_path, "llama-tiny", **{"parallel.cp": 4, "parallel.cp_kind": "ulysses",
                                                                 "model.n_heads": 2, "model.n_kv_heads": 2}))
    with pytest.raises(ConfigError, match=r"model.n_heads.*divisible by parallel.cp = 4") as err:
        Trainer(cfg, DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu")))
    assert "\n" not in str(err.value)
