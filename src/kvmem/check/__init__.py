"""kvmem's concurrency checker: explore thread interleavings of kvmem's protocols.

Defines:
- `explore(scenario, bound=2)` — run every schedule of a scenario with at most `bound`
  preemptions under a deterministic scheduler; the `Result` says how many ran and holds
  the first `Failure` (a violated invariant, a deadlock), whose schedule `save`s as JSON.
- `replay(file, scenarios)` — run a saved schedule again, exactly.
- `SCENARIOS` — kvmem's protocols, run by the real code; `BUGS` — the same scenarios with
  one historic mistake each, which the checker must catch.
- `twins_installed()` — `kvmem.sync` with scheduler-aware twins, for custom scenarios.

How it works is in `sched` (the scheduler and the twins) and `explore` (the search).
"""

from __future__ import annotations

from .bugs import BUGS
from .explore import (
    Failure,
    Instance,
    Result,
    Scenario,
    explore,
    format_trace,
    load_failure,
    replay,
    twins_installed,
)
from .scenarios import SCENARIOS

__all__ = [
    "BUGS",
    "SCENARIOS",
    "Failure",
    "Instance",
    "Result",
    "Scenario",
    "all_scenarios",
    "explore",
    "format_trace",
    "load_failure",
    "replay",
    "twins_installed",
]


def all_scenarios() -> dict[str, Scenario]:
    """Every named scenario, the correct ones and the bug variants (for `replay`)."""
    return {**SCENARIOS, **BUGS}
