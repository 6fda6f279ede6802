"""The benchmarks keep running (quick mode) and write well-formed JSON; their targets are
judged in benchmarks/, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_all_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert {"bench_access", "bench_translate", "bench_slots", "bench_mmu"} <= names, names
    for bench in data["benchmarks"]:
        for fig in bench["figures"]:
            assert fig["subject_ns"] > 0 and fig["baseline_ns"] > 0, fig
            assert fig["ratio"] > 0
