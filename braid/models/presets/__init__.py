"""Named model architectures: each YAML file here is a complete `model` section."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = _DIR / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(preset_names())})")
    from omegaconf import OmegaConf  # here: models import this module, and the GPU image has no omegaconf

    return OmegaConf.to_container(OmegaConf.load(path)) or {}
