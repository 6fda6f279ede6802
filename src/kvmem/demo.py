"""`kvmem demo`: the bundled guests on the best engine here, with a live view.

Phases (under 30 s on KVM here):
1. boot — a 4 MiB dirty-logging RAM slot; the `walker` guest writes every page and reports a
   checksum, checked against the same computation in Python;
2. dirty-log rounds — the walker again with new seeds; each round's harvest must be exactly
   the pages it wrote;
3. write tracking — a page is write-tracked and the `poker` guest drives MMIO and ports; its
   6 writes to the tracked page must reach the notifier;
4. atomic reconfiguration — the `loop` guest runs while its slot is split and merged with
   kvmem transactions (no exit may reach the VMM), then with the naive delete-then-create
   sequence (the exits that do are counted).

The view shows the slots, exits by kind, dirty pages per round, tracked writes, and
transaction latency; a summary follows. Exit status 0 when every check held.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from .engines import Exit, ExitKind, Regs, atomic, kvm_usable
from .guests import program
from .host import HostMemory
from .uapi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE
from .vm import Vm

__all__ = ["DemoState", "run_demo"]

RAM = 4 << 20
CODE = 0x1000
MMIO = 0x1000_0000
TRACKED_GFN = 3


@dataclass
class DemoState:
    engine: str = "?"
    phase: str = "starting"
    checks: list[tuple[str, bool]] = field(default_factory=list)
    slots: list[tuple[str, str, str, str]] = field(default_factory=list)
    exits: Counter[str] = field(default_factory=Counter)
    dirty_rounds: list[int] = field(default_factory=list)
    tracked: list[tuple[int, bytes]] = field(default_factory=list)
    tx: atomic.Outcome | None = None
    naive: atomic.Outcome | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok in self.checks)


class _Notifier:
    def __init__(self, state: DemoState) -> None:
        self.state = state

    def track_write(self, gpa: int, data: bytes) -> None:
        self.state.tracked.append((gpa, data))

    def track_remove_region(self, gfn: int, npages: int) -> None:
        """The demo never deletes the tracked page's slot."""


def _checksum(start: int, end: int, stride: int, seed: int) -> int:
    s = 0
    for a in range(start, end, stride):
        s = ((s << 1) | (s >> 31)) & 0xFFFF_FFFF
        s ^= a ^ seed ^ 1
    return s


def _slots(vm: Vm) -> list[tuple[str, str, str, str]]:
    out = []
    for s in vm.slots(0):
        flags = ",".join(n for n, on in (("log", s.dirty_logging), ("ro", s.readonly)) if on)
        out.append((f"{s.as_id}:{s.id}", f"{s.gpa:#x}", f"{s.npages}", flags or "-"))
    return out


def _drive(vm: Vm, state: DemoState, name: str, regs: Regs) -> list[Exit]:
    assert vm.engine is not None
    cpu = vm.vcpus[0]
    vm.write(CODE, program(name))
    cpu.start(CODE, regs)
    exits = []
    while True:
        e = cpu.run()
        exits.append(e)
        kind = e.kind.value
        if e.kind in (ExitKind.IO, ExitKind.MMIO):
            kind += " write" if e.is_write else " read"
        state.exits[kind] += 1
        if e.reads:
            cpu.complete(bytes(range(0xA0, 0xA0 + e.size)))
        elif e.kind not in (ExitKind.IO, ExitKind.MMIO):
            return exits


def _bits(bitmap: bytes) -> int:
    return sum(bin(b).count("1") for b in bitmap)


def run_demo(engine: str, rounds: int, state: DemoState) -> None:
    """The four phases; progress and results go to `state`."""
    mem = HostMemory.anonymous(RAM)
    vm = Vm(engine=engine)
    assert vm.engine is not None
    state.engine = vm.engine.name
    try:
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, mem.hva)
        vm.create_vcpu(0)
        state.slots = _slots(vm)

        state.phase = "boot: walker writes every page and reports a checksum"
        vm.get_dirty_log(0)
        exits = _drive(vm, state, "walker",
                       Regs(esi=0x10000, ecx=RAM - 0x10000, edi=PAGE_SIZE, ebx=1, ebp=1))
        want = _checksum(0x10000, RAM, PAGE_SIZE, 1)
        state.checks.append(("walker checksum reported on port 0x10",
                             exits[0].data == want.to_bytes(4, "little")))
        state.dirty_rounds.append(_bits(vm.get_dirty_log(0)))

        state.phase = "dirty-log rounds: each harvest is exactly the pages written"
        for seed in (2, 3, 4):
            _drive(vm, state, "walker",
                   Regs(esi=0x10000, ecx=RAM - 0x10000, edi=PAGE_SIZE, ebx=seed, ebp=1))
            state.dirty_rounds.append(_bits(vm.get_dirty_log(0)))
        pages = (RAM - 0x10000) // PAGE_SIZE
        state.checks.append((f"every dirty-log round = {pages} walked pages (+ code load)",
                             all(n in (pages, pages + 1) for n in state.dirty_rounds)))

        state.phase = "write tracking: poker drives MMIO and ports, writes a tracked page"
        vm.page_track.register(_Notifier(state))
        vm.page_track.add_gfn(TRACKED_GFN)
        _drive(vm, state, "poker", Regs(esi=MMIO, edi=TRACKED_GFN * PAGE_SIZE, edx=0x40))
        state.checks.append(("6 guest writes to the tracked page notified",
                             len(state.tracked) == 6))
        vm.page_track.remove_gfn(TRACKED_GFN)
    finally:
        vm.engine.close()
        mem.close()

    state.phase = f"atomic reconfiguration: {rounds} splits + merges as transactions"
    state.tx = atomic.Outcome(state.engine, atomic.TRANSACTIONS.name)
    atomic.run(state.engine, rounds, into=state.tx)
    state.checks.append((f"{2 * rounds} transactions under a running guest: no exit, "
                         "no torn access", state.tx.clean and state.tx.rounds == rounds))
    naive_rounds = max(1, rounds // 4)
    state.phase = f"baseline: {naive_rounds} naive delete-then-create splits + merges"
    state.naive = atomic.Outcome(state.engine, atomic.NAIVE.name)
    atomic.run(state.engine, naive_rounds, atomic.NAIVE, into=state.naive)
    state.phase = "done"


def _render(state: DemoState) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_row("[b]engine[/]", state.engine, "[b]elapsed[/]",
                 f"{time.perf_counter() - state.started:.1f} s")
    head.add_row("[b]phase[/]", state.phase, "", "")

    slots = Table(title="slots (address space 0)", title_justify="left")
    for col in ("slot", "gpa", "pages", "flags"):
        slots.add_column(col)
    for slot_row in state.slots:
        slots.add_row(*slot_row)

    exits = Table(title="exits", title_justify="left")
    exits.add_column("kind")
    exits.add_column("count", justify="right")
    for kind, n in sorted(state.exits.items()):
        exits.add_row(kind, str(n))

    mem = Table(title="dirty log / tracking", title_justify="left")
    mem.add_column("what")
    mem.add_column("value", justify="right")
    for i, n in enumerate(state.dirty_rounds):
        mem.add_row(f"round {i + 1} dirty", str(n))
    mem.add_row("tracked writes", str(len(state.tracked)))

    tx = Table(title="slot split/merge under a running guest", title_justify="left")
    for col in ("", "updates", "p50", "p99", "MMIO exits", "torn", "guest loops"):
        tx.add_column(col, justify="right")
    for label, o in (("kvmem tx", state.tx), ("naive", state.naive)):
        if o is None:
            continue
        lat = sorted(o.latencies_ns)
        p50 = f"{statistics.median(lat) / 1e3:.0f} µs" if lat else "-"
        p99 = f"{lat[int(len(lat) * 0.99)] / 1e3:.0f} µs" if lat else "-"
        style = "green" if o.clean else "red"
        tx.add_row(label, str(2 * o.rounds), p50, p99,
                   f"[{style}]{o.unexpected_mmio}[/]", f"[{style}]{o.torn}[/]",
                   str(o.iterations) if o.iterations else "…")

    row = Table.grid(padding=(0, 2))
    row.add_row(slots, exits, mem)
    checks = Table.grid(padding=(0, 1))
    for text, ok in state.checks:
        checks.add_row("[green]✓[/]" if ok else "[red]✗[/]", text)
    return Group(head, row, tx, checks)


def main(engine: str = "auto", rounds: int = 1000, console: Console | None = None) -> int:
    console = console or Console(highlight=False)
    if engine in ("auto", "kvm") and kvm_usable() is None:
        # the demo runs guests from a worker thread; the kick's handler needs the main one
        from .engines.kvm import install_kick_handler

        install_kick_handler()
    state = DemoState()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            run_demo(engine, rounds, state)
        except BaseException as e:  # shown below
            failure.append(e)

    worker = threading.Thread(target=work, name="kvmem-demo", daemon=True)
    with Live(get_renderable=lambda: _render(state), console=console,
              refresh_per_second=8, transient=False):
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    if failure:
        raise failure[0]
    tx, naive = state.tx, state.naive
    assert tx is not None and naive is not None
    summary = (
        f"engine {state.engine}: {len(state.checks)} checks, "
        f"{'all passed' if state.ok else 'FAILED'} in {time.perf_counter() - state.started:.1f} s\n"
        f"{2 * tx.rounds} transactional slot updates under a running guest: "
        f"{tx.unexpected_mmio} unexpected MMIO exits, {tx.torn} torn accesses; "
        f"{2 * naive.rounds} naive ones: {naive.unexpected_mmio} unexpected MMIO exits, "
        f"{naive.torn} torn accesses")
    console.print(Panel(summary, title="kvmem demo", border_style="green" if state.ok
                        else "red"))
    return 0 if state.ok else 1
