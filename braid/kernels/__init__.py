"""Token-mixing ops. Each op family has a torch reference; Triton kernels plug in behind the same call."""

from braid.kernels.attention import attention
from braid.kernels.kda import kda
from braid.kernels.ssm import selective_scan

__all__ = ["attention", "kda", "selective_scan"]
