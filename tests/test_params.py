"""``python -m braid.params``: every real-size preset shows its published parameter count, or says why
there is none."""

from __future__ import annotations

import re

from braid.models.presets import preset_names
from braid.params import PUBLISHED, NoFigure, is_real_size, main

REAL = [n for n in preset_names() if is_real_size(n)]


def test_published_table_lists_exactly_the_real_presets():
    assert REAL and all(not n.endswith("-tiny") for n in REAL)
    assert sorted(PUBLISHED) == REAL


def test_every_real_preset_prints_a_figure_or_an_explicit_none(capsys):
    main(REAL)
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == REAL
    for name, row in zip(REAL, rows):
        note = row.split(None, 5)[5]  # after name, params, active, non-emb, GFLOP/tok
        if isinstance(PUBLISHED[name], NoFigure):
            assert note.startswith("none: ") and len(note) > len("none: ") + 20, note
            continue
        # A figure, how far the preset is from it (a typo in a figure shows up here) and its source.
        deviations = [float(d) for d in re.findall(r"\(([+-]\d+\.\d)%", note)]
        assert deviations and all(abs(d) < 20 for d in deviations), note
        assert note.endswith("]") and "  [" in note, note
