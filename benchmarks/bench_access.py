"""Guest access by the host: `vm.read` / `vm.write` against a raw memoryview copy.

Layout: one `HostMemory.anonymous` of 8 MiB, pages pre-touched, backing two adjacent slots
of 4 MiB each (gpa 0 and 4 MiB, hva contiguous). The 1 MiB access starts 512 KiB below the
slot boundary, so kvmem copies two slot runs; the baseline copies the same host bytes
through `HostMemory.view()` in one go:
    read:  bytes(mv[a:a+n])        write:  mv[a:a+n] = data
Targets: 1 MiB read and write throughput ≥ 0.8 × the raw copy's (ratio = raw time / kvmem
time); 8-byte `vm.read` / `vm.write` and an 8-byte hva-cache read each ≤ 4 × the raw
memoryview operation on the same bytes (ratio = kvmem time / raw time, per call). 4 KiB
accesses within one slot are informative.

    python benchmarks/bench_access.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import os
import sys

import _common as C

import kvmem

MiB = 1 << 20
SLOT = 4 * MiB


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_access", "kvmem guest access vs raw memoryview copy", args.quick)

    mem = kvmem.HostMemory.anonymous(2 * SLOT)
    mv = mem.view()
    mv[:] = b"\xa5" * mem.size  # pre-touch every page
    vm = kvmem.Vm()
    vm.set_memory_region(0, 0, 0, SLOT, mem.hva)
    vm.set_memory_region(1, 0, SLOT, SLOT, mem.hva + SLOT)

    cases = [  # (label, id, gpa = host offset, n, target or None)
        ("1 MiB across 2 slots", "1mib", SLOT - MiB // 2, MiB, 0.8),
        ("4 KiB in 1 slot", "4kib", 0x3000, 4096, None),
        ("8 B in 1 slot", "8b", 0x3008, 8, 4.0),
    ]
    # a batch: `budget` bytes of 4 KiB+ accesses, or `small_ops` 8-byte ones (~1 ms each)
    budget, small_ops = 8 * MiB, 500
    rounds = 7 if args.quick else 121
    rep.params = {"rounds": rounds, "slot_size": "4 MiB", "host": "anonymous, pre-touched"}

    vm_read, vm_write = vm.read, vm.write
    for label, key, a, n, target in cases:
        data = os.urandom(n)
        # correctness first: both sides touch the same bytes
        vm_write(a, data)
        assert bytes(mv[a:a + n]) == data and vm_read(a, n) == data
        ops = max(1, budget // n) if n >= 4096 else small_ops
        rng = range(ops)

        def kv_read(r: int, rng=rng, a=a, n=n) -> None:
            for _ in rng:
                vm_read(a, n)

        def raw_read(r: int, rng=rng, a=a, n=n, mv=mv) -> None:
            for _ in rng:
                bytes(mv[a:a + n])

        def kv_write(r: int, rng=rng, a=a, data=data) -> None:
            for _ in rng:
                vm_write(a, data)

        def raw_write(r: int, rng=rng, a=a, n=n, data=data, mv=mv) -> None:
            for _ in rng:
                mv[a:a + n] = data

        C.quiet_gc()  # leaves the collector off while timing
        try:
            s = C.interleave({"kr": (kv_read, ops), "rr": (raw_read, ops),
                              "kw": (kv_write, ops), "rw": (raw_write, ops)}, rounds)
        finally:
            gc.enable()
        # large copies: throughput; an 8-byte access: per-call cost, kvmem time / raw time
        kind = "throughput" if n >= 4096 else "time"
        rep.add(C.Figure(f"vm.read {label}", s["kr"], s["rr"], kind=kind,
                         target=target, baseline_label="bytes(mv[a:a+n])", id=f"read_{key}"))
        rep.add(C.Figure(f"vm.write {label}", s["kw"], s["rw"], kind=kind,
                         target=target, baseline_label="mv[a:a+n] = data", id=f"write_{key}"))

    # the hva cache (gfn_to_hva_cache) over the same 8 bytes
    cache = vm.hva_cache(0x3008, 8)
    a = 0x3008
    assert cache.read(0, 8) == bytes(mv[a:a + 8])
    rng = range(small_ops)
    cache_read = cache.read

    def hc_read(r: int) -> None:
        for _ in rng:
            cache_read(0, 8)

    def raw_8(r: int) -> None:
        for _ in rng:
            bytes(mv[a:a + 8])

    C.quiet_gc()
    try:
        s = C.interleave({"hc": (hc_read, small_ops), "rr": (raw_8, small_ops)}, rounds)
    finally:
        gc.enable()
    rep.add(C.Figure("hva_cache.read 8 B", s["hc"], s["rr"], target=4.0,
                     baseline_label="bytes(mv[a:a+8])", id="hva_cache_read_8b"))
    rep.notes.append("throughput ratio = raw memoryview time / kvmem time (1.0 = as fast as "
                     "the raw copy; 0.8 = kvmem takes 1.25× as long); time ratio = kvmem time "
                     "/ raw time per call")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
