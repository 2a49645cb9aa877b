"""Tensor-parallel collectives: they live in :mod:`braid.parallel.collectives` (the one home of
autograd-wrapped collectives); this name stays for existing imports."""

from braid.parallel.collectives import *  # noqa: F401,F403
from braid.parallel.collectives import _reduce_scatter_seq  # noqa: F401
