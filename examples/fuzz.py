"""Find the planted bug of the bundled `fuzzme` guest by snapshot and reset.

    PYTHONPATH=src python examples/fuzz.py --engine kvm      (or unicorn)

The guest compares its input with a secret one byte at a time and reports on port 0x20 how
many leading bytes matched. The loop takes one snapshot with the guest about to run, then
for each input: restore, write the input, run to the halt — keeping any input that got
further, and mutating the byte after the known-good prefix.
"""

from __future__ import annotations

import argparse
import random
import time

import kvmem
from kvmem.engines import ExitKind, Regs
from kvmem.guests import PORT_BUG, PORT_PROGRESS, program

CODE, INPUT, SCRATCH, SIZE = 0x1000, 0x2000, 0x10000, 6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="unicorn", choices=["unicorn", "kvm"])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    mem = kvmem.HostMemory.anonymous(16 << 20)
    vm = kvmem.Vm(engine=args.engine, address_spaces=1)
    assert vm.engine is not None
    vm.set_memory_region(0, 0, 0, mem.size, mem.hva)
    vm.write(CODE, program("fuzzme"))
    cpu = vm.create_vcpu(0)
    cpu.start(CODE, Regs(esi=INPUT, ecx=SIZE, edi=SCRATCH))
    snap = vm.snapshot()  # the guest about to parse: every run starts here

    rng = random.Random(args.seed)
    best, score, runs, pages, start = bytes(SIZE), 0, 0, 0, time.perf_counter()
    while True:
        data = bytearray(best)
        data[min(score, SIZE - 1)] = rng.randrange(256)
        pages += vm.restore(snap)
        vm.write(INPUT, bytes(data))
        runs += 1
        got = 0
        while (exit_ := cpu.run()).kind is ExitKind.IO:
            if exit_.addr == PORT_BUG:
                took = time.perf_counter() - start
                print(f"bug found: input {bytes(data)!r} after {runs} runs in {took:.2f} s "
                      f"({runs / took:.0f} resets/s, {pages / runs:.1f} pages restored per "
                      f"reset) on {args.engine}")
                return
            if exit_.addr == PORT_PROGRESS:
                got = int.from_bytes(exit_.data, "little")
        if got > score:
            best, score = bytes(data), got
            print(f"run {runs}: {score} bytes right: {best[:score]!r}")


if __name__ == "__main__":
    main()
