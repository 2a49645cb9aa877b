"""bench/cp_comm.py runs and every counted byte figure equals its scheme's formula (cp 2, short)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cp_comm_bench_counts_equal_formulas(tmp_path):
    out = tmp_path / "cp_comm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cp_comm.py"), "--cp", "2", "--seq-len", "256",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["kind"] for r in result["rows"]} >= {"ring", "s2", "tree", "ulysses", "any (zigzag)"}
    assert all(r["formula_matches"] for r in result["rows"]), [r for r in result["rows"] if not r["formula_matches"]]
    assert result["balance"]["full causal"]["zigzag"] <= 0.01
