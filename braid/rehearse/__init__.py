"""``python -m braid.rehearse``: will a config fit, and what does one step of one rank hold and send, at the world
size it is for? See :mod:`braid.rehearse.step` (how) and :mod:`braid.rehearse.__main__` (the command)."""

from braid.rehearse.step import Rehearsal, rehearse

__all__ = ["Rehearsal", "rehearse"]
