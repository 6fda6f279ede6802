"""Diagnostic (not a benchmark: no baseline, no target; run_all does not run it): how many
pages a guest writes in a fixed time while the VMM harvests the dirty log every 20 ms.

The `walker` guest loops over N hot pages of a logging slot (one store and one load per
page per pass, passes without end) while another thread calls `vm.get_dirty_log` every
`--period` seconds; after `--seconds` the vCPU is kicked and the pages written are counted
from its registers. Every harvest write-protects every page written since the last, so
each pass after a harvest takes a write fault per page: with a fault costing F of CPU and
a harvest every P, the guest can write at most P / F pages per period whatever N is, and
N pages a period only while N * F < P.

    python benchmarks/diag_hot_pages.py [--engine unicorn|kvm] [--pages 50,2000]
                                        [--seconds 0.25] [--period 0.02]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import kvmem
from kvmem.engines import Exit, Regs
from kvmem.guests import program

PAGE = 4096
CODE = 0x1000
DATA = 0x100000


def pages_written(engine: str, npages: int, seconds: float, period: float
                  ) -> tuple[int, int, float]:
    """(pages written, harvests, CPU seconds of the process) for one run."""
    code = kvmem.HostMemory.anonymous(16 * PAGE)
    mem = kvmem.HostMemory.anonymous(npages * PAGE)
    vm = kvmem.Vm(engine=engine)
    try:
        vm.set_memory_region(0, 0, 0, code.size, code.hva)
        vm.set_memory_region(1, kvmem.KVM_MEM_LOG_DIRTY_PAGES, DATA, mem.size, mem.hva)
        vm.write(CODE, program("walker"))
        assert vm.engine is not None
        cpu = vm.create_vcpu(0)
        passes = 1 << 30
        cpu.start(CODE, Regs(esi=DATA, ecx=mem.size, edi=PAGE, ebx=1, ebp=passes))
        stop = threading.Event()
        harvests = [0]

        def harvester() -> None:
            while not stop.wait(period):
                vm.get_dirty_log(1)
                harvests[0] += 1

        exits: list[Exit] = []
        guest = threading.Thread(target=lambda: exits.append(cpu.run()))
        harvest = threading.Thread(target=harvester)
        cpu0 = time.process_time()
        guest.start()
        harvest.start()
        time.sleep(seconds)
        stop.set()
        harvest.join()
        cpu.kick()
        guest.join()
        used = time.process_time() - cpu0
        r = cpu.get_regs()
        # a pass is a fill and a fold of every page; eax walks the one under way
        done = (passes - r.ebp) * npages + max(r.eax - DATA, 0) // PAGE
        return done, harvests[0], used
    finally:
        if vm.engine is not None:
            vm.engine.close()
        mem.close()
        code.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="unicorn", choices=("unicorn", "kvm"))
    p.add_argument("--pages", default="50,2000")
    p.add_argument("--seconds", type=float, default=0.25)
    p.add_argument("--period", type=float, default=0.02)
    args = p.parse_args(argv)
    for n in (int(x) for x in args.pages.split(",")):
        done, harvests, used = pages_written(args.engine, n, args.seconds, args.period)
        print(f"{args.engine}: {n} hot pages: {done} pages written in {args.seconds} s "
              f"({harvests} harvests, {used:.3f} s CPU): "
              f"{used / max(done, 1) * 1e6:.1f} us CPU per page written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
