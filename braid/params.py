"""``python -m braid.params [preset ...]``: parameters and FLOPs per token of model presets.

Real-size presets are compared with the figures their papers or model cards publish.
"""

from __future__ import annotations

import argparse

from braid.config import load_config
from braid.models.presets import preset_names

# Published totals (and activated parameters for MoE), with where they come from.
PUBLISHED = {
    "hymba": (1.52e9, None, "Hymba-1.5B model card"),
    "kimi-linear": (48e9, 3e9, "Kimi-Linear-48B-A3B: 48B total, 3B activated"),
    "llama": (8.03e9, None, "Llama-3-8B"),
    "moe": (30.5e9, 3.3e9, "Qwen3-30B-A3B model card"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid.params", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="preset names (default: all)")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs per token")
    parser.add_argument("--vocab", type=int, default=257, help="tokenizer vocabulary when a preset sets none")
    args = parser.parse_args(argv)

    from braid.models.stats import model_stats, resolve_vocab

    print(f"{'preset':<22} {'params':>10} {'active':>10} {'non-emb':>10} {'GFLOP/tok':>10}  published")
    for name in args.presets or preset_names():
        cfg = resolve_vocab(load_config(None, [f"model.preset={name}"]).model, args.vocab)
        s = model_stats(cfg, args.seq_len)
        note = ""
        if name in PUBLISHED:
            total, active, source = PUBLISHED[name]
            note = f"{total / 1e9:.2f}B ({100 * (s.params / total - 1):+.1f}%)"
            if active:
                note += f", active {active / 1e9:.2f}B ({100 * (s.active_params / active - 1):+.1f}%)"
            note += f"  [{source}]"
        print(f"{name:<22} {s.params / 1e6:>9.1f}M {s.active_params / 1e6:>9.1f}M "
              f"{s.non_embedding_params / 1e6:>9.1f}M {s.flops_per_token / 1e9:>10.3f}  {note}")


if __name__ == "__main__":
    main()
