"""Write a braid model as a Hugging Face directory and read one back.

``export_hf``: config.json, safetensors (one file, or shards + ``model.safetensors.index.json`` above
``max_shard_bytes``), generation_config.json, tokenizer files when the run used one, and for
architectures without a stock class the generated ``modeling_braid.py`` (``auto_map``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from braid.config import Config, ModelConfig
from braid.convert import stock, stock_kimi, stock_qwen3_next
from braid.convert.remote_code import modeling_source
from braid.errors import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
BRAID_ARCH = "BraidForCausalLM"
PROGRESS_MIN_BYTES = 256 * 1024**2  # show a progress bar for exports at least this large


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def write_safetensors(state: dict[str, torch.Tensor], out: Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index; returns the file names."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    total = sum(t.numel() * t.element_size() for t in state.values())
    shards = _shards(state, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=total < PROGRESS_MIN_BYTES)
    for name, shard in zip(names, shards):
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out / name), metadata={"format": "pt"})
        bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _safetensors_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    return []


def weight_files(path: Path) -> list[str]:
    """The safetensors files of a HF directory; a clear error when it has none (or only pickles)."""
    from braid.trainer.safe_load import PICKLED_HF_WEIGHTS

    files = _safetensors_files(path)
    if files:
        return files
    if any((path / name).is_file() for name in PICKLED_HF_WEIGHTS):
        raise CheckpointError(f"'{path}' holds its weights as pytorch_model.bin, a pickle that can run code when "
                              "loaded; braid reads safetensors only (braid.convert from-hf --allow-pickle reads "
                              "it with weights_only=True)")
    raise FileNotFoundError(f"'{path}' has no model.safetensors or model.safetensors.index.json")


class LazySafetensors(Mapping):
    """The tensors of a HF directory's safetensors files, each read only when asked for.

    A file is memory-mapped only while a read of it runs (or while a :meth:`reading` block is open),
    so a process that reads parameter after parameter holds one of them at a time, not every page of
    the files it has touched (mapped pages count towards its resident memory until unmapped)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file_of: dict[str, str] = {}
        for name in weight_files(self.path):
            with safe_open(str(self.path / name), framework="pt") as f:
                self._file_of.update((k, name) for k in f.keys())
        self._open: Optional[dict] = None

    def __len__(self) -> int:
        return len(self._file_of)

    def __iter__(self):
        return iter(self._file_of)

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        name = self._file_of[key]
        if self._open is None:
            with safe_open(str(self.path / name), framework="pt") as f:
                return f.get_tensor(key)
        if name not in self._open:
            self._open[name] = safe_open(str(self.path / name), framework="pt").__enter__()
        return self._open[name].get_tensor(key)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Keep the files opened inside the block open until it ends (one braid tensor read from many)."""
        self._open = {}
        try:
            yield
        finally:
            handles, self._open = self._open, None
            for handle in handles.values():
                handle.__exit__(None, None, None)


def read_safetensors(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory (single file or sharded with an index). ``pytorch_model.bin``
    weights are pickles, which can run code when loaded: refused, or with ``allow_pickle`` read with
    ``weights_only=True`` (README, Security)."""
    from safetensors.torch import load_file

    from braid.trainer.safe_load import PICKLED_HF_WEIGHTS, read_pickled_hf_weights

    if allow_pickle and not _safetensors_files(path) and any((path / n).is_file() for n in PICKLED_HF_WEIGHTS):
        return read_pickled_hf_weights(path)
    files = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def _tokenizer_ids(cfg: Optional[Config]) -> tuple[Optional[int], Optional[int]]:
    """(bos, eos) ids of the run's tokenizer (bos None for the byte tokenizer, which has none)."""
    if cfg is None:
        return None, None
    from braid.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    bos = getattr(getattr(tok, "tok", None), "bos_token_id", None)
    return bos, tok.eos_id


def export_hf(model: torch.nn.Module, cfg: Config, out: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              force_remote_code: bool = False) -> dict:
    """Write ``model`` (a HybridLM; ``cfg`` its run config, ``cfg.model.vocab_size`` resolved) to ``out``.

    Returns ``{"architecture": class name, "files": [...]}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m: ModelConfig = cfg.model
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    arch = None if force_remote_code else stock.stock_architecture(m, state)
    bos, eos = _tokenizer_ids(cfg)
    if arch is not None:
        hf_cfg = stock.hf_config(m, arch)
        if arch == stock_kimi.KIMI:
            weights = stock_kimi.to_hf_state(state)
        elif arch == stock_qwen3_next.QWEN3_NEXT:
            weights = stock_qwen3_next.to_hf_state(state, m)
        else:
            weights = stock.to_hf_state(state)
    else:
        arch = BRAID_ARCH
        hf_cfg = dict(architectures=[arch], model_type="braid", vocab_size=m.vocab_size,
                      hidden_size=m.d_model, num_hidden_layers=len(m.pattern), tie_word_embeddings=False,
                      braid_model=dataclasses.asdict(m), dtype="float32", use_cache=False,
                      auto_map={"AutoConfig": "modeling_braid.BraidConfig",
                                "AutoModelForCausalLM": "modeling_braid.BraidForCausalLM"})
        weights = {f"braid.{k}": v for k, v in state.items()}
        (out / "modeling_braid.py").write_text(modeling_source())
    hf_cfg.update(bos_token_id=bos, eos_token_id=eos, braid_tokenizer=cfg.data.tokenizer,
                  braid_seq_len=cfg.data.seq_len)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"do_sample": False, "bos_token_id": bos, "eos_token_id": eos, "max_length": cfg.data.seq_len}
    gen = {k: v for k, v in gen.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    files = write_safetensors(weights, out, max_shard_bytes)
    if cfg.data.tokenizer != "bytes":
        from braid.data.tokenizer import load_tokenizer

        load_tokenizer(cfg.data.tokenizer).save(out)
    # The byte tokenizer is built into braid (ids 0..255 = UTF-8 bytes, 256 = EOS): no files to write.
    return {"architecture": arch, "files": files}


def export_checkpoint(checkpoint: str | Path, out: str | Path, **kwargs) -> dict:
    """``to-hf``: a braid DCP checkpoint dir (any layout, ``latest`` accepted) → HF dir ``out``;
    ``kwargs`` go to :func:`export_hf`. Used by the CLI and by ``checkpoint.export_hf``."""
    from braid.convert.braid_checkpoint import load_braid_checkpoint

    model, cfg = load_braid_checkpoint(checkpoint)
    return export_hf(model, cfg, out, **kwargs)


def hf_model_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json of a HF dir → (the dict, braid's ModelConfig): braid exports or stock classes."""
    hf = json.loads((path / "config.json").read_text())
    if "braid_model" in hf:
        from braid.convert.config_dict import model_config_from_dict

        return hf, model_config_from_dict(hf["braid_model"])
    return hf, stock.model_config_from_hf(hf)


def braid_state_thunks(hf: dict, m: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, Callable]:
    """braid state-dict key → a function returning that full tensor, computed from the HF tensors it needs
    (read from ``tensors`` only when called). ``hf``/``m``: the directory's config.json and its braid config."""
    if "braid_model" in hf:
        state = {k[len("braid."):]: partial(tensors.__getitem__, k) for k in tensors if k.startswith("braid.")}
    elif (hf.get("architectures") or [None])[0] == stock_kimi.KIMI:
        state = stock_kimi.from_hf_lazy(tensors, n_experts=m.moe.n_experts)
    elif (hf.get("architectures") or [None])[0] == stock_qwen3_next.QWEN3_NEXT:
        state = stock_qwen3_next.from_hf_lazy(tensors, m)
    else:
        state = stock.from_hf_lazy(tensors, n_experts=m.moe.n_experts if "E" in m.ffn_pattern else 0)
    if m.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_hf_dir(path: str | Path, allow_pickle: bool = False):
    """A braid-exported or supported stock HF directory → (HybridLM eval fp32 CPU, ModelConfig, config dict);
    ``allow_pickle``: see :func:`read_safetensors`."""
    from braid.models.hybrid import HybridLM

    path = Path(path)
    hf, m = hf_model_config(path)
    tensors = read_safetensors(path, allow_pickle)
    state = {k: value() for k, value in braid_state_thunks(hf, m, tensors).items()}
    model = HybridLM(m)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"'{path}': weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.float().eval(), m, hf
