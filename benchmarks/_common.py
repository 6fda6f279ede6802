"""Shared harness of the kvmem benchmarks (not a benchmark itself).

Every figure compares a *subject* (kvmem) against a *baseline* measured in the same run,
interleaved round by round, so machine noise hits both alike. Samples are nanoseconds per
operation (a sample is one timed batch divided by its operation count, or one timed
operation). A figure reports the best and the median of each side; PASS/MISS is decided on
the ratio of the *best* samples (best-of-N is the least noise-sensitive estimate on a busy
2-core machine); the median ratio is shown beside it.

Ratio direction, per figure:
- kind "time":       ratio = subject time / baseline time   (lower is better; target "<= x")
- kind "throughput": ratio = baseline time / subject time   (= kvmem throughput relative to
                     the baseline's; higher is better; target ">= x")
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

now_ns = time.perf_counter_ns
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# arguments


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds in total: fewer rounds, smaller large-slot setups")
    p.add_argument("--strict", action="store_true", help="exit with status 1 on any MISS")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# timing


def quiet_gc() -> None:
    """Collect, freeze what survives (the setup's objects), and leave the collector off while
    timing — as `timeit` does — so a full collection over a 32k-slot heap lands in no one
    sample. Call after setup."""
    gc.collect()
    gc.freeze()
    gc.disable()


def interleave(batches: dict[str, tuple[Callable[[int], None], int]], rounds: int,
               warmup: int = 1) -> dict[str, list[float]]:
    """Run every batch once per round, rotating the order each round; return, per key, the
    ns per operation of each round. `batches[key] = (run, ops)`: `run(r)` does `ops`
    operations in round `r` (every key gets the same `r` in a round, so subject and
    baseline can work on the same slice of pre-generated inputs). Keep a batch short
    (~1 ms): on a shared machine a short batch has a fair chance to run unpreempted, and
    best-of-N picks those."""
    keys = list(batches)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(warmup + rounds):
        shift = r % len(keys)
        order = keys[shift:] + keys[:shift]
        if r % 2:
            order.reverse()
        for k in order:
            run, ops = batches[k]
            t0 = now_ns()
            run(r)
            t1 = now_ns()
            if r >= warmup:
                out[k].append((t1 - t0) / ops)
    return out


# ------------------------------------------------------------------------------------------
# figures


@dataclass
class Figure:
    name: str
    subject: list[float]
    baseline: list[float]
    kind: str = "time"  # or "throughput"
    target: float | None = None
    subject_label: str = "kvmem"
    baseline_label: str = "baseline"
    note: str = ""
    id: str = ""  # stable identifier (names carry slot counts, which --quick changes)

    @property
    def subject_ns(self) -> float:
        return min(self.subject)

    @property
    def baseline_ns(self) -> float:
        return min(self.baseline)

    @property
    def subject_median_ns(self) -> float:
        return statistics.median(self.subject)

    @property
    def baseline_median_ns(self) -> float:
        return statistics.median(self.baseline)

    def _ratio(self, s: float, b: float) -> float:
        return b / s if self.kind == "throughput" else s / b

    @property
    def ratio(self) -> float:
        return self._ratio(self.subject_ns, self.baseline_ns)

    @property
    def ratio_median(self) -> float:
        return self._ratio(self.subject_median_ns, self.baseline_median_ns)

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "info"
        return f"≥ {self.target:g}" if self.kind == "throughput" else f"≤ {self.target:g}"

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.kind == "throughput":
            return self.ratio >= self.target
        return self.ratio <= self.target

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id or self.name,
            "subject_ns": round(self.subject_ns, 1),
            "baseline_ns": round(self.baseline_ns, 1),
            "ratio": round(self.ratio, 4),
            "target": None if self.target is None else
            (">=" if self.kind == "throughput" else "<=") + f"{self.target:g}",
            "pass": self.passed,
            "kind": self.kind,
            "ratio_means": ("baseline_ns / subject_ns (subject throughput relative to "
                            "baseline; higher is better)") if self.kind == "throughput" else
                           "subject_ns / baseline_ns (lower is better)",
            "subject": self.subject_label,
            "baseline": self.baseline_label,
            "subject_median_ns": round(self.subject_median_ns, 1),
            "baseline_median_ns": round(self.baseline_median_ns, 1),
            "ratio_median": round(self.ratio_median, 4),
            "samples": [len(self.subject), len(self.baseline)],
            "note": self.note,
        }


def fmt_ns(ns: float) -> str:
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.2f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


@dataclass
class Report:
    name: str
    title: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "quick": self.quick,
            "params": self.params,
            "figures": [f.as_json() for f in self.figures],
            "notes": self.notes,
            "all_pass": all(f.passed is not False for f in self.figures),
            "wall_s": round(time.perf_counter() - self.started, 2),
            "host": host_info(),
        }

    def print(self) -> None:
        caption = ", ".join(f"{k}={v}" for k, v in self.params.items())
        rows = []
        for f in self.figures:
            result = {True: "PASS", False: "MISS", None: "—"}[f.passed]
            rows.append((
                f.name,
                f"{fmt_ns(f.subject_ns)} ({fmt_ns(f.subject_median_ns)})",
                f"{fmt_ns(f.baseline_ns)} ({fmt_ns(f.baseline_median_ns)})",
                f"{f.ratio:.3f} ({f.ratio_median:.3f})",
                f.target_text,
                result,
            ))
        headers = ("figure", "kvmem best (median)", "baseline best (median)",
                   "ratio best (median)", "target", "result")
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # plain text
            print(f"\n{self.title}" + (" [quick]" if self.quick else ""))
            if caption:
                print(f"  {caption}")
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
            print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        else:
            console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
            table = Table(title=self.title + (" [quick]" if self.quick else ""),
                          caption=caption or None, title_justify="left")
            for i, h in enumerate(headers):
                table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
            for r, f in zip(rows, self.figures, strict=True):
                style = {True: "green", False: "bold red", None: "dim"}[f.passed]
                table.add_row(*r[:-1], f"[{style}]{r[-1]}[/]")
            console.print(table)
        for f in self.figures:
            if f.note:
                print(f"  · {f.name}: {f.note}")
        for n in self.notes:
            print(f"  · {n}")
        print("  ratio: 'time' figures = kvmem/baseline time (lower is better); "
              "'throughput' figures (target ≥) = baseline time/kvmem time, i.e. kvmem "
              "throughput relative to the baseline. PASS/MISS uses the best-of-N ratio.")

    def finish(self, args: Any) -> int:
        self.print()
        if args.json:
            Path(args.json).write_text(json.dumps(self.as_json(), indent=2) + "\n")
        missed = [f.name for f in self.figures if f.passed is False]
        return 1 if (missed and args.strict) else 0


# ------------------------------------------------------------------------------------------
# host


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


_HOST: dict[str, Any] | None = None


def host_info() -> dict[str, Any]:
    global _HOST
    if _HOST is None:
        try:
            import kvmem
            version = getattr(kvmem, "__version__", "?")
        except Exception:  # pragma: no cover - reported, not fatal
            version = "not importable"
        status = _git("status", "--porcelain", "--", "src")
        _HOST = {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "kvmem_version": version,
            "git_commit": _git("rev-parse", "HEAD"),
            "src_dirty": None if status is None else bool(status),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    return _HOST
