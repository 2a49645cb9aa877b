"""``python -m braid.plan --config FILE [key=value ...] --gpus N --gpu KIND``: the valid layouts for N GPUs,
those that fit, ranked by projected tokens/s per GPU (table on stdout, JSON with ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from braid.errors import ConfigError

EXIT_BAD_INPUT, EXIT_NOTHING_FITS = 2, 4


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f}"


def table(result, top: int) -> str:
    rows = [f"{'layout':44} {'mem GiB':>8} {'compute s':>10} {'exposed s':>10} {'bubble s':>9} "
            f"{'step s':>8} {'tok/s/GPU':>10} {'MFU':>6}"]
    for p in result.ranked[:top]:
        rows.append(f"{p.layout.label():44} {_gib(p.memory.peak_bytes):>8} {p.compute_s:10.3f} "
                    f"{p.exposed_comm_s:10.3f} {p.bubble_s:9.3f} {p.step_s:8.3f} {p.tokens_per_s_per_gpu:10.0f} "
                    f"{100 * p.mfu:5.1f}%")
    return "\n".join(rows)


def nothing_fits_line(result) -> str:
    if not result.unfit:
        return f"no valid layout for {result.world} GPUs (check parallel.*, train.* batch sizes and data.seq_len)"
    best = result.unfit[0]
    m = best.memory
    parts = {"activations": m.activations_bytes, "optimizer states": m.optimizer_bytes,
             "parameters": m.params_bytes, "gradients": m.grads_bytes}
    largest = max(parts, key=parts.get)
    return (f"no layout fits {result.world} × {result.gpu.name} ({_gib(m.usable_bytes)} GiB usable): the smallest, "
            f"{best.layout.label()}, needs {_gib(m.peak_bytes)} GiB, most of it {largest}; more GPUs, more tp/cp, "
            f"or a smaller train.global_batch_size / data.seq_len would help")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=8192")
    parser.add_argument("--gpus", type=_positive, required=True, help="number of GPUs")
    parser.add_argument("--gpu", required=True, help="GPU kind: h100-sxm, h200, a100-80gb, b200")
    parser.add_argument("--gpus-per-node", type=_positive, default=8)
    parser.add_argument("--intra-bw", type=float, help="GB/s per GPU within a node (one direction)")
    parser.add_argument("--inter-bw", type=float, help="GB/s per GPU across nodes (one direction)")
    parser.add_argument("--efficiency", type=Path, help="efficiency JSON (default bench/results/efficiency.json)")
    parser.add_argument("--top", type=_positive, default=10)
    parser.add_argument("--json", type=Path, help="write the ranked layouts as JSON here")
    args = parser.parse_args(argv)

    from braid.config import load_config
    from braid.plan.hardware import gpu_kind
    from braid.plan.planner import plan

    try:
        cfg = load_config(args.config, args.overrides)
        gpu = gpu_kind(args.gpu, args.intra_bw, args.inter_bw)
        result = plan(cfg, args.gpus, gpu, args.gpus_per_node, args.efficiency)
    except ConfigError as exc:
        print(f"braid: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(f"braid.plan: {args.gpus} × {gpu.name} ({args.gpus_per_node} per node), {result.candidates} valid "
          f"layouts, {len(result.ranked)} fit")
    if result.ranked:
        print(table(result, args.top))
    if args.json:
        doc = {"world_size": args.gpus, "gpu": gpu.name, "gpus_per_node": args.gpus_per_node,
               "candidates": result.candidates, "fitting": len(result.ranked),
               "layouts": [p.to_dict() for p in result.ranked[:args.top]]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    if not result.ranked:
        print(f"braid: error: {nothing_fits_line(result)}", file=sys.stderr)
        sys.exit(EXIT_NOTHING_FITS)


if __name__ == "__main__":
    main()
