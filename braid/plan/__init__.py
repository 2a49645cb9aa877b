"""Cluster-run planner: projected step time, memory and MFU per parallel layout (``python -m braid.plan``)."""
