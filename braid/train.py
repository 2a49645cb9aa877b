"""``python -m braid.train --config configs/<file>.yaml [section.key=value ...]``.

Under ``torchrun --nproc_per_node=N -m braid.train ...`` the same command trains data parallel.
Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after a checkpoint); 2 bad configuration or input
(one line on stderr, nothing written); 3 stopped after train.max_nan_iterations non-finite steps.
``--check-world-size N`` only validates the config and its parallel layout for N ranks (no torch, no
files): what launch/torchrun.sh runs once before it spawns the ranks.
"""

from __future__ import annotations

import argparse
import sys

from braid.config import load_config, to_yaml
from braid.errors import BraidError, ConfigError
from braid.torchrun import hand_to_launcher

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    # Under launch/torchrun.sh every rank would print the same line; the launcher prints it once.
    if not hand_to_launcher(message, code):
        print(f"braid: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _world_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (configs/*.yaml); required")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit, writing nothing")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--check-world-size", type=_world_size, metavar="N",
                        help="only check the config and its parallel layout for N ranks, then exit")
    args = parser.parse_args(argv)
    if args.config is None:
        # Defaults alone are no run anyone asked for (as with launch/*.sh, which need --config too).
        _fail("no --config given: name a YAML file, e.g. --config configs/tiny.yaml (the README's default run)")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check_world_size is not None:
            from braid.parallel.mesh import check_world
            from braid.plan.auto import resolve_auto_layout

            cfg, _ = resolve_auto_layout(cfg, args.check_world_size)
            check_world(cfg, args.check_world_size)
            return
    except ConfigError as exc:
        _fail(str(exc))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return

    # Heavy imports only after the config is known to be valid.
    from braid.parallel.distributed import shutdown
    from braid.trainer.trainer import Trainer

    try:
        Trainer(cfg).train()
    except BraidError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _fail(message, getattr(exc, "exit_code", EXIT_BAD_INPUT))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
