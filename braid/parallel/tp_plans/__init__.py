"""Tensor-parallel plans per mixer (``mixers.py``) and the differentiable collectives they use (``comm.py``)."""
