"""What every numeric and enum config key allows: one table each, used by ``braid.config.validate``
(and by the tests, which check that no numeric key of the dataclasses is missing here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


def _number(x: Optional[float]) -> str:
    return "" if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key: ``lo``/``hi`` bounds (None: unbounded; ``*_open`` excludes the
    bound), only even values with ``even``, ``excluded`` values refused. NaN and infinities never pass."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    even: bool = False
    excluded: tuple = ()
    text: str = ""  # replaces the generated description

    def allows(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return v not in self.excluded and not (self.even and v % 2)

    def __str__(self) -> str:
        if self.text:
            return self.text
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is not None and self.hi is not None:
            bounds = f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            bounds = f"{'>' if self.lo_open else '>='} {lo}"
        elif self.hi is not None:
            bounds = f"{'<' if self.hi_open else '<='} {hi}"
        else:
            bounds = "a finite number"
        return ("an even number " if self.even else "") + bounds


@dataclass(frozen=True)
class Choice:
    """The documented values of an enum key; ``other`` describes what else it takes (a path, a pattern),
    which ``validate`` checks itself."""

    values: tuple
    other: str = ""

    def __str__(self) -> str:
        words = " | ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in self.values)
        return f"{words} | {self.other}" if self.other else words


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)
BETA = Range(0, 1, hi_open=True)

# Optional keys also take null (their comment in braid/config.py says what null means).
RANGES: dict[str, Range] = {
    "model.d_model": POSITIVE,
    "model.n_heads": POSITIVE,
    "model.n_kv_heads": POSITIVE,
    "model.head_dim": Range(0, lo_open=True, even=True),  # RoPE rotates pairs of channels
    "model.ffn_hidden": POSITIVE,
    "model.ffn_multiple": POSITIVE,
    "model.vocab_size": POSITIVE,
    "model.vocab_multiple": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.rotary_percent": Range(0, 1, lo_open=True),
    "model.window": POSITIVE,
    "model.meta_tokens": NON_NEGATIVE,
    "model.norm_eps": Range(0, 1, lo_open=True, hi_open=True),
    "model.init_std": POSITIVE,
    "model.fox.forget_bias_init": Range(),
    "model.kda.n_heads": POSITIVE,
    "model.kda.head_dim": POSITIVE,
    "model.kda.conv_size": AT_LEAST_1,
    "model.gdn.n_k_heads": POSITIVE,
    "model.gdn.n_v_heads": POSITIVE,
    "model.gdn.head_k_dim": POSITIVE,
    "model.gdn.head_v_dim": POSITIVE,
    "model.gdn.conv_size": AT_LEAST_1,
    "model.mla.n_heads": POSITIVE,
    "model.mla.q_lora_rank": POSITIVE,
    "model.mla.kv_lora_rank": POSITIVE,
    "model.mla.qk_nope_head_dim": POSITIVE,
    "model.mla.qk_rope_head_dim": Range(0, even=True),
    "model.mla.v_head_dim": POSITIVE,
    "model.hymba.v_head_dim": POSITIVE,
    "model.hymba.ssm_inner": POSITIVE,
    "model.hymba.d_state": POSITIVE,
    "model.hymba.d_conv": AT_LEAST_1,
    "model.hymba.dt_rank": POSITIVE,
    "model.moe.n_experts": AT_LEAST_1,
    "model.moe.top_k": AT_LEAST_1,
    "model.moe.expert_hidden": POSITIVE,
    "model.moe.n_shared_experts": NON_NEGATIVE,
    "model.moe.shared_hidden": POSITIVE,
    "model.moe.routed_scaling": POSITIVE,
    "model.moe.n_groups": AT_LEAST_1,
    "model.moe.topk_groups": AT_LEAST_1,
    "model.moe.bias_update_rate": NON_NEGATIVE,
    "model.moe.aux_loss_coef": NON_NEGATIVE,
    "model.moe.z_loss_coef": NON_NEGATIVE,
    "model.moe.capacity_factor": POSITIVE,
    "model.hc.rate": AT_LEAST_1,
    "model.hc.sinkhorn_iters": NON_NEGATIVE,
    "model.s2.block": AT_LEAST_1,
    "model.s2.local_blocks": AT_LEAST_1,
    "model.s2.vert_stride": AT_LEAST_1,
    "data.seq_len": POSITIVE,
    "data.valid_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "data.stream_lanes": POSITIVE,
    "train.steps": POSITIVE,
    "train.micro_batch_size": POSITIVE,
    "train.global_batch_size": POSITIVE,
    "train.lr": POSITIVE,
    "train.min_lr_ratio": FRACTION,
    "train.warmup_steps": NON_NEGATIVE,
    "train.decay_fraction": FRACTION,
    "train.weight_decay": NON_NEGATIVE,
    "train.beta1": BETA,  # AdamW's own limits
    "train.beta2": BETA,
    "train.muon_momentum": BETA,
    "train.muon_ns_steps": AT_LEAST_1,
    "train.qk_clip": Range(0, text=">= 0 (0 = off)"),
    "train.eps": POSITIVE,  # 0 divides 0 by 0 for a parameter whose gradient is zero
    "train.grad_clip": Range(0, text=">= 0 (0 disables clipping)"),
    "train.seed": Range(0, 2**32 - 1),  # numpy's seed range
    "train.eval_interval": POSITIVE,
    "train.eval_iters": POSITIVE,
    "train.threads": POSITIVE,
    "train.max_nan_iterations": Range(0, text=">= 0 (0 = never stop)"),
    "train.loss_spike_window": Range(0, excluded=(1,), text="0 (off) or >= 2"),  # a z-score needs 2 samples
    "train.loss_spike_zscore": POSITIVE,
    "train.memory_snapshot_step": Range(0, text=">= 0 (0 = none)"),
    "checkpoint.interval": POSITIVE,
    "checkpoint.keep": POSITIVE,
    "logging.interval": POSITIVE,
    "parallel.dp": POSITIVE,
    "parallel.dp_replicate": AT_LEAST_1,
    "parallel.dp_shard": AT_LEAST_1,
    "parallel.tp": AT_LEAST_1,
    "parallel.cp": AT_LEAST_1,
    "parallel.pp": AT_LEAST_1,
    "parallel.pp_virtual_stages": NON_NEGATIVE,
    "parallel.ep": AT_LEAST_1,
}

CHOICES: dict[str, Choice] = {
    "model.pos_emb": Choice(("rope", "none")),
    "model.attn_gate": Choice(("headwise", "elementwise")),
    "model.connection": Choice(("residual", "hc", "ngpt")),
    # The Triton KDA kernels need a power of two >= 16 (the torch path silently takes over otherwise);
    # at 128 with 128-wide heads their state and backward kernels exceed a GPU block's shared memory.
    "model.kda.chunk_size": Choice((16, 32, 64)),
    "model.gdn.chunk_size": Choice((16, 32, 64)),  # it runs the KDA kernels
    "model.moe.router": Choice(("softmax", "sigmoid")),
    "data.source": Choice(("embedded",), "a local file/dir, a dataset name, an indexed prefix or a blend"),
    "data.tokenizer": Choice(("bytes",), "an existing local tokenizer path"),
    "train.schedule": Choice(("cosine", "wsd", "constant")),
    "train.optimizer": Choice(("adamw", "muon")),
    "train.muon_lr_scale": Choice(("match_rms_adamw", "original")),
    "train.device": Choice(("auto", "cpu", "cuda")),
    "train.precision": Choice(("auto", "bf16", "fp32")),
    "checkpoint.resume": Choice(("auto", "none"), "an existing checkpoint directory"),
    "checkpoint.export_hf": Choice((False, True), "an output directory"),
    "logging.wandb": Choice(("off", "offline", "online")),
    "parallel.cp_kind": Choice(("ring", "s2", "tree", "ulysses")),
    "parallel.cp_layout": Choice(("auto", "zigzag", "contiguous")),
    "parallel.engine": Choice(("fsdp", "deepspeed")),
    "parallel.pp_schedule": Choice(("1f1b", "interleaved_1f1b", "zbv", "gpipe")),
    "parallel.zero_stage": Choice((1, 2, 3)),
    "parallel.activation_checkpoint": Choice(("none", "full"), "every_<N>"),
    "parallel.layout": Choice(("manual", "auto")),
    "parallel.plan_gpu": Choice(("auto", "h100-sxm", "h200", "a100-80gb", "b200")),
}
