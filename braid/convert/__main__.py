"""``python -m braid.convert to-hf|from-hf ...``: Hugging Face export and import (exit 2 on bad input)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from braid.errors import BraidError


def _claim_out(out: Path, overwrite: bool) -> None:
    """An --out that holds anything (another run, an export) is replaced only when asked to."""
    if out.exists() and not out.is_dir():
        raise BraidError(f"--out '{out}' is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    what = "a braid run (checkpoints/)" if (out / "checkpoints").is_dir() else \
        "a Hugging Face export (config.json)" if (out / "config.json").is_file() else "files"
    if not overwrite:
        raise BraidError(f"--out '{out}' already holds {what}; pass --overwrite to replace it, or pick another --out")
    shutil.rmtree(out)


def to_hf(args) -> None:
    from braid.convert.braid_checkpoint import resolve_checkpoint_dir, run_config
    from braid.convert.hf_export import export_checkpoint

    out = Path(args.out)
    ckpt = resolve_checkpoint_dir(args.checkpoint)
    run_config(ckpt)  # a checkpoint without a config fails before --out is touched
    if out.resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        raise BraidError(f"--out '{out}' contains the checkpoint '{args.checkpoint}'; export elsewhere")
    _claim_out(out, args.overwrite)

    info = export_checkpoint(args.checkpoint, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                             force_remote_code=args.remote_code)
    print(f"braid: exported {args.checkpoint} as {info['architecture']} to {args.out} "
          f"({len(info['files'])} weight file(s))")


def from_hf(args) -> None:
    from braid.config import Config
    from braid.convert.braid_checkpoint import save_braid_checkpoint
    from braid.convert.hf_export import load_hf_dir

    src, out = Path(args.hf), Path(args.out)
    model, m, hf = load_hf_dir(src, allow_pickle=args.allow_pickle)  # read and checked before --out is touched
    if out.resolve() in (src.resolve(), *src.resolve().parents):
        raise BraidError(f"--out '{out}' contains the --hf directory '{src}'; import elsewhere")
    _claim_out(out, args.overwrite)
    cfg = Config()
    cfg.model = m
    cfg.run.name, cfg.run.dir = out.name, str(out)
    tok_files = [f for f in src.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
    if tok_files:
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for f in tok_files:
            shutil.copy2(f, out / "tokenizer" / f.name)
        cfg.data.tokenizer = str((out / "tokenizer").resolve())
    else:
        cfg.data.tokenizer = hf.get("braid_tokenizer", "bytes")
    if "braid_seq_len" in hf:
        cfg.data.seq_len = hf["braid_seq_len"]
    ckpt = save_braid_checkpoint(model, cfg, out)
    print(f"braid: imported {src} ({hf['architectures'][0]}) into {ckpt}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braid.convert", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("to-hf", help="braid DCP checkpoint → Hugging Face directory")
    p.add_argument("--checkpoint", required=True, help="<run.dir>/checkpoints/<step_N|latest>")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard safetensors above this size")
    p.add_argument("--remote-code", action="store_true", help="use the generated modeling code even when a "
                   "stock class matches")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it already holds files")
    p.set_defaults(fn=to_hf)
    p = sub.add_parser("from-hf", help="Hugging Face directory (Llama, Qwen3, Qwen3-MoE, Kimi Linear) → braid run dir")
    p.add_argument("--hf", required=True, help="local Hugging Face model directory")
    p.add_argument("--out", required=True, help="the new run dir (config.yaml + checkpoints/step_0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it already holds a run or files")
    p.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model.bin weights (pickles), "
                   "with torch.load(weights_only=True); safetensors are read either way")
    p.set_defaults(fn=from_hf)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (BraidError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"braid: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
