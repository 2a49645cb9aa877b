"""``python -m braid.torchrun <torchrun arguments>``: torchrun that reports braid's errors once.

A rank that stops on bad input (``braid.train`` exits 2, or 3 after ``train.max_nan_iterations``) would
print its line once per rank, and torchrun would follow it with a ``ChildFailedError`` dump and exit 1.
Under this launcher each rank hands its line to a directory named by ``BRAID_ERROR_DIR`` instead of
printing it; when the workers fail, the launcher prints the line of the lowest failed rank once and
exits with that rank's code. Any other failure (a crash, a kill) is torchrun's, reported as torchrun
reports it. The launcher runs torch's own entry point in this process, so signals reach the elastic
agent exactly as under ``torchrun``.

Importing this module costs nothing (no torch): ``braid.train`` calls :func:`hand_to_launcher`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

ERROR_DIR_ENV = "BRAID_ERROR_DIR"
# The exit codes of braid.train that carry one line for the user (errors.py: bad input, non-finite stop).
BRAID_CODES = (2, 3)


def hand_to_launcher(message: str, code: int) -> bool:
    """Leave this rank's error line for the launcher; False (the caller prints it) outside one."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    path = Path(folder) / f"rank-{rank}.json"
    try:  # written whole, then renamed, so the launcher never reads half a line
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": int(rank), "code": code, "message": message}))
        tmp.replace(path)
    except (OSError, ValueError):
        return False
    return True


def reported_error(folder: Path) -> dict | None:
    """The error of the lowest rank that handed one over, or None."""
    found = []
    for path in folder.glob("rank-*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(found, key=lambda e: e["rank"]) if found else None


class _QuietBraidExits(logging.Filter):
    """Drop the agent's ``failed (exitcode: 2) local_rank: ...`` line: braid's own line says it better,
    and for any other cause torchrun's ChildFailedError summary still lists every failed rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("failed (exitcode") and args and args[0] in BRAID_CODES)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietBraidExits())
    folder = Path(tempfile.mkdtemp(prefix="braid-errors-"))
    os.environ[ERROR_DIR_ENV] = str(folder)  # the workers inherit the agent's environment
    try:
        torchrun_main(argv)
    except ChildFailedError:
        error = reported_error(folder)
        if error is None:
            raise
        print(f"braid: error: {error['message']}", file=sys.stderr, flush=True)
        sys.exit(error["code"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
