"""Tensor-parallel plans: the declared plan of a module, checked (``mixers.py``), and MoE's expert
sharding (``moe.py``); the collectives are in :mod:`braid.parallel.collectives` (``comm.py`` re-exports them)."""
