"""What `kvmem check` prints: a progress bar while scenarios run, then one row per
scenario (schedules explored, preemptions used, time, verdict), each failure with its
schedule, and where the schedule was saved.

Rules of this room: presentation only. Exploring is `explore`'s; the scenarios are
`scenarios`' and `bugs`'. Every figure printed is also in `--json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .bugs import BUGS
from .explore import Result, Scenario, explore, format_trace, load_failure, replay
from .scenarios import SCENARIOS

__all__ = ["list_scenarios", "replay_file", "run"]


def list_scenarios(console: Console) -> int:
    for name, scenario in {**SCENARIOS, **BUGS}.items():
        console.print(f"[bold]{name}[/bold]: {scenario.description}")
    return 0


def _select(names: Sequence[str], bugs: bool) -> list[Scenario]:
    known = {**SCENARIOS, **BUGS}
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"kvmem check: unknown scenario(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
        return [known[n] for n in names]
    return list(SCENARIOS.values()) + (list(BUGS.values()) if bugs else [])


def _verdict(scenario: Scenario, r: Result) -> tuple[str, bool]:
    if scenario.expect_failure:
        return ("[green]caught[/green]", True) if r.failure else ("[bold red]MISSED[/]", False)
    if r.failure:
        return "[bold red]FAIL[/]", False
    if not r.complete:
        return "[yellow]incomplete[/yellow]", False
    return "[green]pass[/green]", True


def run(names: Sequence[str], console: Console, *, bound: int = 2, bugs: bool = False,
        save_dir: str = ".", max_schedules: int | None = None,
        json_path: str | None = None) -> int:
    scenarios = _select(names, bugs)
    results: list[tuple[Scenario, Result]] = []
    t0 = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description:<32}"), BarColumn(),
               TextColumn("{task.fields[schedules]:>7} schedules"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for scenario in scenarios:
            task = progress.add_task(scenario.name, total=None, schedules=0)

            def tick(n: int, task: TaskID = task) -> None:
                if n % 25 == 0:
                    progress.update(task, schedules=n)

            r = explore(scenario, bound, max_schedules=max_schedules, progress=tick)
            progress.update(task, schedules=r.schedules, total=1, completed=1)
            results.append((scenario, r))
    table = Table(title=f"kvmem check — preemption bound {bound}", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col, justify in (("scenario", "left"), ("schedules", "right"),
                         ("max preemptions", "right"), ("time", "right"), ("verdict", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    ok = True
    saved: dict[str, str] = {}
    for scenario, r in results:
        verdict, good = _verdict(scenario, r)
        ok &= good
        used = str(r.max_preemptions) if r.failure is None else \
            f"{r.max_preemptions} (failing: {r.failure.preemptions})"
        table.add_row(scenario.name, str(r.schedules), used, f"{r.seconds:.1f} s", verdict)
        if r.failure is not None:
            path = Path(save_dir) / f"kvmem-check-{scenario.name.replace(':', '-')}.json"
            r.failure.save(path)
            saved[scenario.name] = str(path)
    console.print(table)
    for scenario, r in results:
        if r.failure is None:
            continue
        style = "green" if scenario.expect_failure else "bold red"
        console.print(f"[{style}]{scenario.name}[/]: {r.failure.describe()}", highlight=False)
        console.print(f"  saved: {saved[scenario.name]}  (replay: kvmem check --replay "
                      f"{saved[scenario.name]})\n", highlight=False)
    total = time.perf_counter() - t0
    console.print(f"{sum(r.schedules for _, r in results)} schedules in {total:.1f} s: "
                  + ("[green]all as expected[/green]" if ok else "[bold red]not all as "
                     "expected[/]"))
    if json_path is not None:
        Path(json_path).write_text(json.dumps({
            "bound": bound,
            "seconds": round(total, 2),
            "ok": ok,
            "scenarios": [{
                "name": s.name,
                "expect_failure": s.expect_failure,
                "schedules": r.schedules,
                "complete": r.complete,
                "max_preemptions": r.max_preemptions,
                "seconds": round(r.seconds, 2),
                "failure": None if r.failure is None else r.failure.message,
                "saved": saved.get(s.name),
            } for s, r in results],
        }, indent=2) + "\n")
    return 0 if ok else 1


def replay_file(path: str, console: Console) -> int:
    data = load_failure(path)
    failure, ex, _ = replay(data, {**SCENARIOS, **BUGS})
    names = list(data.get("threads") or [t.name for t in ex.threads])
    console.print(f"replaying [bold]{data['scenario']}[/bold] "
                  f"({len(data['schedule'])} choice points)", highlight=False)
    for line in format_trace(ex.trace, names):
        console.print("  " + line, highlight=False)
    if ex.diverged:
        console.print(f"[yellow]diverged[/yellow]: {failure}", highlight=False)
        return 2
    if failure is None:
        console.print("[green]passes now[/green] (recorded failure: "
                      f"{data.get('failure', '?').splitlines()[0]})", highlight=False)
        return 0
    same = failure.splitlines()[0] == str(data.get("failure", "")).splitlines()[0]
    console.print(f"[bold red]fails {'again' if same else 'differently'}[/]: {failure}",
                  highlight=False)
    return 1
