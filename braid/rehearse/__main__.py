"""``python -m braid.rehearse --config FILE [key=value ...] --world-size N [--rank R] [--device-memory 80GiB]
[--json OUT]``: one training step of rank R of N, rehearsed on this machine's CPU with the fake process group.

Prints the rehearsal as JSON (and writes it to OUT). Exit codes: 0 it fits; 4 it does not (one line on stderr
names the largest consumer and what would help); 2 a config or layout the run would refuse (one line naming
the key: heads % tp, experts % ep, sequence % cp, vocab % tp, ...).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from braid.errors import BraidError

EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 2, 4
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``141GB``, ``8e9`` → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"must be a size such as 80GiB or 141GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def advice(r, cfg) -> tuple[str, int, str]:
    """The largest consumer at the peak, its bytes, and what would shrink it."""
    consumers = dict(r.peak_breakdown)
    name, size = max(consumers.items(), key=lambda kv: kv[1]) if consumers else ("activations", 0)
    p, lay = cfg.parallel, r.layout
    if name == "activations":
        helps = []
        if p.activation_checkpoint == "none":
            helps.append("parallel.activation_checkpoint=full")
        helps.append(f"more parallel.tp (now {lay['tp']}) or parallel.cp (now {lay['cp']})")
        if cfg.train.micro_batch_size > 1:
            helps.append(f"a smaller train.micro_batch_size (now {cfg.train.micro_batch_size})")
    elif name == "gathered parameters":
        helps = [f"more parallel.tp (now {lay['tp']}): smaller blocks to gather"]
    elif r.expert_params_bytes * 2 > r.params_bytes:
        helps = [f"more parallel.ep (now {lay['ep']}): the routed experts ({gib(r.expert_params_bytes)} of "
                 f"{gib(r.params_bytes)} parameters) are sharded over ep only"]
    else:
        helps = [f"more ranks in parallel.dp_shard (now {lay['dp_shard']}) or more parallel.tp (now {lay['tp']})"]
    return name, size, "; ".join(helps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid.rehearse", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.preset=kimi-linear")
    parser.add_argument("--world-size", type=_positive, required=True, metavar="N")
    parser.add_argument("--rank", type=int, default=0, metavar="R", help="the rank to rehearse (default 0)")
    parser.add_argument("--device-memory", type=parse_bytes, default=parse_bytes("80GiB"), metavar="SIZE",
                        help="memory of one accelerator (default 80GiB)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the JSON here")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options

    from braid.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if not 0 <= args.rank < args.world_size:
            raise BraidError(f"--rank {args.rank} is not a rank of --world-size {args.world_size}")
        vocab = 257
        if cfg.model.vocab_size is None:  # the tokenizer decides it, as in braid.train
            from braid.data.tokenizer import load_tokenizer

            vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
        from braid.rehearse.step import rehearse

        r = rehearse(cfg, args.world_size, args.rank, args.device_memory, vocab=vocab)
    except BraidError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"braid: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    text = json.dumps(r.to_json(), indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not r.fits:
        name, size, helps = advice(r, cfg)
        print(f"braid: does not fit: rank {r.rank} of {r.world_size} peaks at {gib(r.peak_bytes)} of "
              f"{gib(r.device_memory_bytes)}; the largest consumer is {name} ({gib(size)}); would help: {helps}",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    main()
