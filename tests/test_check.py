"""The concurrency checker: kvmem's protocols hold in every schedule within the bound; each
historic mistake is caught with a schedule that replays exactly; the search itself runs
every bounded schedule once; deadlocks, lost wake-ups and livelocks are reported."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

import kvmem
from kvmem import host, sync
from kvmem.check import (
    BUGS,
    SCENARIOS,
    Instance,
    Scenario,
    all_scenarios,
    explore,
    load_failure,
    replay,
    sched,
    twins_installed,
)
from kvmem.cli import main

# -- kvmem's scenarios ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_holds_in_every_schedule_within_bound_2(name: str) -> None:
    r = explore(SCENARIOS[name], bound=2)
    assert r.failure is None, r.failure.describe()
    assert r.complete
    # the search really interleaved the threads, up to the bound
    assert r.schedules > 20
    assert r.max_preemptions == 2


@pytest.mark.parametrize("name", list(BUGS))
def test_bug_variant_is_caught_and_its_schedule_replays(name: str, tmp_path: Path) -> None:
    r = explore(BUGS[name], bound=2)
    assert r.failure is not None, f"{name}: no failing schedule in {r.schedules}"
    assert r.failure.preemptions <= 2
    path = r.failure.save(tmp_path / "failure.json")
    data = json.loads(path.read_text())
    assert data["scenario"] == name and data["schedule"] == r.failure.schedule
    message, ex, _ = replay(path, all_scenarios())
    assert message is not None and not ex.diverged
    assert message.splitlines()[0] == r.failure.message.splitlines()[0]
    assert ex.decisions == r.failure.schedule
    assert [(s.thread, s.op) for s in ex.trace] == [(s.thread, s.op) for s in r.failure.trace]


def test_every_scenario_can_fail() -> None:
    """Each scenario is the base of at least one bug variant (caught above), and each
    variant patches a scenario that passes: no scenario is a test that cannot fail."""
    broken = {s.build for s in BUGS.values()}
    assert all(s.build in broken for s in SCENARIOS.values()), \
        [n for n, s in SCENARIOS.items() if s.build not in broken]
    base = {s.build for s in SCENARIOS.values()}
    for scenario in BUGS.values():
        assert scenario.expect_failure and scenario.patch is not None
        assert scenario.build in base


def test_patches_and_twins_are_gone_after_exploring() -> None:
    real = (sync.Mutex, sync.Atomic, sync.Srcu, sync.pause, host.guard, host.notifiers,
            kvmem.Vm._apply_batch, kvmem.mmu.Mmu.range_add)
    explore(BUGS["bug:delete-then-create"], bound=2)
    explore(BUGS["bug:range-add-keeps-last"], bound=2)
    assert (sync.Mutex, sync.Atomic, sync.Srcu, sync.pause, host.guard, host.notifiers,
            kvmem.Vm._apply_batch, kvmem.mmu.Mmu.range_add) == real
    # and real kvmem still works: memory made during exploring is unmapped and forgotten
    with kvmem.HostMemory.anonymous(1 << 16) as mem:
        vm = kvmem.Vm()
        vm.set_memory_region(0, 0, 0, 1 << 16, mem.hva)
        vm.write(0x100, b"after")
        assert vm.read(0x100, 5) == b"after"
    assert all(not m.closed for m in host.mappings())


# -- the search ---------------------------------------------------------------------------


def _toy(name: str, make: Callable[[], Instance]) -> Scenario:
    return Scenario(name, name, make)


def _steps(n: int) -> Callable[[], Instance]:
    def build() -> Instance:
        cell = sync.Atomic(0)

        def body() -> None:
            for _ in range(n):
                cell.load()

        return Instance([("a", body), ("b", body)])

    return build


def _bounded_interleavings(m: int, bound: int) -> int:
    """Interleavings of two threads of `m` steps each with at most `bound` switches away
    from a thread that had steps left (the oracle for the search)."""
    count = 0
    for positions in itertools.combinations(range(2 * m), m):
        order = [1] * (2 * m)
        for p in positions:
            order[p] = 0
        left = [m, m]
        pre = 0
        for prev, cur in itertools.pairwise(order):
            left[prev] -= 1
            if cur != prev and left[prev] > 0:
                pre += 1
        count += pre <= bound
    return count


@pytest.mark.parametrize("bound", [0, 1, 2, 3])
def test_search_runs_each_schedule_within_the_bound_exactly_once(bound: int) -> None:
    r = explore(_toy("steps", _steps(3)), bound=bound)
    assert r.failure is None
    # each thread's steps: its start and 3 loads
    assert r.schedules == _bounded_interleavings(4, bound)
    assert r.max_preemptions == bound


def _lost_update() -> Instance:
    counter = sync.Atomic(0)

    def inc() -> None:
        counter.store(counter.load() + 1)  # not `add`: a read-modify-write race

    def check() -> None:
        assert counter.load() == 2, f"lost update: counter is {counter.load()}"

    return Instance([("a", inc), ("b", inc)], check)


def test_race_needs_one_preemption() -> None:
    assert explore(_toy("lost update", _lost_update), bound=0).failure is None
    r = explore(_toy("lost update", _lost_update), bound=1)
    assert r.failure is not None and "lost update" in r.failure.message
    assert r.failure.preemptions == 1


def _lock_order_inversion() -> Instance:
    a, b = sync.Mutex("A"), sync.Mutex("B")

    def ab() -> None:
        with a, b:
            pass

    def ba() -> None:
        with b, a:
            pass

    return Instance([("ab", ab), ("ba", ba)])


def test_deadlock_is_reported_with_a_replayable_schedule(tmp_path: Path) -> None:
    toy = _toy("lock order", _lock_order_inversion)
    r = explore(toy, bound=2)
    assert r.failure is not None
    assert r.failure.message.startswith("deadlock")
    assert "lock A (wait)" in r.failure.message and "lock B (wait)" in r.failure.message
    path = r.failure.save(tmp_path / "deadlock.json")
    message, ex, _ = replay(path, {"lock order": toy})
    assert message == r.failure.message and ex.decisions == r.failure.schedule


def _lost_wakeup(notify: bool) -> Callable[[], Instance]:
    def build() -> Instance:
        mutex = sync.Mutex("m")
        cond = sync.Condition(mutex)
        state = {"ready": False}

        def waiter() -> None:
            with mutex:
                cond.wait_until(lambda: state["ready"])

        def setter() -> None:
            with mutex:
                state["ready"] = True
                if notify:
                    cond.notify_all()

        return Instance([("waiter", waiter), ("setter", setter)])

    return build


def test_missing_notify_is_a_deadlock() -> None:
    assert explore(_toy("notify", _lost_wakeup(True)), bound=2).failure is None
    r = explore(_toy("no notify", _lost_wakeup(False)), bound=2)
    assert r.failure is not None and r.failure.message.startswith("deadlock")
    assert "waiter blocked at wait m" in r.failure.message


def _spin(set_flag: bool) -> Callable[[], Instance]:
    def build() -> Instance:
        flag = sync.Atomic(False)

        def spinner() -> None:
            while not flag.load():
                sync.pause()

        def setter() -> None:
            if set_flag:
                flag.store(True)

        return Instance([("spinner", spinner), ("setter", setter)])

    return build


def test_busy_wait_ends_and_a_hopeless_one_is_reported() -> None:
    r = explore(_toy("spin", _spin(True)), bound=2)
    assert r.failure is None and r.schedules > 1
    r = explore(_toy("spin forever", _spin(False)), bound=2)
    assert r.failure is not None
    assert "spinner paused, nobody else can change anything" in r.failure.message


def _torn_pair(locked: bool) -> Callable[[], Instance]:
    """A writer updates two fields under a rwlock; a reader checks they agree."""

    def build() -> Instance:
        lock = sync.RwLock("pair")
        a, b = sync.Atomic(0), sync.Atomic(0)

        def writer() -> None:
            with lock.write():
                a.store(1)
                b.store(1)

        def reader() -> None:
            if locked:
                with lock.read():
                    x, y = a.load(), b.load()
            else:
                x, y = a.load(), b.load()
            assert x == y, f"torn read {x}, {y}"

        return Instance([("writer", writer), ("reader", reader)])

    return build


def test_rwlock_twin_excludes_readers_from_a_write() -> None:
    assert explore(_toy("locked", _torn_pair(True)), bound=2).failure is None
    r = explore(_toy("unlocked", _torn_pair(False)), bound=2)
    assert r.failure is not None and "torn read" in r.failure.message


def _srcu_reader_writer(grace: bool) -> Callable[[], Instance]:
    def build() -> Instance:
        srcu = sync.Srcu("s")
        published = sync.Atomic("old")
        freed: set[str] = set()

        def reader() -> None:
            token = srcu.read_lock()
            value = published.load()
            sync.pause()  # a scheduling point while the value is in use
            assert value not in freed, f"use after free of {value!r}"
            srcu.read_unlock(token)

        def updater() -> None:
            published.store("new")
            if grace:
                srcu.synchronize()
            freed.add("old")

        return Instance([("reader", reader), ("updater", updater)])

    return build


def test_srcu_twin_grace_period() -> None:
    assert explore(_toy("grace", _srcu_reader_writer(True)), bound=2).failure is None
    r = explore(_toy("no grace", _srcu_reader_writer(False)), bound=2)
    assert r.failure is not None and "use after free" in r.failure.message


def test_replay_that_cannot_be_followed_is_reported_as_diverged() -> None:
    toy = _toy("steps", _steps(2))
    data = {"format": "kvmem-check-schedule/1", "scenario": "steps", "schedule": [0, 7]}
    message, ex, _ = replay(data, {"steps": toy})
    assert ex.diverged and message is not None and "diverged" in message


def test_load_failure_refuses_other_files(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"format": "something else", "schedule": []}))
    with pytest.raises(ValueError, match="not a kvmem check schedule"):
        load_failure(p)


def test_twins_outside_an_execution_act_directly() -> None:
    with twins_installed():
        m = sync.Mutex("m")
        assert isinstance(m, sched.Mutex)
        with m:
            assert m.held()
        a = sync.Atomic(1)
        assert a.add(2) == 3 and a.value == 3
        s = sync.Srcu("s")
        with s.read():
            assert s.in_read_section()
        s.synchronize()
        assert s.grace_periods == 1
    assert not isinstance(sync.Mutex("m"), sched.Mutex)


# -- the command ------------------------------------------------------------------------


def test_cli_check_runs_scenarios_catches_bugs_and_replays(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "results.json"
    rc = main(["check", "delete-vs-accessor", "bug:no-grace-period", "--save-dir",
               str(tmp_path), "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "delete-vs-accessor" in out and "pass" in out and "caught" in out
    results = json.loads(out_json.read_text())
    assert [s["name"] for s in results["scenarios"]] == ["delete-vs-accessor",
                                                         "bug:no-grace-period"]
    assert results["scenarios"][0]["schedules"] > 20
    saved = Path(results["scenarios"][1]["saved"])
    assert saved.exists()
    assert main(["check", "--replay", str(saved)]) == 1
    assert "fails again" in capsys.readouterr().out


def test_cli_check_fails_when_a_scenario_fails(tmp_path: Path) -> None:
    # a bug variant named on its own is run as a scenario that must be caught: caught → 0;
    # with a bound too small to find it, it is missed → 1
    assert main(["check", "bug:no-grace-period", "--save-dir", str(tmp_path)]) == 0
    assert main(["check", "bug:no-grace-period", "--bound", "0", "--save-dir",
                 str(tmp_path)]) == 1
