"""Context parallelism: the sequence of every sample split over the ``cp`` mesh dimension.

``apply_cp(model, group, kind, layout)`` attaches a :class:`ContextParallel` to a HybridLM; the trainer
shards each micro-batch with ``shard_batch`` and the mixers call ``seq.cp`` for their sequence-mixing
ops. See ``context.py`` for the contract and ``layout.py`` for who holds which positions.
"""

from braid.parallel.context.context import KINDS, ContextParallel, CPSeq
from braid.parallel.context.layout import CPLayout, Segment

__all__ = ["ContextParallel", "CPSeq", "CPLayout", "Segment", "KINDS", "apply_cp"]


def apply_cp(model, group, kind: str = "ring", layout: str = "zigzag", node_size=None) -> ContextParallel:
    """Attach context parallelism to ``model`` (a HybridLM); returns the attached object."""
    cp = ContextParallel(group, kind, layout, node_size)
    model.context_parallel = cp
    return cp
