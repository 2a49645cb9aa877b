"""Ahead-of-time compilation of a kernel for a GPU that is not here: what the interpreter cannot check.

Triton's front end, LLVM and ptxas run on the host, so a CPU machine can compile for sm_90 and read
what the launch would need: shared memory (over the per-block limit the launch fails with "out of
resource"), register spills (local memory) and the tensor-core instructions used. Needs a process
without ``TRITON_INTERPRET=1``: the kernel modules must come from ``load(name, interpret=False)``.
"""

from __future__ import annotations

import re
from typing import Callable

# The most shared memory one block may opt into (227 KiB on sm_90, 163 KiB on sm_80).
SHARED_LIMIT = {90: 232448, 80: 166912}


def compile_stats(fn, constexprs: dict, arg_type: Callable[[str], str], options: dict,
                  capability: int = 90) -> dict:
    """Compile ``fn`` (a ``@triton.jit`` kernel) with ``constexprs`` (those it takes) and launch ``options``.

    ``arg_type(name)`` gives every other argument's Triton type (``"*fp32"``, ``"i32"``, ...).
    Returns ``{"shared": bytes, "wgmma": Hopper MMA instructions, "mma": other tensor-core MMAs,
    "local": spill references, "fits": shared within the block limit of ``capability``, "threads" per
    block, "regs" per thread, "local_bytes": local memory (spills, stack) per thread}``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # one dict serves several kernels
    sig = {name: "constexpr" if name in constexprs else arg_type(name) for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = kernel.asm["ptx"]
    shared = kernel.metadata.shared
    return dict(shared=shared, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                mma=len(re.findall(r"\bmma\.sync", ptx)), local=len(re.findall(r"\.local", ptx)),
                fits=shared <= SHARED_LIMIT.get(capability, SHARED_LIMIT[80]),
                threads=kernel.metadata.num_warps * 32, **cubin_usage(kernel.asm["cubin"]))


def cubin_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory (spills and stack) bytes per thread of a compiled kernel,
    from ``cuobjdump -res-usage`` on its cubin (the cuobjdump Triton ships)."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=120)
    regs = re.search(r"REG:(\d+)", r.stdout)
    local = re.search(r"LOCAL:(\d+)", r.stdout)
    return dict(regs=int(regs.group(1)) if regs else None, local_bytes=int(local.group(1)) if local else None)
