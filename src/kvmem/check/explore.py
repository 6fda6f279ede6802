"""Depth-first exploration of a scenario's schedules, with a preemption bound; failing
schedules as replayable JSON files.

Rules of this room:
- A `Scenario` is real kvmem code: `build()` makes fresh objects (a `Vm`, host memory...)
  with the twins installed and returns the threads to run, the final check and the
  clean-up. Nothing here knows what a scenario does.
- A schedule is the list of choices made at *choice points* (where more than one thread
  could run). Everything between two choice points is determined by the code, so the list
  replays an execution exactly.
- `explore` stops at the first failure: an exception escaping a thread (the scenario's
  assertions are the invariants), a failed final check, a deadlock, a livelock.

Theory of the search (CHESS's iterative context bounding, depth first): run the default
schedule, recording every choice point; then repeatedly take the deepest choice point with
an alternative not yet tried whose preemption cost stays within the bound, and run again
with the choices up to it fixed and the alternative taken there. Switching away from a
thread that could go on costs one preemption; switching because it blocked, paused or
finished is free. Every schedule with at most `bound` preemptions is run exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import host, sync
from . import sched

__all__ = [
    "Failure",
    "Instance",
    "Result",
    "Scenario",
    "explore",
    "format_trace",
    "load_failure",
    "replay",
    "twins_installed",
]

FORMAT = "kvmem-check-schedule/1"


@dataclass
class Instance:
    """One fresh copy of a scenario's world: its threads (name, body), the final check
    (raises AssertionError on a violated invariant) and the clean-up."""

    threads: list[tuple[str, Callable[[], None]]]
    check: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Scenario:
    """`build` is called once per schedule, with the twins installed. `patch`, if given, is
    entered around the whole exploration (a bug variant's one historic mistake)."""

    name: str
    description: str
    build: Callable[[], Instance]
    patch: Callable[[], AbstractContextManager[None]] | None = None
    expect_failure: bool = False  # a bug variant: the checker must find a failing schedule


@dataclass
class Failure:
    scenario: str
    message: str
    schedule: list[int]
    trace: list[sched.Step]
    thread_names: list[str]
    preemptions: int
    bound: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "scenario": self.scenario,
            "failure": self.message,
            "preemption_bound": self.bound,
            "preemptions": self.preemptions,
            "threads": self.thread_names,
            "schedule": self.schedule,
            "trace": format_trace(self.trace, self.thread_names, limit=None),
        }

    def save(self, path: str | Path) -> Path:
        """Write the failure as JSON (`schedule` on one line: the choices to replay)."""
        data = self.to_json()
        text = json.dumps({**data, "schedule": "@"}, indent=1, ensure_ascii=False)
        text = text.replace('"@"', json.dumps(data["schedule"], separators=(",", ":")))
        p = Path(path)
        p.write_text(text + "\n")
        return p

    def describe(self) -> str:
        """The failure, the schedule as runs of one thread, and how to replay it."""
        lines = [self.message, f"schedule ({self.preemptions} preemptions, "
                 f"{len(self.schedule)} choice points):"]
        lines += ["  " + line for line in format_trace(self.trace, self.thread_names)]
        return "\n".join(lines)


@dataclass
class Result:
    scenario: str
    schedules: int
    seconds: float
    bound: int
    failure: Failure | None = None
    complete: bool = True  # False: stopped at max_schedules before the bound was exhausted
    max_preemptions: int = 0  # the most preemptions any explored schedule used
    steps: int = 0  # scheduling points passed, over all schedules

    @property
    def ok(self) -> bool:
        return self.failure is None and self.complete


@contextmanager
def twins_installed() -> Iterator[None]:
    """Replace `kvmem.sync`'s classes by the scheduler-aware twins, and the module-level
    objects built from them at import (host memory's table, lock, grace period, epochs
    and notifier list) by twin-built ones, for the duration. Objects built inside see the
    twins; the host table's contents are carried over and back. A host page replacement
    becomes a scheduling point too."""
    saved = {name: getattr(sync, name) for name in sched.TWINS}
    for name, twin in sched.TWINS.items():
        setattr(sync, name, twin)
    saved_host = host.rebuild_shared_state()
    # the host replaces pages (madvise, mmap): not kvmem synchronization but the world
    # changing under it, and what `resolve` races with — a scheduling point
    host.page_replaced = lambda: sched.world_event("replace pages")
    try:
        yield
    finally:
        host.page_replaced = None
        host.restore_shared_state(saved_host)
        for name, real in saved.items():
            setattr(sync, name, real)


def _run_one(scenario: Scenario, choices: Sequence[int]
             ) -> tuple[sched.Execution, str | None, list[str]]:
    # fresh module-level objects per schedule: this schedule's VMs only hear host events,
    # and nothing a cut-short schedule left held or inside a read section carries over
    host.rebuild_shared_state()
    inst = scenario.build()
    names = [n for n, _ in inst.threads]
    ex = sched.Execution(inst.threads, choices)
    try:
        failure = ex.run()
        if failure is None:
            try:
                inst.check()
            except AssertionError as e:
                failure = f"final check: {e}"
                ex.failure = failure
    finally:
        inst.close()
    return ex, failure, names


def explore(scenario: Scenario, bound: int = 2, *, max_schedules: int | None = None,
            progress: Callable[[int], None] | None = None) -> Result:
    """Run every schedule of `scenario` with at most `bound` preemptions (or the first
    `max_schedules`), stopping at the first failure."""
    t0 = time.perf_counter()
    prefix: list[int] = []
    points: list[sched.ChoicePoint] = []
    tried: list[set[int]] = []
    result = Result(scenario.name, 0, 0.0, bound)
    patch = scenario.patch() if scenario.patch is not None else nullcontext()
    with twins_installed(), patch:
        while True:
            ex, failure, names = _run_one(scenario, prefix)
            result.schedules += 1
            result.steps += len(ex.trace)
            result.max_preemptions = max(result.max_preemptions, ex.preemptions)
            if progress is not None:
                progress(result.schedules)
            if failure is not None:
                result.failure = Failure(scenario.name, failure, list(ex.decisions),
                                         ex.trace, names, ex.preemptions, bound)
                break
            # the new choice points of this run extend the search stack
            for p, d in zip(ex.points[len(points):], ex.decisions[len(points):], strict=True):
                points.append(p)
                tried.append({d})
            nxt = _backtrack(points, tried, ex.decisions, bound)
            if nxt is None:
                break
            prefix = nxt
            if max_schedules is not None and result.schedules >= max_schedules:
                result.complete = False
                break
    result.seconds = time.perf_counter() - t0
    return result


def _backtrack(points: list[sched.ChoicePoint], tried: list[set[int]],
               decisions: list[int], bound: int) -> list[int] | None:
    """The next schedule to run: the deepest choice point with an untried alternative
    within the bound, taken; the points below it are forgotten. None when all are run."""
    for depth in range(len(points) - 1, -1, -1):
        p = points[depth]
        for alt in p.enabled:
            if alt not in tried[depth] and p.cost(alt) <= bound:
                tried[depth].add(alt)
                del points[depth + 1:]
                del tried[depth + 1:]
                return [*decisions[:depth], alt]
    return None


def replay(path_or_failure: str | Path | dict[str, Any], scenarios: dict[str, Scenario]
           ) -> tuple[str | None, sched.Execution, Scenario]:
    """Run the saved schedule again; returns (failure message or None, the execution,
    the scenario). The scenario is looked up by name in `scenarios`."""
    data = load_failure(path_or_failure)
    name = data["scenario"]
    if name not in scenarios:
        raise KeyError(f"no scenario named {name!r} (known: {', '.join(sorted(scenarios))})")
    scenario = scenarios[name]
    patch = scenario.patch() if scenario.patch is not None else nullcontext()
    with twins_installed(), patch:
        ex, failure, _ = _run_one(scenario, data["schedule"])
    return failure, ex, scenario


def load_failure(src: str | Path | dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = src if isinstance(src, dict) else json.loads(Path(src).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"not a kvmem check schedule (format {data.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if not isinstance(data.get("schedule"), list) or not all(
            isinstance(c, int) for c in data["schedule"]):
        raise ValueError("schedule must be a list of thread numbers")
    return data


def format_trace(trace: Sequence[sched.Step], names: Sequence[str], limit: int | None = 60
                 ) -> list[str]:
    """The schedule as runs of one thread: `name: first op … last op (n steps)`, with
    preemptions marked; at most `limit` lines (the end is kept, where failures are)."""
    runs: list[tuple[int, list[sched.Step]]] = []
    for step in trace:
        if runs and runs[-1][0] == step.thread and not step.preempted:
            runs[-1][1].append(step)
        else:
            runs.append((step.thread, [step]))
    lines = []
    for thread, steps in runs:
        mark = "⇢ preempt → " if steps[0].preempted else "→ "
        ops = ", ".join(s.op for s in steps) if len(steps) <= 3 else \
            f"{steps[0].op}, {steps[1].op} … {steps[-1].op} ({len(steps)} steps)"
        lines.append(f"{mark}{names[thread]}: {ops}")
    if limit is not None and len(lines) > limit:
        lines = [f"… {len(lines) - limit} earlier runs", *lines[-limit:]]
    return lines
