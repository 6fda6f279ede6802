"""Nothing leaks through a reset (issue 11, point 6): random guest programs run from one
snapshot with host changes mixed in, and after every `vm.restore(snap)` the memory (all of
it), the layout, the vCPU state (TSC excepted), the dirty logs and the tracked pages are
the snapshot's — hundreds of times, on every engine.

Nothing here is a second generator or a second harness: the programs are the engine issue's
(`kvmem.guests.randprog`, both modes) and the VM, its layout, its host actions and its runs
are the differential test's (`kvmem.difftest.Runner` under a plan, `difftest.schedule` for
the steps: runs with host actions at their exits, harvests with GET and CLEAR, `vm.write`,
split / merge / move transactions, discards, tracking and logging on / off). Each engine
gets one VM per (mode, log: bitmaps, bitmaps under manual protect, rings) — the layout of a
fixed plan — and one snapshot of it, taken after a first run and harvest left dirty bits
and state behind; every example then loads a new random program (a host write into the
snapshot's memory), runs its schedule and restores. On kvmem alone (no engine to run code)
a run is the same number of random stores through the accessor path (`vcpu.guest_write`,
refused ones included) and a new vCPU state.

The dirty ring gets the same VMs with rings on (`Runner(ring=)`; harvest actions and
DIRTY_RING_FULL exits harvest and reset the rings). A ring is a queue KVM owns — a restore
cannot take back an entry KVM pushed into the kernel's ring — so a restore leaves the rings
alone, as a VMM's memcpy under KVM does: it adds no entry (its copies are not guest writes)
and takes none (the guest's writes since the last harvest are still there to harvest), and
the pages it copied back are logged again when the guest next writes them. Checked after
every ring example: a last run made after a drain, its changed pages all in the harvest —
the one before the restore, or the one after it (then none is lost; only where the layout
is the snapshot's, since entries name slots as they were when pushed); nothing harvested
after the restore when the harvest came before it; and one more run after the restore,
whose changed pages are all in the rings again.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kvmem
from kvmem import difftest
from kvmem.cpu.state import MSR_IA32_TSC, VcpuState
from kvmem.guests import randprog
from kvmem.uapi import PAGE_SIZE

RING_BYTES = 1 << 20  # the largest ring: this host's KVM logs an entry per emulated write
EXAMPLES = int(os.environ.get("KVMEM_RESET_EXAMPLES", "200"))
SLOW_EXAMPLES = int(os.environ.get("KVMEM_RESET_SLOW_EXAMPLES", "1500"))
WINDOW = difftest.WINDOW_PAGES * PAGE_SIZE


def _no_clock(state: VcpuState) -> VcpuState:
    """The state without its clock (the TSC moves between two reads)."""
    return state.with_msrs({MSR_IA32_TSC: 0})


@dataclass(repr=False)
class Base:
    """One VM of the run, its snapshot and what the VM looked like at the snapshot."""

    plan: difftest.Plan
    runner: difftest.Runner
    snap: kvmem.Snapshot
    logging: set[int]
    image: Image
    state: VcpuState


class Image(NamedTuple):
    layout: tuple[tuple[int, int, int, int, int], ...]
    memory: bytes
    dirty: tuple[tuple[int, bytes], ...]
    tracked: tuple[int, ...]


def _image(r: difftest.Runner, logging: set[int], ring: bool = False) -> Image:
    """Everything a restore brings back that the VM shows: layout, all the guest memory
    (every slot's), the dirty bitmaps of the slots that logged at the snapshot, tracked
    gfns. (Host memory behind no slot — the window's pages under its holes — is not the
    VM's: a snapshot does not hold it and a restore leaves it alone.)"""
    vm = r.vm
    slots = vm.slots()
    layout = tuple((s.id, s.flags, s.gpa, s.size, s.hva) for s in slots)
    memory = b"".join(vm.read(s.gpa, s.size) for s in slots)
    dirty = () if ring else tuple((sid, vm.get_dirty_log(sid)) for sid in sorted(logging))
    return Image(layout, memory, dirty, tuple(vm.page_track.tracked_gfns()))


def _base(engine: str | None, mode: str, log: str) -> Base:
    manual = log == "manual"
    seed = next(s for s in range(1000)
                if (p := difftest.plan(s, mode, runs=0)).manual == manual
                and p.low_flags and any(sl.flags & difftest.LOG for sl in p.slots.values()))
    p = difftest.plan(seed, mode, runs=0)
    ring = log == "ring"
    r = difftest.Runner(p, engine, ring=RING_BYTES if ring else 0)
    logging = set(r.logging)
    if engine is not None:
        r.run(1, {})  # a first run: the vCPU halted, guest-dirtied pages
    else:
        r.cpu.set_state(r.state)
        r.vm.write(difftest.CODE + 0x9000, b"dirty before the snapshot")
    r.act(("harvest", 0x5555))  # a harvest that (under manual protect) leaves some bits set
    r.vm.write(difftest.CODE + 0x8000, b"dirty before the snapshot")
    snap = r.vm.snapshot()
    r.events.clear()
    return Base(p, r, snap, logging, _image(r, logging, ring), r.cpu.get_state())


class _Bases(dict[tuple[str, str], Base]):
    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"<{len(self)} VMs>"


@pytest.fixture
def bases(engine: str | None) -> Iterator[dict[tuple[str, str], Base]]:
    made = _Bases()
    yield made
    for b in made.values():
        b.runner.close()


def _accessor_run(r: difftest.Runner, rng: random.Random, pass_no: int,
                  mid: dict[int, list[difftest.Action]]) -> None:
    """A run on kvmem alone: random guest stores (1-8 bytes anywhere in the window, page
    crossing ones, runs over pages), host actions between them as at a run's exits, and a
    new vCPU state."""
    cpu = r.cpu
    for i in range(12):
        n = rng.choice((1, 2, 4, 8)) if rng.random() < 0.8 else rng.randrange(1, 3 * PAGE_SIZE)
        gpa = difftest.DATA + rng.randrange(WINDOW - n)
        if rng.random() < 0.3:
            gpa = difftest.DATA + rng.randrange(1, difftest.WINDOW_PAGES) * PAGE_SIZE - n // 2
        data = rng.randbytes(n)
        with contextlib.suppress(kvmem.KvmError, kvmem.MmioExit):  # read-only slots, holes
            cpu.guest_write(gpa, data)
        for a in mid.get(i, []):
            r.act(a)
    cpu.set_state(r.state.with_regs(rbp=pass_no, rbx=rng.getrandbits(32)))


def _run(r: difftest.Runner, engine: str | None, rng: random.Random, pass_no: int,
         mid: dict[int, list[difftest.Action]]) -> None:
    if engine is not None:
        r.run(pass_no, mid)
    else:
        _accessor_run(r, rng, pass_no, mid)


def _changed_pages(r: difftest.Runner, before: bytes) -> set[int]:
    """The host pages (hvas) of slots that log now whose bytes differ from `before` (a
    `Runner.memory()`): what a run wrote there, when the layout did not change meanwhile."""
    now = r.memory()
    out = set()
    for s in r.vm.slots():
        if s.id not in r.logging:
            continue
        for hva in range(s.hva, s.hva + s.size, PAGE_SIZE):
            if r.low.hva <= hva < r.low.hva + difftest.LOW_SIZE:
                at = hva - r.low.hva
            else:
                at = difftest.LOW_SIZE + hva - r.window.hva
            if now[at:at + PAGE_SIZE] != before[at:at + PAGE_SIZE]:
                out.add(hva)
    return out


def _logged_run(r: difftest.Runner, engine: str | None, rng: random.Random,
                pass_no: int) -> set[int]:
    """A run with no host action in it, from empty rings: the pages it changed in logging
    slots (each must reach a ring)."""
    r.ring_harvest()
    r.ring_seen.clear()
    before = r.memory()
    _run(r, engine, rng, pass_no, {})
    return _changed_pages(r, before)


def _case(engine: str | None, bases: dict[tuple[str, str], Base], seed: int, mode: str,
          log: str) -> None:
    key = (mode, log)
    if key not in bases:
        bases[key] = _base(engine, mode, log)
    b = bases[key]
    r, vm = b.runner, b.runner.vm
    ring = log == "ring"
    rng = random.Random(seed)
    program = randprog.generate(rng.getrandbits(32), mode, (difftest.DATA, difftest.WINDOW_PAGES),
                                (difftest.MMIO, difftest.MMIO_PAGES))
    vm.write(difftest.CODE, program.code)
    r.logging = set(b.logging)
    steps: list[tuple[str, Any]] = difftest.schedule(rng, b.plan.slots, rng.randint(1, 2))
    for kind, arg in steps:
        if kind == "act":
            r.act(arg)
        else:
            _run(r, engine, rng, *arg)
    context = f"seed {seed}, {mode}, {log}; steps:\n" + "\n".join(r.events)
    if ring:
        written = _logged_run(r, engine, rng, 0x77)
        # entries name (slot, offset) as the slot was when KVM pushed them: a VMM harvests
        # before it changes the layout (QEMU flushes the rings before it removes a slot),
        # and so does this test before a restore that puts the snapshot's layout back
        layout = tuple((s.id, s.flags, s.gpa, s.size, s.hva) for s in vm.slots())
        early = layout != b.image.layout or rng.random() < 0.5
        if early:
            r.ring_harvest()
        seen_before = set(r.ring_seen)
    vm.restore(b.snap)
    r.events.clear()
    _check(r, b, context)
    if not ring:
        return
    after = r.ring_harvest()
    if early:
        assert after == set(), f"the restore added ring entries {sorted(after)}: {context}"
    lost = written - seen_before - after
    assert not lost, f"ring entries lost over the restore: {sorted(lost)}: {context}"
    r.logging = set(b.logging)
    written = _logged_run(r, engine, rng, 0x78)
    missed = written - r.ring_seen - r.ring_harvest()
    assert not missed, f"pages written after the restore not logged: {sorted(missed)}: {context}"
    vm.restore(b.snap)
    _check(r, b, context + "\n(a run after the restore, restored again)")


def _check(r: difftest.Runner, b: Base, context: str) -> None:
    got = _image(r, b.logging, bool(r.vm.dirty_ring_size))
    assert got.layout == b.image.layout, f"layout differs: {context}"
    if got.memory != b.image.memory:
        at = next(i for i, (x, y) in enumerate(zip(got.memory, b.image.memory, strict=True))
                  if x != y)
        pytest.fail(f"memory differs at byte {at:#x} (of the slots' in order): {context}")
    assert got.dirty == b.image.dirty, f"dirty logs differ: {context}"
    assert got.tracked == b.image.tracked, f"tracked gfns differ: {context}"
    assert _no_clock(r.cpu.get_state()) == _no_clock(b.state), f"vCPU state: {context}"


# no shrinking: a smaller seed is not a simpler case, and the report names the seed and
# every step already
_SETTINGS: dict[str, Any] = dict(
    deadline=None, derandomize=True, phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_CASES = dict(seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(randprog.MODES),
              log=st.sampled_from(("bitmap", "manual", "ring")))


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(**_CASES)
def test_nothing_leaks_through_a_reset(engine: str | None,
                                       bases: dict[tuple[str, str], Base], seed: int,
                                       mode: str, log: str) -> None:
    _case(engine, bases, seed, mode, log)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KVMEM_SLOW") != "1", reason="set KVMEM_SLOW=1")
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(**_CASES)
def test_nothing_leaks_through_a_reset_many(engine: str | None,
                                            bases: dict[tuple[str, str], Base], seed: int,
                                            mode: str, log: str) -> None:
    _case(engine, bases, seed, mode, log)
