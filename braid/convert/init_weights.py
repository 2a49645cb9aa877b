"""``checkpoint.init_from``: fill a freshly built model with another run's or a HF directory's weights.

Used by the trainer after the model is parallelised and its shards allocated: a braid checkpoint is
read shard by shard (DCP reads only the chunks this rank holds); a HF directory is converted on
each rank and each rank keeps its shard of every tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from braid.errors import BraidError, ConfigError

KEY = "checkpoint.init_from"


def _check_same(path: Path, model: torch.nn.Module, saved: dict[str, tuple]) -> None:
    """One line naming the config key when the saved weights do not fit ``model`` exactly."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise ConfigError(f"config key '{KEY}' = '{path}': another architecture (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    for k, shape in want.items():
        if saved[k] != shape:
            raise ConfigError(f"config key '{KEY}' = '{path}': {k} has shape {list(saved[k])}, "
                              f"this model's is {list(shape)}")


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict into ``model``, which may be parallelised: each rank keeps
    its own shard of every parameter."""
    from braid.parallel.materialize import fill_local, plain_name

    fill_local(model, lambda name, p: state[name])
    with torch.no_grad():
        for name, b in model.named_buffers():
            if plain_name(name) in state:
                b.copy_(state[plain_name(name)])


def load_init_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Copy the weights at ``path`` into ``model`` (a HybridLM, plain or parallelised) in place.

    ``path``: a braid DCP checkpoint (``step_N``, ``latest``, ``checkpoints/`` or the run dir; any
    parallel layout) or a HF directory that :func:`braid.convert.load` reads. Returns what was
    loaded, for the log. A shape or architecture mismatch raises ``ConfigError`` naming the key.
    """
    p = Path(path)
    if (p / "config.json").is_file():
        from braid.convert.hf_export import load_hf_dir

        try:
            source, _, hf = load_hf_dir(p)
        except (BraidError, ValueError, KeyError, FileNotFoundError) as exc:
            raise ConfigError(f"config key '{KEY}' = '{path}': {str(exc).splitlines()[0]}") from None
        state = source.state_dict()
        _check_same(p, model, {k: tuple(v.shape) for k, v in state.items()})
        load_full_state(model, state)
        return f"{p} ({(hf.get('architectures') or ['?'])[0]})"
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
