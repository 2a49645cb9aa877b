"""ModelConfig ↔ plain nested dicts (config.json stores the braid model section as one)."""

from __future__ import annotations

import dataclasses

from braid.config import ModelConfig


def model_config_from_dict(d: dict) -> ModelConfig:
    """Nested dict (``dataclasses.asdict`` of a ModelConfig) → ModelConfig; unknown keys raise."""
    names = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"braid_model: unknown model keys {sorted(unknown)} (exported by a newer braid?)")
    kwargs = {}
    for key, value in d.items():
        f = names[key]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            value = type(f.default_factory())(**value)
        kwargs[key] = value
    return ModelConfig(**kwargs)
