"""``checkpoint.init_from``: fill a freshly built model with another run's or a HF directory's weights.

Used by the trainer after the model is parallelised and its shards allocated: a braid checkpoint is
read shard by shard (DCP reads only the chunks this rank holds); a HF directory is read parameter by
parameter, each rank keeping its shard of each before reading the next.
"""

from __future__ import annotations

from pathlib import Path

import torch

from braid.errors import BraidError, ConfigError

KEY = "checkpoint.init_from"


def _check_keys(path: Path, want: dict, saved) -> None:
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise ConfigError(f"config key '{KEY}' = '{path}': another architecture (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")


def _check_shape(path: Path, key: str, saved: tuple, want: tuple) -> None:
    if tuple(saved) != tuple(want):
        raise ConfigError(f"config key '{KEY}' = '{path}': {key} has shape {list(saved)}, "
                          f"this model's is {list(want)}")


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """The full shape of each entry of ``model``'s state dict (a ZeRO-3 parameter's own data is empty)."""
    from braid.parallel.materialize import plain_name
    from braid.parallel.zero3 import full_shape

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if plain_name(name) in shapes:
            shapes[plain_name(name)] = tuple(full_shape(p))
    return shapes


def _check_same(path: Path, model: torch.nn.Module, saved: dict[str, tuple]) -> None:
    """One line naming the config key when the saved weights do not fit ``model`` exactly."""
    want = _shapes(model)
    _check_keys(path, want, saved)
    for k, shape in want.items():
        _check_shape(path, k, saved[k], shape)


def _load_hf_per_shard(model: torch.nn.Module, path: Path) -> str:
    """A HF directory, one parameter at a time: each full tensor is read (converted to braid's layout if
    the directory is a stock class), this rank keeps its shard, and the tensor is dropped before the next;
    the files are mapped only while one is read. So no rank ever holds the whole model."""
    from braid.convert.hf_export import LazySafetensors, braid_state_thunks, hf_model_config
    from braid.parallel.materialize import fill_local, plain_name

    def bad(exc: Exception) -> ConfigError:
        return ConfigError(f"config key '{KEY}' = '{path}': {str(exc).splitlines()[0]}")

    try:
        hf, m = hf_model_config(path)
        tensors = LazySafetensors(path)
        thunks = braid_state_thunks(hf, m, tensors)
    except (BraidError, ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise bad(exc) from None
    want = _shapes(model)
    _check_keys(path, want, thunks)

    def full(name: str) -> torch.Tensor:
        try:
            with tensors.reading():
                value = thunks[name]()
        except (KeyError, ValueError, OSError, RuntimeError) as exc:  # a damaged or truncated file
            raise bad(exc) from None
        _check_shape(path, name, value.shape, want[name])
        return value

    with torch.no_grad():
        fill_local(model, lambda name, _: full(name))
        for name, b in model.named_buffers():
            if plain_name(name) in thunks:
                b.copy_(full(plain_name(name)))
    return f"{path} ({(hf.get('architectures') or ['?'])[0]})"


def load_init_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Copy the weights at ``path`` into ``model`` (a HybridLM, plain or parallelised) in place.

    ``path``: a braid DCP checkpoint (``step_N``, ``latest``, ``checkpoints/`` or the run dir; any
    parallel layout) or a HF directory that :func:`braid.convert.load` reads. Returns what was
    loaded, for the log. A shape or architecture mismatch raises ``ConfigError`` naming the key.
    """
    p = Path(path)
    if (p / "config.json").is_file():
        return _load_hf_per_shard(model, p)
    from braid.convert.braid_checkpoint import load_state_dict_into, read_checkpoint_metadata, resolve_checkpoint_dir

    try:
        ckpt = resolve_checkpoint_dir(p)
        meta = read_checkpoint_metadata(ckpt).state_dict_metadata  # verified, read without running its code
    except BraidError as exc:
        raise ConfigError(f"config key '{KEY}' = '{path}': {exc}") from None
    # DCP flattens {"model": {...}} to "model.<fqn>"; optimizer and trainer entries are not weights.
    saved = {k[len("model."):]: tuple(v.size) for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}
    _check_same(p, model, saved)
    try:
        with torch.no_grad():
            load_state_dict_into(model, ckpt)
    except BraidError as exc:
        raise ConfigError(f"config key '{KEY}' = '{path}': {exc}") from None
    return str(ckpt)


def init_from_config(model: torch.nn.Module, cfg) -> list[str]:
    """``checkpoint.init_from``: a new run starts from those weights, unless the run resumes its own
    checkpoint (then the resumed weights win and this says so); returns the lines to log."""
    from braid.trainer.checkpoint import latest_checkpoint

    c = cfg.checkpoint
    if c.init_from is None:
        return []
    own = Path(c.resume) if c.resume not in ("auto", "none") else None
    if c.resume == "auto":
        own = latest_checkpoint(cfg.run_dir / "checkpoints")
    if own is not None:
        return [f"braid: {KEY}={c.init_from} ignored: resuming this run's checkpoint {own}"]
    loaded = load_init_weights(model, c.init_from)
    return [f"braid: initialised weights from {loaded} (new run: step 0, fresh optimizer and schedule)"]
