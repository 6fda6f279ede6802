"""Nothing leaks through a reset (issue 11, point 6): random guest programs run from one
snapshot with host changes mixed in, and after every `vm.restore(snap)` the memory (all of
it), the layout, the vCPU state (TSC excepted), the dirty logs and the tracked pages are
the snapshot's — hundreds of times, on every engine.

Nothing here is a second generator or a second harness: the programs are the engine issue's
(`kvmem.guests.randprog`, both modes) and the VM, its layout, its host actions and its runs
are the differential test's (`kvmem.difftest.Runner` under a plan, `difftest.schedule` for
the steps: runs with host actions at their exits, harvests with GET and CLEAR, `vm.write`,
split / merge / move transactions, discards, tracking and logging on / off). Each engine
gets one VM per (mode, manual dirty-log protect) — the layout of a fixed plan — and one
snapshot of it, taken after a first run and harvest left dirty bits and state behind; every
example then loads a new random program (a host write into the snapshot's memory), runs
its schedule and restores. On kvmem alone (no engine to run code) a run is the same number
of random stores through the accessor path (`vcpu.guest_write`, refused ones included) and
a new vCPU state.

Not here: the dirty ring (the plans log through bitmaps only).
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


def _image(r: difftest.Runner, logging: set[int]) -> Image:
    """Everything a restore brings back that the VM shows: layout, all the guest memory
    (every slot's), the dirty bitmaps of the slots that logged at the snapshot, tracked
    gfns. (Host memory behind no slot — the window's pages under its holes — is not the
    VM's: a snapshot does not hold it and a restore leaves it alone.)"""
    vm = r.vm
    slots = vm.slots()
    layout = tuple((s.id, s.flags, s.gpa, s.size, s.hva) for s in slots)
    memory = b"".join(vm.read(s.gpa, s.size) for s in slots)
    dirty = tuple((sid, vm.get_dirty_log(sid)) for sid in sorted(logging))
    return Image(layout, memory, dirty, tuple(vm.page_track.tracked_gfns()))


def _base(engine: str | None, mode: str, manual: bool) -> Base:
    seed = next(s for s in range(1000)
                if (p := difftest.plan(s, mode, runs=0)).manual == manual
                and p.low_flags and any(sl.flags & difftest.LOG for sl in p.slots.values()))
    p = difftest.plan(seed, mode, runs=0)
    r = difftest.Runner(p, engine)
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
    return Base(p, r, snap, logging, _image(r, logging), r.cpu.get_state())


class _Bases(dict[tuple[str, bool], Base]):
    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"<{len(self)} VMs>"


@pytest.fixture
def bases(engine: str | None) -> Iterator[dict[tuple[str, bool], Base]]:
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


def _case(engine: str | None, bases: dict[tuple[str, bool], Base], seed: int, mode: str,
          manual: bool) -> None:
    key = (mode, manual)
    if key not in bases:
        bases[key] = _base(engine, mode, manual)
    b = bases[key]
    r, vm = b.runner, b.runner.vm
    rng = random.Random(seed)
    program = randprog.generate(rng.getrandbits(32), mode, (difftest.DATA, difftest.WINDOW_PAGES),
                                (difftest.MMIO, difftest.MMIO_PAGES))
    vm.write(difftest.CODE, program.code)
    r.logging = set(b.logging)
    steps: list[tuple[str, Any]] = difftest.schedule(rng, b.plan.slots, rng.randint(1, 2))
    for kind, arg in steps:
        if kind == "act":
            r.act(arg)
        elif engine is not None:
            r.run(*arg)
        else:
            _accessor_run(r, rng, *arg)
    vm.restore(b.snap)
    got = _image(r, b.logging)
    context = f"seed {seed}, {mode}, manual={manual}; steps:\n" + "\n".join(r.events)
    r.events.clear()
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
              manual=st.booleans())


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(**_CASES)
def test_nothing_leaks_through_a_reset(engine: str | None,
                                       bases: dict[tuple[str, bool], Base], seed: int,
                                       mode: str, manual: bool) -> None:
    _case(engine, bases, seed, mode, manual)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KVMEM_SLOW") != "1", reason="set KVMEM_SLOW=1")
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(**_CASES)
def test_nothing_leaks_through_a_reset_many(engine: str | None,
                                            bases: dict[tuple[str, bool], Base], seed: int,
                                            mode: str, manual: bool) -> None:
    _case(engine, bases, seed, mode, manual)
