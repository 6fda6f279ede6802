"""Run every kvmem benchmark (each in its own process) and optionally combine their JSON.

    python benchmarks/run_all.py [--json FILE] [--quick] [--strict] [--only NAME ...]

Each `bench_*.py` beside this file runs as `python bench_x.py --json <tmp> [--quick]`; its
table goes straight to this process's stdout. `--json FILE` writes
{name, quick, host, all_pass, benchmarks: [<each script's JSON>], failed: [...]}.
Exit status: 1 if a script crashed (or, with --strict, if any figure is a MISS), else 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the combined figures to FILE")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--strict", action="store_true", help="exit 1 on any MISS")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these (e.g. bench_access or access)")
    args = p.parse_args(argv)

    todo = scripts()
    if args.only:
        want = {n.removesuffix(".py").removeprefix("bench_") for n in args.only}
        todo = [s for s in todo if s.stem.removeprefix("bench_") in want]
        if not todo:
            p.error(f"no benchmark matches {args.only}")

    results: list[dict[str, object]] = []
    failed: list[dict[str, object]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        for script in todo:
            out = Path(tmp) / f"{script.stem}.json"
            cmd = [sys.executable, str(script), "--json", str(out)]
            if args.quick:
                cmd.append("--quick")
            print(f"\n$ {' '.join([Path(cmd[0]).name, *cmd[1:2], *cmd[4:]])}", flush=True)
            rc = subprocess.run(cmd, cwd=HERE.parent, check=False).returncode
            if rc != 0 or not out.exists():
                failed.append({"name": script.stem, "returncode": rc})
                print(f"!! {script.stem} failed with status {rc}", flush=True)
                continue
            results.append(json.loads(out.read_text()))

    all_pass = all(r.get("all_pass", False) for r in results) and not failed
    misses = [f"{r['name']}: {f['name']}" for r in results
              for f in r["figures"] if f["pass"] is False]  # type: ignore[index, union-attr]
    print(f"\n{len(results)} benchmark(s) ran in {time.perf_counter() - t0:.1f} s; "
          f"{len(misses)} MISS" + (f", {len(failed)} failed" if failed else ""))
    for m in misses:
        print(f"  MISS {m}")
    if args.json:
        combined = {
            "name": "kvmem-benchmarks",
            "quick": args.quick,
            "host": C.host_info(),
            "all_pass": all_pass,
            "benchmarks": results,
            "failed": failed,
        }
        Path(args.json).write_text(json.dumps(combined, indent=2) + "\n")
    if failed:
        return 1
    return 1 if (args.strict and misses) else 0


if __name__ == "__main__":
    sys.exit(main())
