"""Context parallelism: the sequence of every sample split over the ``cp`` mesh dimension.

``apply_cp(model, group, kind, layout)`` attaches a :class:`ContextParallel` to a HybridLM; the trainer
shards each micro-batch with ``shard_batch`` and the mixers call ``seq.cp`` for their sequence-mixing
ops. See ``context.py`` for the contract and ``layout.py`` for who holds which positions.
"""

from braid.parallel.context.context import KINDS, ContextParallel, CPSeq
from braid.parallel.context.layout import CPLayout, Segment
from braid.parallel.context.moe_sequence import MoESequence

__all__ = ["ContextParallel", "CPSeq", "CPLayout", "Segment", "KINDS", "apply_cp", "resolve_layout", "layout_pieces", "check_cp"]

# Mixers with no causal softmax: their work per token does not grow along the sequence, so contiguous
# shards are balanced and need one state hand-off per rank instead of two.
_STATE_ONLY = set("K")


def resolve_layout(spec: str, pattern: str) -> str:
    """``parallel.cp_layout``: ``auto`` is zigzag (balances causal softmax) unless every mixer is KDA."""
    if spec != "auto":
        return spec
    return "contiguous" if set(pattern) <= _STATE_ONLY else "zigzag"


def layout_pieces(layout: str, cp: int) -> int:
    """How many equal pieces the sequence is cut into (data.seq_len must be a multiple)."""
    return 2 * cp if layout == "zigzag" else cp


def apply_cp(model, group, kind: str = "ring", layout: str = "zigzag", node_size=None) -> ContextParallel:
    """Attach context parallelism to ``model`` (a HybridLM); returns the attached object."""
    cp = ContextParallel(group, kind, layout, node_size)
    model.context_parallel = cp
    meta = model.cfg.meta_tokens
    for module in model.modules():  # MoE balance loss and capacity: statistics of the whole sequence
        if hasattr(module, "sequence_parallel"):
            module.sequence_parallel = MoESequence(cp, meta)
    return cp


def check_cp(cfg, cp: int) -> None:
    """What context parallelism needs of the config, each a one-line ConfigError naming the key."""
    from braid.errors import ConfigError

    p = cfg.parallel
    pieces = layout_pieces(resolve_layout(p.cp_layout, cfg.model.pattern), cp)
    if cfg.data.seq_len % pieces:
        raise ConfigError(f"config key 'data.seq_len' = {cfg.data.seq_len} must be a multiple of {pieces} "
                          f"with parallel.cp = {cp} ({p.cp_layout} layout)")
    if p.cp_kind == "ulysses" and cfg.model.n_heads % cp:
        raise ConfigError(f"config key 'model.n_heads' = {cfg.model.n_heads} must be divisible by "
                          f"parallel.cp = {cp} with parallel.cp_kind=ulysses")
