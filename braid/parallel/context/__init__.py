"""Context parallelism: the sequence of every sample split over the ``cp`` mesh dimension.

``apply_cp(model, group, kind, layout)`` attaches a :class:`ContextParallel` to a HybridLM; the trainer
shards each micro-batch with ``shard_batch`` and the mixers call ``seq.ops`` (a ``CPSeq``) for their sequence-mixing
ops. See ``context.py`` for the contract and ``layout.py`` for who holds which positions.
"""

from braid.parallel.context.context import KINDS, ContextParallel, CPSeq
from braid.parallel.context.layout import CPLayout, Segment
from braid.parallel.context.moe_sequence import MoESequence

# The config-only checks live with the other layout checks (torch-free, run before ranks spawn).
from braid.parallel.mesh import check_cp, layout_pieces, resolve_layout

__all__ = ["ContextParallel", "CPSeq", "CPLayout", "Segment", "KINDS", "apply_cp", "resolve_layout", "layout_pieces",
           "check_cp"]


def apply_cp(model, group, kind: str = "ring", layout: str = "zigzag", node_size=None) -> ContextParallel:
    """Attach context parallelism to ``model`` (a HybridLM); returns the attached object."""
    cp = ContextParallel(group, kind, layout, node_size)
    model.context_parallel = cp
    meta = model.cfg.meta_tokens
    for module in model.modules():  # MoE balance loss and capacity: statistics of the whole sequence
        if hasattr(module, "sequence_parallel"):
            module.sequence_parallel = MoESequence(cp, meta)
    return cp
