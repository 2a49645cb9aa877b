"""Counting the collectives of one rehearsed step: op, process group (the mesh view it spans) and bytes."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# Namespaces of the collectives: c10d's eager ops (FSDP2, the all-to-alls of expert parallelism, plain
# dist.* calls) and the functional ones DTensor redistributions issue.
_NAMESPACES = ("c10d", "_c10d_functional")
# Bookkeeping ops of those namespaces that move no data.
_NOT_COLLECTIVES = {"wait_tensor", "barrier", "monitored_barrier"}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _group_name(value) -> str | None:
    """The name of a process-group argument (a ProcessGroup script object or, functional, its name)."""
    if isinstance(value, str):
        return value
    if isinstance(value, torch.ScriptObject) and "ProcessGroup" in str(value):  # c10d's eager ops
        return dist.ProcessGroup.unbox(value).group_name
    return None


def view_names(mesh) -> dict[str, str]:
    """Process-group name → the mesh view it belongs to (``dp_shard``, ``tp``, ``ep``, ``dp_cp``, ...)."""
    names: dict[str, str] = {}
    if mesh.device_mesh is None:
        return names
    dm = mesh.device_mesh
    for i, dim in enumerate(dm.mesh_dim_names or ()):
        names.setdefault(dm.get_group(i).group_name, dim)
    for view, sub in (mesh.flattened or {}).items():
        names.setdefault(sub.get_group().group_name, view)
    return names


class CollectiveCounter(TorchDispatchMode):
    """Records every collective dispatched inside it. ``bytes`` is the payload one rank holds: the larger of
    the op's tensor arguments (the gathered output of an all-gather, the input of a reduce-scatter)."""

    def __init__(self, groups: dict[str, str]):
        super().__init__()
        self.groups = groups
        self.phase = "step"
        self.records: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in _NAMESPACES and name not in _NOT_COLLECTIVES:
            sizes = [sum(t.numel() * t.element_size() for t in _tensors(a)) for a in (*args, *kwargs.values())]
            group = next((g for g in map(_group_name, (*args, *kwargs.values())) if g is not None), None)
            key = (self.phase, name.rstrip("_"), self.groups.get(group, group or "?"))
            self.records[key][0] += 1
            self.records[key][1] += max(sizes, default=0)
        return func(*args, **(kwargs or {}))

    def summary(self, repeat: dict[str, float]) -> list[dict]:
        """One entry per (op, group): ``count`` calls and ``bytes`` summed per optimizer step; the records of a
        phase are multiplied by ``repeat[phase]`` (the micro-batches of gradient accumulation per recorded
        one)."""
        merged: dict[tuple, list[float]] = defaultdict(lambda: [0, 0])
        for (phase, op, group), (count, size) in self.records.items():
            times = repeat.get(phase, 1)
            merged[(op, group)][0] += count * times
            merged[(op, group)][1] += size * times
        return [{"op": op, "group": group, "count": round(count), "bytes": round(size)}
                for (op, group), (count, size) in sorted(merged.items(), key=lambda kv: -kv[1][1])]
