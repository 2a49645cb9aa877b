"""Multi-rank runs return a non-view loss from the FSDP2 root, so FSDP2 does not warn that in-place
ops on the output could skip its all-gather and give wrong gradients (it did on every run): two
gloo ranks train through the trainer with FSDP2 (dp_shard 2, and cp 2), and the vocab-parallel
loss of tensor parallelism (the root's output under tp × dp) is not a view either."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from braid.config import load_config
from braid.models.hybrid import HybridLM
from conftest import tiny_overrides
from helpers import tiny_model_config
from spawn_group import run_group

LAYOUTS = {"dp_shard2": {"parallel.dp_shard": 2}, "cp2": {"parallel.cp": 2}}


def run_cases(run_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from braid.parallel.tensor_parallel import apply_tp
    from braid.trainer.trainer import Trainer

    rank = dist.get_rank()
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun sets them
    out = {}
    for name, extra in LAYOUTS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(load_config(None, tiny_overrides(Path(run_dir) / name, **{"train.steps": 2}, **extra))).train()
        out[name] = [str(w.message) for w in caught if "view" in str(w.message)]
    model = HybridLM(tiny_model_config())
    apply_tp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), sequence_parallel=False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids)
    out["tp_loss"] = {"shape": list(loss.shape), "view": loss._base is not None}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_group(2, "test_fsdp_output.run_cases", str(tmp_path_factory.mktemp("fsdp")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_rank_fsdp_run_warns_of_no_view_output(results, layout):
    assert results[layout] == []


def test_vocab_parallel_loss_is_not_a_view(results):
    assert results["tp_loss"] == {"shape": [2, 8], "view": False}


def test_one_process_loss_is_not_a_view():
    model = HybridLM(tiny_model_config())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids)
    assert loss.shape == (2, 8) and loss._base is None
    loss.sum().backward()  # and it is differentiable
    assert model.embed.weight.grad is not None
