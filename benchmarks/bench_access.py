"""Guest access by the host: `vm.read` / `vm.write` against a raw memoryview copy.

Layout: one `HostMemory.anonymous` of 8 MiB, pages pre-touched, backing two adjacent slots
of 4 MiB each (gpa 0 and 4 MiB, hva contiguous). The 1 MiB access starts 512 KiB below the
slot boundary, so kvmem copies two slot runs; the baseline copies the same host bytes
through `HostMemory.view()` in one go:
    read:  bytes(mv[a:a+n])        write:  mv[a:a+n] = data
Targets: 1 MiB read and write throughput ≥ 0.8 × the raw copy's (ratio = raw time / kvmem
time). 8-byte and 4 KiB accesses within one slot are informative (per-call overhead).

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
        ("8 B in 1 slot", "8b", 0x3008, 8, None),
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
        rep.add(C.Figure(f"vm.read {label}", s["kr"], s["rr"], kind="throughput",
                         target=target, baseline_label="bytes(mv[a:a+n])", id=f"read_{key}"))
        rep.add(C.Figure(f"vm.write {label}", s["kw"], s["rw"], kind="throughput",
                         target=target, baseline_label="mv[a:a+n] = data", id=f"write_{key}"))
    rep.notes.append("throughput ratio = raw memoryview time / kvmem time (1.0 = as fast as "
                     "the raw copy; 0.8 = kvmem takes 1.25× as long)")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
