"""Stress (issue 3 item 6): vCPU threads read and write through the stage-2 while other
threads discard and remap host memory, split / merge and move slots in transactions, and
a pfn-cache user writes through `lock()`.

Oracles:
- stale: after every host change no spte maps a page the change replaced
  (`vm.mmu.stale_sptes()` is empty), and every use of the pfn cache finds its page still
  the one it was built on (`stale_uses` must stay 0);
- lost write: each vCPU owns pages; it writes a fresh value and reads it back. A host
  change to a page is bracketed by a per-page seqlock (odd while in progress), so when no
  change overlapped the write and the read, the read must return the value;
- no hole: the split/merge slot is never absent — an MMIO exit there is a failure;
- no stale gpa: the moving slot lives at one of two gpas; an access that succeeds at the
  gpa the slot had left before the access began (no move overlapping it) is a failure.

`run_stress` is shared with `benchmarks/bench_mmu.py`, which reports its rates.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import kvmem
from kvmem import MmioExit

MiB = 1 << 20
PAGE = 4096
A_PAGES = 1024  # 4 MiB: split and merged, discarded, remapped
B_PAGES = 16  # 64 KiB: moved between two gpas
B_AT = (64 * MiB, 128 * MiB)
GPC_PAGE = 5


@dataclass
class StressResult:
    seconds: float
    accesses: int = 0
    checked: int = 0
    lost: list[str] = field(default_factory=list)
    holes: int = 0
    stale_gpa: list[str] = field(default_factory=list)
    mmio_b: int = 0
    transactions: int = 0
    moves: int = 0
    host_changes: int = 0
    gpc_uses: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    gpc_stats: dict[str, int] = field(default_factory=dict)  # the pfn cache's, live
    checking: dict[int, int] = field(default_factory=dict)  # vCPU -> checked so far, live

    @property
    def faults_per_s(self) -> float:
        return self.stats.get("faults", 0) / self.seconds


def run_stress(seconds: float, vcpus: int = 3, seed: int = 1,
               until: Callable[[StressResult, dict[str, int]], bool] | None = None,
               limit: float = 120.0) -> StressResult:
    """Run for `seconds`, and then on until `until(result, mmu stats)` holds (at most
    `limit` seconds in all): a loaded machine makes the run longer, never thinner."""
    mem_a = kvmem.HostMemory.anonymous(A_PAGES * PAGE)
    mem_b = kvmem.HostMemory.anonymous(B_PAGES * PAGE)
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, A_PAGES * PAGE, mem_a.hva)
    vm.set_memory_region(1, 0, B_AT[0], B_PAGES * PAGE, mem_b.hva)
    epoch_a = [0] * A_PAGES  # per-page seqlock of host changes
    move_epoch = [0]  # seqlock of slot 1's location: B_AT[(epoch // 2) % 2]
    result = StressResult(seconds)
    stop = threading.Event()
    lock = threading.Lock()

    def guard(fn: Callable[..., object]) -> Callable[..., None]:
        def run(*args: object) -> None:
            try:
                fn(*args)
            except BaseException as e:
                with lock:
                    result.errors.append("".join(traceback.format_exception(e)))
                stop.set()
        return run

    def vcpu_loop(index: int) -> None:
        vcpu = vm.create_vcpu(index)
        rng = random.Random(seed * 100 + index)
        mine = list(range(index, A_PAGES, vcpus))
        counter = 0
        accesses = checked = holes = mmio_b = 0
        while not stop.is_set():
            counter += 1
            p = rng.choice(mine)
            off = rng.randrange(0, PAGE - 8, 8)
            value = (index + 1) << 48 | counter
            e1 = epoch_a[p]
            try:
                vcpu.guest_write(p * PAGE + off, value.to_bytes(8, "little"))
                got = int.from_bytes(vcpu.guest_read(p * PAGE + off, 8), "little")
                vcpu.guest_read(rng.randrange(A_PAGES) * PAGE, 64)  # someone else's page
            except MmioExit as e:
                holes += 1
                with lock:
                    result.lost.append(f"hole at gpa {e.gpa:#x}")
                continue
            accesses += 3
            if e1 % 2 == 0 and epoch_a[p] == e1:
                checked += 1
                result.checking[index] = checked
                if got != value:
                    with lock:
                        result.lost.append(f"page {p}+{off:#x}: wrote {value:#x} read {got:#x}")
            # the moving slot: try the gpa it had when we looked
            m1 = move_epoch[0]
            where = B_AT[(m1 // 2) % 2]
            gpa = where + rng.randrange(B_PAGES) * PAGE
            try:
                vcpu.guest_write(gpa, value.to_bytes(8, "little"))
                accesses += 1
            except MmioExit:
                mmio_b += 1
                continue
            if m1 % 2 == 1 or move_epoch[0] != m1:
                continue  # a move overlapped: either answer is fine
            # no move overlapped: the write must have gone to the slot at `where`; the
            # other gpa must not reach it
            other = B_AT[1 - (m1 // 2) % 2] + (gpa - where)
            try:
                vcpu.guest_read(other, 8)
                if move_epoch[0] == m1:
                    with lock:
                        result.stale_gpa.append(f"gpa {other:#x} still maps slot 1")
            except MmioExit:
                pass
        with lock:
            result.accesses += accesses
            result.checked += checked
            result.holes += holes
            result.mmio_b += mmio_b

    def splitter() -> None:
        rng = random.Random(seed + 7)
        while not stop.is_set():
            at = rng.randrange(1, A_PAGES) * PAGE
            with vm.transaction() as tx:
                pieces = tx.split(0, [at])
            with vm.transaction() as tx:
                tx.merge(pieces)
            result.transactions += 2

    def mover() -> None:
        i = 0
        while not stop.is_set():
            move_epoch[0] += 1  # odd: in progress
            with vm.transaction() as tx:
                tx.set_memory_region(1, 0, B_AT[(i + 1) % 2], B_PAGES * PAGE, mem_b.hva)
            move_epoch[0] += 1
            i += 1
            result.moves += 1
            time.sleep(0.001)

    def host_churn() -> None:
        rng = random.Random(seed + 11)
        while not stop.is_set():
            p = GPC_PAGE if rng.random() < 0.1 else rng.randrange(A_PAGES - 4)
            n = rng.choice((1, 1, 1, 4))
            for q in range(p, p + n):
                epoch_a[q] += 1
            (mem_a.discard if rng.random() < 0.5 else mem_a.remap)(p * PAGE, n * PAGE)
            for q in range(p, p + n):
                epoch_a[q] += 1
            result.host_changes += 1
            stale = vm.mmu.stale_sptes()
            if stale:
                with lock:
                    result.stats["stale_uses"] = result.stats.get("stale_uses", 0) + len(stale)
            # host changes come in bursts with gaps; back-to-back without gaps they starve
            # slot updates and pfn-cache refreshes (both wait for none in flight, as in KVM)
            time.sleep(0.002 if result.host_changes % 8 == 0 else 0)

    def gpc_user() -> None:
        gpc = vm.pfn_cache()
        gpc.activate(GPC_PAGE * PAGE, 8)  # a page in the split/merged, discarded slot
        result.gpc_stats = gpc.stats
        uses = stale = 0
        while not stop.is_set():
            with gpc.lock(8, dirty=True) as view:
                if gpc.frame is None or not gpc.frame.current():
                    stale += 1
                view[:] = uses.to_bytes(8, "little")
            uses += 1
            result.gpc_uses = uses  # this thread's alone: read live by `until`
        gpc.deactivate()
        with lock:
            result.stats["gpc_stale_uses"] = stale
            result.stats["gpc_invalidations"] = gpc.stats["invalidations"]
            result.stats["gpc_retries"] = gpc.stats["retries"]

    threads = [threading.Thread(target=guard(vcpu_loop), args=(i,)) for i in range(vcpus)]
    threads += [threading.Thread(target=guard(f)) for f in (splitter, mover, host_churn,
                                                              gpc_user)]
    start = time.monotonic()
    for t in threads:
        t.start()
    stop.wait(seconds)
    while (until is not None and not until(result, vm.mmu.stats)
           and time.monotonic() - start < limit):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a stress thread hung"
    result.seconds = time.monotonic() - start
    result.stats.update(vm.mmu.stats)
    result.stats.setdefault("stale_uses", 0)
    mem_a.close()
    mem_b.close()
    return result


def _enough(r: StressResult, mmu: dict[str, int]) -> bool:
    """The run did what it claims: every kind of disturbance happened, and often."""
    return (sum(r.checking.values()) > 500 and r.transactions > 50 and r.moves > 20
            and r.host_changes > 50 and mmu.get("retries", 0) > 0 and r.gpc_uses > 100
            and r.gpc_stats.get("invalidations", 0) > 0)


def test_stress_no_stale_use_no_lost_write_no_hole() -> None:
    r = run_stress(3.0, until=_enough)
    print(f"\nstress {r.seconds:.1f}s: {r.accesses} vCPU accesses ({r.checked} checked "
          f"write→read pairs), {r.stats['faults']} faults ({r.faults_per_s:.0f}/s), "
          f"{r.stats['retries']} retries, {r.stats['invalidations']} MMU invalidations, "
          f"{r.transactions} split/merge + {r.moves} move transactions, "
          f"{r.host_changes} discards/remaps, {r.mmio_b} MMIO exits at the moving slot, "
          f"{r.gpc_uses} gpc.lock uses ({r.stats['gpc_invalidations']} invalidations, "
          f"{r.stats['gpc_retries']} refresh retries)")
    assert r.errors == []
    assert r.lost == [] and r.holes == 0
    assert r.stale_gpa == []
    assert r.stats["stale_uses"] == 0 and r.stats["gpc_stale_uses"] == 0
    assert _enough(r, r.stats), "the run stopped at its limit before doing its work"
