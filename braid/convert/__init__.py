"""Checkpoint conversion: Hugging Face export/import and the loader used by generation and evaluation.

CLI: ``python -m braid.convert to-hf --checkpoint <run.dir>/checkpoints/<step_N|latest> --out <dir>``
and ``python -m braid.convert from-hf --hf <dir> --out <run.dir>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["LoadedModel", "load", "load_model"]


@dataclass
class LoadedModel:
    """A braid model with what generation/evaluation need besides the weights.

    model: ``HybridLM`` in eval mode, fp32, on CPU. tokenizer: the ``data.tokenizer`` spec
    (``bytes`` or a local directory). run_dir: the braid run directory when loaded from a checkpoint.
    """

    model: "object"
    tokenizer: str
    run_dir: Optional[Path] = None
    seq_len: Optional[int] = None


def load(path: str | Path) -> LoadedModel:
    """Load from a braid checkpoint dir (``step_N``, ``latest``, ``checkpoints/`` or the run dir), a
    braid-exported HF dir or a supported stock HF dir (Llama, Qwen3, Qwen3-MoE, Kimi Linear)."""
    p = Path(path)
    if (p / "config.json").is_file():
        from braid.convert.hf_export import load_hf_dir

        model, _, hf = load_hf_dir(p)
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = str(p) if has_tok else hf.get("braid_tokenizer", "bytes")
        return LoadedModel(model, tok, None, hf.get("braid_seq_len"))
    from braid.convert.braid_checkpoint import load_braid_checkpoint, resolve_checkpoint_dir

    model, cfg = load_braid_checkpoint(p)
    return LoadedModel(model, cfg.data.tokenizer, resolve_checkpoint_dir(p).parent.parent, cfg.data.seq_len)


def load_model(path: str | Path):
    """The braid model (``HybridLM``, eval, fp32, CPU) stored at ``path`` (see :func:`load`).

    ``model(input_ids [B, T] int64)`` returns logits ``[B, T, V]`` fp32.
    """
    return load(path).model
