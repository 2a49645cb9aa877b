"""``checkpoint.export_hf``: when training ends, the run's newest checkpoint as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from braid.errors import BraidError
from braid.parallel.distributed import DistInfo, any_rank
from braid.trainer.checkpoint import latest_checkpoint


def export_hf(spec: Union[bool, str], run_dir: Path, checkpoints: Path, step: int, info: DistInfo,
              console: Callable[[str], None]) -> None:
    """Collective. Rank 0 writes the newest checkpoint (the final one unless the last step was
    non-finite) as ``python -m braid.convert to-hf`` would; every rank waits for it."""
    if spec is False:
        return
    out = run_dir / "hf" if spec is True else Path(spec)
    error: Optional[BaseException] = None
    if info.is_main:
        try:
            ckpt = latest_checkpoint(checkpoints)
            if ckpt is None:
                raise BraidError("checkpoint.export_hf: the run saved no checkpoint to export")
            if ckpt.name != f"step_{step}":
                console(f"braid: warning: iteration {step} was not saved (non-finite); exporting {ckpt.name}")
            from braid.convert.hf_export import export_checkpoint

            exported = export_checkpoint(ckpt, out)
            console(f"braid: exported {ckpt} as {exported['architecture']} to {out}")
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    # Agree on the outcome: a rank left waiting for a failed export would hang the job.
    failed = any_rank(error is not None, info.device)
    if error is not None:
        raise error
    if failed:
        raise BraidError("checkpoint.export_hf failed on rank 0")
