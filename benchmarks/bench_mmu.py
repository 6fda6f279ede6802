"""The vCPU memory path and pfn caches against a raw memoryview access; invalidation cost.

Figures (all measured in this run, interleaved round by round where the setup allows):
- hit: `vcpu.guest_read(gpa, 8)` / `vcpu.guest_write(gpa, 8 bytes)` on a page the stage-2
  already maps, vs `bytes(mv[a:a+8])` / `mv[a:a+8] = data` on the same host bytes;
- fault: the same 8-byte read on a page *not* mapped yet (first touch: fault, resolve,
  install, then the access), vs the raw read. Host pages are pre-touched, so this is
  kvmem's fault path, not the kernel's; 4 KiB mappings (the hva is not 2 MiB aligned).
  A 2 MiB first touch (one fault maps 512 pages) is shown per 4 KiB page it maps;
- gpc: `v = gpc.acquire(8); v[:] = data; gpc.release()` — the lock round trip as plain
  calls (read lock + check + the cache's live view, the write, unlock) — vs the raw write;
  and its `with` form, `with gpc.lock(8) as v: v[:] = data` (informative: the context
  manager and the block's own view cost extra);
- invalidation: `vm.invalidate_hva_range` over a 1 GiB slot with 10% of its pages mapped
  (26,215 sptes, every tenth page) vs dropping the same keys from a plain dict — the least
  Python can do to forget those mappings. The pages are faulted in again before each
  round (untimed).

Targets: a hit `guest_read` / `guest_write` of 8 bytes and a gpc lock round trip
(`acquire(8)` … `release()`) with an 8-byte write each cost ≤ 4 × the raw memoryview
operation on the same bytes (per call, same run). The fault, `with`-form and invalidation
figures are informative.

    python benchmarks/bench_mmu.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import os
import sys

import _common as C

import kvmem

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
ALIAS = 4 * MiB  # each fault-test slot aliases the same pre-touched host memory


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_mmu", "kvmem vCPU memory path and pfn cache vs raw memoryview",
                   args.quick)
    rounds = 7 if args.quick else 61
    ops = 256
    nslots = (rounds + 2) * ops * PAGE // ALIAS + 1
    rep.params = {"rounds": rounds, "ops/batch": ops, "fault slots": f"{nslots}×4 MiB aliases"}

    # host memory: 4 MiB + 1 page, so slots can start one page in (no 2 MiB mappings)
    mem = kvmem.HostMemory.anonymous(ALIAS + 2 * MiB + PAGE)
    mv = mem.view()
    mv[:] = b"\x5a" * mem.size
    vm = kvmem.Vm()
    for i in range(nslots):
        vm.set_memory_region(i, 0, i * ALIAS, ALIAS, mem.hva + PAGE)
    vcpu = vm.create_vcpu(0)
    read, write = vcpu.guest_read, vcpu.guest_write
    hot = 0x3008  # gpa in slot 0, host offset PAGE + 0x3008
    raw = PAGE + hot
    data = os.urandom(8)
    write(hot, data)
    assert read(hot, 8) == data == bytes(mv[raw:raw + 8])
    rng = range(ops)

    def hit_read(r: int) -> None:
        for _ in rng:
            read(hot, 8)

    def hit_write(r: int) -> None:
        for _ in rng:
            write(hot, data)

    def raw_read(r: int) -> None:
        for _ in rng:
            bytes(mv[raw:raw + 8])

    def raw_write(r: int) -> None:
        for _ in rng:
            mv[raw:raw + 8] = data

    first = [(16 + r * ops + i) * PAGE + 8 for r in range(rounds + 2) for i in range(ops)]

    def fault_read(r: int) -> None:
        for gpa in first[r * ops:(r + 1) * ops]:
            read(gpa, 8)

    # pfn cache on the hot page
    gpc = vm.pfn_cache()
    gpc.activate(hot, 8)

    def gpc_write(r: int) -> None:
        acquire, release = gpc.acquire, gpc.release
        for _ in rng:
            view = acquire(8)
            view[:] = data
            release()

    def gpc_with(r: int) -> None:
        lock = gpc.lock
        for _ in rng:
            with lock(8) as view:
                view[:] = data

    faults0 = vm.mmu.stats["faults"]
    C.quiet_gc()
    try:
        s = C.interleave({"hr": (hit_read, ops), "hw": (hit_write, ops),
                          "rr": (raw_read, ops), "rw": (raw_write, ops),
                          "fr": (fault_read, ops), "gw": (gpc_write, ops),
                          "gl": (gpc_with, ops)}, rounds)
    finally:
        gc.enable()
    faults = vm.mmu.stats["faults"] - faults0
    assert faults >= (rounds + 1) * ops, faults  # every first touch did fault
    assert vm.mmu.stale_sptes() == []

    rep.add(C.Figure("hit: guest_read 8 B (mapped)", s["hr"], s["rr"], target=4.0,
                     baseline_label="bytes(mv[a:a+8])", id="hit_read"))
    rep.add(C.Figure("hit: guest_write 8 B (mapped)", s["hw"], s["rw"], target=4.0,
                     baseline_label="mv[a:a+8] = data", id="hit_write"))
    rep.add(C.Figure("fault: guest_read 8 B, first touch (4 KiB)", s["fr"], s["rr"],
                     baseline_label="bytes(mv[a:a+8])", id="fault_read"))
    rep.add(C.Figure("gpc acquire(8) / release() round trip + 8 B write", s["gw"], s["rw"],
                     target=4.0, baseline_label="mv[a:a+8] = data", id="gpc_lock"))
    rep.add(C.Figure("gpc `with lock(8)` round trip + 8 B write", s["gl"], s["rw"],
                     baseline_label="mv[a:a+8] = data", id="gpc_lock_with"))

    huge_ns = huge_first_touch(rounds)
    if huge_ns is not None:
        rep.add(C.Figure("fault: 2 MiB first touch, per 4 KiB page mapped", huge_ns, s["rr"],
                         baseline_label="bytes(mv[a:a+8])", id="fault_huge_per_page",
                         note="one fault installs 512 pages' mapping"))
    gpc.deactivate()

    sub, base, mapped = invalidation(3 if args.quick else 9)
    rep.add(C.Figure(f"invalidate 1 GiB, {mapped} of 262,144 pages mapped", sub, base,
                     baseline_label="del d[k] for the same keys", id="invalidate_1g_10pct",
                     note="per call (subject) and per dict clear-out (baseline), not per page"))
    rep.notes.append("time ratio = kvmem time / baseline time per operation (lower is "
                     "better)")
    mem.close()
    return rep.finish(args)


def huge_first_touch(rounds: int) -> list[float] | None:
    """ns per 4 KiB page of a first touch that maps 2 MiB in one fault."""
    mem = kvmem.HostMemory.anonymous(4 * MiB)
    if (mem.hva >> 12) % 512:
        mem.close()
        return None
    mem.view()[:] = b"\x01" * mem.size
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)
    vcpu = vm.create_vcpu(0)
    out = []
    for _ in range(rounds):
        vm.mmu.zap_gfn_range(0, 0, 512)
        t0 = C.now_ns()
        vcpu.guest_read(0x1000, 8)
        out.append((C.now_ns() - t0) / 512)
        assert vm.mmu.spte(0, 1) is not None and vm.mmu.spte(0, 1).npages == 512
    mem.close()
    return out


def invalidation(rounds: int) -> tuple[list[float], list[float], int]:
    mem = kvmem.HostMemory.anonymous(GiB + PAGE)  # never touched: reads see the zero page
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, GiB, mem.hva + PAGE)
    vcpu = vm.create_vcpu(0)
    npages = GiB // PAGE
    keys = list(range(0, npages, 10))
    sub: list[float] = []
    base: list[float] = []
    mapped = 0
    for _ in range(rounds):
        for p in keys:
            vcpu.guest_read(p * PAGE, 1)
        mapped = vm.mmu.mapped(0)
        d = {k: vm.mmu.spte(0, k) for k in keys}
        gc.collect()
        t0 = C.now_ns()
        vm.invalidate_hva_range(mem.hva + PAGE, mem.hva + PAGE + GiB)
        t1 = C.now_ns()
        for k in keys:
            del d[k]
        t2 = C.now_ns()
        assert vm.mmu.mapped(0) == 0
        sub.append(t1 - t0)
        base.append(t2 - t1)
    mem.close()
    return sub, base, mapped


if __name__ == "__main__":
    sys.exit(main())
