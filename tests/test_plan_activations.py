"""The planner's activation bytes of the delta-rule mixers (K, D) are what their GPU path keeps for backward:
the mixer's forward under bf16 autocast, with the chunked delta rule on its Triton kernels (run by the
interpreter), every tensor autograd saves counted once per storage; the per-token bytes are the difference
between two lengths, so weights and per-call constants drop out."""

from __future__ import annotations

import sys

import pytest
import torch

from braid.config import load_config
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo
from braid.models.stats import resolve_vocab
from braid.plan.model_cost import delta_rule_width, layer_costs
from helpers import interpreter_only

pytestmark = interpreter_only

D_MODEL = 64
CASES = {
    "K": ["model.pattern=K", "model.kda.head_dim=16", "model.kda.n_heads=4", "model.kda.chunk_size=16"],
    "K-wide-heads": ["model.pattern=K", "model.kda.head_dim=32", "model.kda.n_heads=2", "model.kda.chunk_size=16"],
    "K-long-chunks": ["model.pattern=K", "model.kda.head_dim=32", "model.kda.n_heads=4", "model.kda.chunk_size=32"],
    "D-grouped": ["model.pattern=D", "model.gdn.head_k_dim=16", "model.gdn.head_v_dim=32", "model.gdn.n_k_heads=2",
                  "model.gdn.n_v_heads=4", "model.gdn.chunk_size=16"],
    "D": ["model.pattern=D", "model.gdn.head_k_dim=32", "model.gdn.head_v_dim=16", "model.gdn.n_k_heads=4",
          "model.gdn.n_v_heads=4", "model.gdn.chunk_size=32"],
}


def _saved_bytes(mixer, t: int) -> int:
    seen: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return x

    x = torch.randn(2, t, D_MODEL, requires_grad=True)
    seq = SeqInfo(position_ids=torch.arange(t)[None].expand(2, t), doc_ids=None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(x, seq)
    return sum(seen.values())


@pytest.mark.parametrize("case", list(CASES))
def test_delta_rule_width_is_what_the_triton_path_keeps(case, monkeypatch):
    kda_module = sys.modules["braid.kernels.kda"]  # the package re-exports the function under the same name
    monkeypatch.setattr(kda_module, "resolve_backend", lambda *a, **k: "triton")  # the GPU's choice
    monkeypatch.setattr(kda_module, "checked", lambda *a, **k: "triton")
    cfg = resolve_vocab(load_config(None, ["model.preset=llama-tiny", f"model.d_model={D_MODEL}", "model.n_heads=4",
                                           *CASES[case]]).model, 64)
    torch.manual_seed(0)
    mixer = HybridLM(cfg).layers[0].mixer
    per_token = (_saved_bytes(mixer, 64) - _saved_bytes(mixer, 32)) / (2 * 32)
    letter = cfg.pattern[0]
    assert 2 * delta_rule_width(mixer, letter, D_MODEL) == pytest.approx(per_token, rel=1e-3)
    layer = layer_costs(cfg, 128).layers[0]  # the planner's layer: this mixer plus its FFN and the two norms
    assert layer.act_width > delta_rule_width(mixer, letter, D_MODEL) + layer.norm_width
