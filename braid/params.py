"""``python -m braid.params [preset ...]``: parameters and FLOPs per token of model presets.

Real-size presets are compared with the figures their papers or model cards publish.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Union

from braid.config import load_config
from braid.models.presets import preset_names


@dataclass(frozen=True)
class Published:
    """A published parameter count of the shape a preset mirrors (``active``: MoE activated parameters).
    ``vocab`` is the vocabulary the figure includes, used for the comparison when the preset sets none."""

    total: float
    active: Optional[float]
    source: str
    vocab: Optional[int] = None


@dataclass(frozen=True)
class NoFigure:
    reason: str


PUBLISHED: dict[str, Union[Published, NoFigure]] = {
    "fox-pro": NoFigure("the FoX paper names its models by size class ('760M', 24 × 1536, GPT-2 vocabulary "
                        "50257 untied) and publishes no parameter count"),
    "gated-attn": Published(1.7e9, None, "Qwen3-1.7B model card; the G1 gate projections (28 × 2048², "
                                         "117M) are not in that shape"),
    "gated-attn-moe": Published(30.5e9, 3.3e9, "Qwen3-30B-A3B model card; the G1 gate projections "
                                               "(48 × 2048 × 4096, 403M, active too) are not in that shape"),
    "gpt-125m": Published(125e6, None, "GPT-3 Small, Brown et al. 2020 table 2.1; includes learned positions "
                                       "and biases (1.7M) that this RoPE shape has not", vocab=50257),
    "hymba": Published(1.52e9, None, "Hymba-1.5B model card"),
    "kimi-linear": Published(48e9, 3e9, "Kimi-Linear-48B-A3B: 48B total, 3B activated"),
    "llama": Published(8.03e9, None, "Llama-3-8B"),
    "llama-1b": Published(1.23e9, None, "Llama-3.2-1B model card", vocab=128256),
    "moe": Published(30.5e9, 3.3e9, "Qwen3-30B-A3B model card"),
    "qwen3-next": Published(80e9, None, "Qwen3-Next-80B-A3B model card: 80B total, '3B activated' is a rounded "
                                        "label without the 2 × 311M vocabulary matrices (3.25B here); the 48 "
                                        "shared-expert gates (98K) are not in this shape"),
}


def _size(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def is_real_size(name: str) -> bool:
    """Real sizes, as opposed to the ``*-tiny`` CPU flavours and the small ``tiny*`` models."""
    return "tiny" not in name.split("-")


def published_note(name: str, model_cfg, seq_len: int) -> str:
    """The published column of ``name``: figure, our deviation from it and the source, or why there is none."""
    from braid.models.stats import model_stats, resolve_vocab

    entry = PUBLISHED.get(name)
    if entry is None:
        return "" if not is_real_size(name) else "none: no published figure recorded"
    if isinstance(entry, NoFigure):
        return f"none: {entry.reason}"
    at = ""
    if model_cfg.vocab_size is None and entry.vocab is not None:  # compare what the figure counts
        model_cfg = resolve_vocab(model_cfg, entry.vocab)
        at = f" at vocab {entry.vocab}"
    elif model_cfg.vocab_size is None:
        return "none: the published figure's vocabulary is not recorded"
    s = model_stats(model_cfg, seq_len)
    note = f"{_size(entry.total)} ({100 * (s.params / entry.total - 1):+.1f}%{at})"
    if entry.active:
        note += f", active {_size(entry.active)} ({100 * (s.active_params / entry.active - 1):+.1f}%)"
    return note + f"  [{entry.source}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid.params", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="preset names (default: all)")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs per token")
    parser.add_argument("--vocab", type=int, default=257, help="tokenizer vocabulary when a preset sets none")
    args = parser.parse_args(argv)

    from braid.models.stats import model_stats, resolve_vocab

    print(f"{'preset':<22} {'params':>10} {'active':>10} {'non-emb':>10} {'GFLOP/tok':>10}  published")
    for name in args.presets or preset_names():
        model = load_config(None, [f"model.preset={name}"]).model
        s = model_stats(resolve_vocab(model, args.vocab), args.seq_len)
        print(f"{name:<22} {s.params / 1e6:>9.1f}M {s.active_params / 1e6:>9.1f}M "
              f"{s.non_embedding_params / 1e6:>9.1f}M {s.flops_per_token / 1e9:>10.3f}  "
              f"{published_note(name, model, args.seq_len)}")


if __name__ == "__main__":
    main()
