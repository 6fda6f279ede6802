"""CPU: instructions per second at CPL 0 and CPL 3 on both engines, and what moving a vCPU's
state between them costs.

Figures (each against a baseline measured in the same run, interleaved round by round; all
informative — the point is the absolute rates, printed below the table and kept in the JSON's
`params.minst_per_s`):
- `cpl0_kvm_vs_unicorn` / `cpl3_kvm_vs_unicorn` (throughput): the `spin64` guest (a dec/jnz
  loop) in long mode at CPL 0 (`modes.long_mode`) and at CPL 3 (`modes.user_mode`), run to its
  exit on a raw KVM vCPU vs a raw Unicorn CPU (`kvmem.cpu.raw`), per instruction. On kvmem's
  CI host KVM is kvm_pvm: CPL-3 code runs natively, CPL-0 code is emulated.
- `vm_cpl0_kvm_vs_unicorn` / `vm_cpl3_kvm_vs_unicorn` (throughput): the same, on the vCPU a
  VMM uses — `kvmem.Vm(engine=...).create_vcpu(0)` over one kvmem slot (kvmem's MMU as
  Unicorn's stage-2, exits in KVM's convention, events delivered by `kvmem.cpu.events` on
  Unicorn: spin64 at CPL 3 ends in INT3, which the stub turns into a port exit).
- `vm_vs_raw_unicorn_cpl3` (throughput): the Unicorn engine's vCPU vs the raw Unicorn CPU at
  CPL 3 (what kvmem's engine costs per instruction).
- `unicorn_exact_vs_blockwise` (throughput): Unicorn at CPL 3 with exact exits
  (`uc_state.resume`: an instruction count makes every instruction check for a stop) vs
  without (`resume_blockwise`).
- `state_move_kvm_to_unicorn` (time): `kvm_state.get_state` + `uc_state.set_state` vs
  `VcpuState.to_bytes` + `from_bytes` of the same state.

    python benchmarks/bench_cpu.py [--json FILE] [--quick] [--strict]
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

import _common as C

import kvmem
from kvmem import kvmapi
from kvmem.cpu import modes, raw, uc_state
from kvmem.cpu.state import VcpuState
from kvmem.engines import Exit, ExitKind
from kvmem.guests import PORT_EXCEPTION, PORT_RESULT, program

MEM = 8 << 20
CODE, TABLES, SYSTEM, STACK = 0x40_0000, 0x10_0000, 0x20_0000, 0x60_0000


def states(write: Callable[[int, bytes], None]) -> dict[int, VcpuState]:
    """CPL → the spin64 state (rcx still to set), its code and tables written by `write`."""
    write(CODE, program("spin64"))
    return {
        0: modes.long_mode(CODE, write, TABLES).with_regs(rdx=0),
        3: modes.user_mode(CODE, write, SYSTEM, rsp=STACK, identity_size=MEM).with_regs(rdx=1),
    }


def spinner(cpu: raw.RawCpu | kvmem.Vcpu, state: VcpuState,  # type: ignore[no-untyped-def]
            iterations: int):
    """A batch: load the state, run spin64 to its exit (2 instructions per iteration)."""
    expected = PORT_RESULT if state.regs.rdx == 0 else PORT_EXCEPTION
    loaded = state.with_regs(rcx=iterations)

    def run(r: int) -> None:
        cpu.set_state(loaded)
        e = cpu.run()
        port = e.addr if isinstance(e, Exit) else e.port
        assert e.kind in ("io", ExitKind.IO) and port == expected, e

    return run


def vm_vcpu(engine: str, host: kvmem.HostMemory) -> kvmem.Vcpu:
    """vCPU 0 of a Vm with `engine` and one slot over `host` (gpa 0)."""
    vm = kvmem.Vm(engine=engine)
    vm.set_memory_region(0, 0, 0, MEM, host.hva)
    return vm.create_vcpu(0)


def blockwise(cpu: raw.UcCpu, state: VcpuState, iterations: int):  # type: ignore[no-untyped-def]
    loaded = state.with_regs(rcx=iterations)

    def run(r: int) -> None:
        cpu.set_state(loaded)
        uc_state.resume_blockwise(cpu.uc)  # the exit's stop lands at the block's end

    return run


def rate(samples: list[float]) -> float:
    """Millions of instructions per second from ns-per-instruction samples (best)."""
    return 1e3 / min(samples)


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv)
    rep = C.Report("bench_cpu", "kvmem.cpu: instructions/s at CPL 0 and 3, KVM and Unicorn",
                   args.quick)
    rounds = 2 if args.quick else 7
    # iterations per batch: ~20-200 ms each (rates differ by 1000x between the cases)
    n = {("kvm", 0): 20_000 if args.quick else 100_000,
         ("kvm", 3): 20_000_000 if args.quick else 200_000_000,
         ("unicorn", 0): 500_000 if args.quick else 4_000_000,
         ("unicorn", 3): 500_000 if args.quick else 4_000_000}
    why_not = kvmapi.kvm_available()
    mem = raw.GuestMemory(MEM)
    spin = states(mem.write)
    uc = raw.UcCpu(mem)
    kvm = raw.KvmCpu(mem) if why_not is None else None
    # the vCPU a VMM uses, one Vm per engine over the same kvmem host memory
    host = kvmem.HostMemory.anonymous(MEM)
    vm_spin = states(lambda gpa, data: host.view().__setitem__(slice(gpa, gpa + len(data)),
                                                               data))
    vm_cpus = {"unicorn": vm_vcpu("unicorn", host)}
    if why_not is None:
        vm_cpus["kvm"] = vm_vcpu("kvm", host)
    minst: dict[str, float] = {}
    C.quiet_gc()
    try:
        for cpl in (0, 3):
            batches = {"unicorn": (spinner(uc, spin[cpl], n["unicorn", cpl]),
                                   2 * n["unicorn", cpl])}
            if kvm is not None:
                batches["kvm"] = (spinner(kvm, spin[cpl], n["kvm", cpl]), 2 * n["kvm", cpl])
            for engine, cpu in vm_cpus.items():
                batches[f"vm_{engine}"] = (spinner(cpu, vm_spin[cpl], n[engine, cpl]),
                                           2 * n[engine, cpl])
            samples = C.interleave(batches, rounds)
            for engine, s in samples.items():
                minst[f"{engine}_cpl{cpl}"] = round(rate(s), 2)
            if kvm is not None:
                rep.add(C.Figure(f"CPL {cpl} spin64, per instruction: KVM / Unicorn",
                                 samples["kvm"], samples["unicorn"], kind="throughput",
                                 subject_label="raw KVM vCPU", baseline_label="raw Unicorn CPU",
                                 id=f"cpl{cpl}_kvm_vs_unicorn"))
                rep.add(C.Figure(f"CPL {cpl} spin64 on vm.create_vcpu, per instruction: "
                                 "KVM / Unicorn engine",
                                 samples["vm_kvm"], samples["vm_unicorn"], kind="throughput",
                                 subject_label="Vm(engine='kvm') vCPU",
                                 baseline_label="Vm(engine='unicorn') vCPU",
                                 id=f"vm_cpl{cpl}_kvm_vs_unicorn"))
            if cpl == 3:
                rep.add(C.Figure("CPL 3 spin64, per instruction: Unicorn engine vCPU / raw "
                                 "Unicorn CPU", samples["vm_unicorn"], samples["unicorn"],
                                 kind="throughput", subject_label="Vm(engine='unicorn') vCPU",
                                 baseline_label="raw Unicorn CPU", id="vm_vs_raw_unicorn_cpl3"))
        # exact exits on Unicorn, and what they cost (resume vs resume_blockwise)
        samples = C.interleave({
            "exact": (spinner(uc, spin[3], n["unicorn", 3]), 2 * n["unicorn", 3]),
            "blockwise": (blockwise(uc, spin[3], n["unicorn", 3]), 2 * n["unicorn", 3]),
        }, rounds)
        minst["unicorn_cpl3_blockwise"] = round(rate(samples["blockwise"]), 2)
        rep.add(C.Figure("Unicorn CPL 3, per instruction: exact exits / block-wise stops",
                         samples["exact"], samples["blockwise"], kind="throughput",
                         subject_label="uc_state.resume (instruction count)",
                         baseline_label="uc_state.resume_blockwise",
                         id="unicorn_exact_vs_blockwise"))
        if kvm is not None:
            kvm.set_state(spin[3])
            state = kvm.get_state()

            def move(r: int) -> None:
                uc.set_state(kvm.get_state())

            def through_bytes(r: int) -> None:
                VcpuState.from_bytes(state.to_bytes())

            samples = C.interleave({"move": (move, 1), "bytes": (through_bytes, 1)},
                                   rounds * 10, warmup=2)
            rep.add(C.Figure("VcpuState move KVM → Unicorn: get + set / to_bytes + from_bytes",
                             samples["move"], samples["bytes"],
                             subject_label="kvm_state.get_state + uc_state.set_state",
                             baseline_label="VcpuState.to_bytes + from_bytes",
                             id="state_move_kvm_to_unicorn"))
    finally:
        gc.enable()
        uc.close()
        if kvm is not None:
            kvm.close()
        mem.close()
        for cpu in vm_cpus.values():
            assert cpu.vm.engine is not None
            cpu.vm.engine.close()
        host.close()
    rep.params = {"rounds": rounds, "iterations": {f"{e}_cpl{c}": v for (e, c), v in n.items()},
                  "minst_per_s": minst,
                  "kvm": "yes" if why_not is None else f"skipped: {why_not}"}
    rep.notes.append("million instructions per second (best round): " + ", ".join(
        f"{k} {v:,.1f}" for k, v in minst.items()))
    if why_not is not None:
        rep.notes.append(f"KVM figures skipped: {why_not}")
    return rep.finish(args)


if __name__ == "__main__":
    sys.exit(main())
