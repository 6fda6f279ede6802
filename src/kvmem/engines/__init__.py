"""Engines: what runs guest code on a kvmem `Vm` — `/dev/kvm` or Unicorn.

Defines `open_engine(name)` — "kvm", "unicorn" or "auto" (KVM where /dev/kvm works, else
Unicorn) — and `AttachedOnce`, what every engine has; re-exports the contract the engines
implement: `Exit` / `ExitKind` (why a vCPU stopped, with the same shape on every engine:
port I/O, MMIO, halt, shutdown — an exception the guest could not deliver —, internal
error — the engine could not go on, e.g. code fetched from a gpa without memory —, and
kicked — another thread called `kick`), `Regs` (the registers of a 32-bit protected-mode
guest, the mode every engine starts a vCPU in: flat 4 GiB segments, CPL 0, no paging, no
IDT), `EngineCapabilities`, `EngineError` (`kvmem.contract`) and the protocols `Engine` /
`EngineVcpu` (`kvmem.vm`, the layer that calls them).

One vCPU object: `vm.create_vcpu(i)` returns the `kvmem.Vcpu`, and the Vm asks its engine
for the backend that runs it (`Engine.create_vcpu_backend`); the `Vcpu`'s `run`, `start`,
`complete`, `kick`, registers and state are the backend's. Engines have no `create_vcpu`
of their own.

Rules: engines sit above the `Vm`. They hear about it only as a `SlotsListener` (slot
changes, tracking changes, dirty-log syncs) and, for Unicorn, as a stage-2 mirror of the
MMU; they use only public interfaces. The `Vm` never imports this package — it calls the
opener that this module registers (`vm.register_engine_opener`).

Exits: KVM's convention, on every engine (measured on /dev/kvm; tests/test_engine_exits.py
holds each engine to it). "Done" means the instruction has finished: EIP is past it and
its results are in place; "not done" means EIP is at it and nothing of it has happened.

    exit             fields                                  instruction at the exit
    IN               IO, addr=port, size, count=1            not done; `complete(size)`
    INS (REP)        IO, addr=port, size, count=n            not done; `complete(size*n)`:
                       n = ECX (1 without REP), at most the bytes left in EDI's page
                       (KVM compares bytes with elements) and 1024 // size; the next
                       element after those n is a new exit. REP going up (DF clear)
                       then writes the n elements as one access (its part without
                       memory: MMIO write exits of <= 8 bytes, EIP still at the INS);
                       an exit meanwhile drops the elements not written yet
    OUT              IO, addr=port, size, data (size bytes)  done
    OUTS (REP)       IO, one exit per element, count=1       element done (ECX, ESI
                       stepped); EIP at the instruction while REP goes on, and after
                       the last element until the next run
    MMIO read        MMIO, addr=gpa, size                    not done; `complete(size)`
    MMIO write       MMIO, addr=gpa, size, data              done
                       an unaligned store is one exit of its size (split only where it
                       crosses a page)
    any access       one access of its size, cut only at a page boundary (KVM's emulator):
                       a RAM part is read / written, a part without memory (no slot, a
                       store to a read-only slot) an MMIO exit, a part on a tracked page
                       one tracked write (after an MMIO exit of the same store)
    HLT              HLT                                     done
    SHUTDOWN         SHUTDOWN (an exception with no IDT to take it: a triple fault)
    INTERNAL_ERROR   detail says why (emulation failure, fetch from a gpa without memory)
    KICKED           `kick()` was called: the vCPU stops between two instructions, and
                       a kick while it is not running makes the next `run` return KICKED
                       without running any
    DIRTY_RING_FULL  the vCPU's dirty ring reached its soft limit (KVM_EXIT_DIRTY_RING_FULL):
                       every `run` returns it, running nothing, until harvest and
                       `vm.reset_dirty_rings()` bring the ring below the limit; the write
                       that made the last entry may or may not have landed

Events: both engines deliver exceptions, INT n and SYSCALL as the CPU does (KVM itself;
Unicorn, which stops at each, through `kvmem.cpu.events`), so guests in every mode of
`kvmem.cpu.modes` — real, 32-bit protected, 64-bit, CPL 3 under the ring-0 stub — run on
both. An exception nothing can deliver is SHUTDOWN (a triple fault) on both.

At every exit: `get_regs` / `set_regs` / `get_state` / `set_state` may be called. Setting
registers at a read exit (whose registers are those before the instruction) drops the read:
the instruction runs again from the registers set, with a new exit. `get_state` at a read
exit finishes the instruction first on KVM (with the answer given, zeros without one) and
reports the state before it on Unicorn. `complete(data)` takes exactly `exit.answer_size`
bytes (`size * count` for IN, `size` for an MMIO read) and refuses any other length
(`EngineError(EINVAL)`); without it the guest reads zeros.

RFLAGS.RF (bit 16) at an exit is KVM's (its emulator writes RFLAGS back where it writes RIP
back): 1 at every write exit of a REP string instruction (MMIO write, OUTS element, a REP
INS's writeback) — EIP at it, even after its last element, until the next run finishes it;
0 at a write exit of any other instruction; at a read exit (IN, MMIO read) and a stop, as the
last write-back left it: as at the run's start if no instruction finished since, 1 if a REP
string instruction there went back to the guest meanwhile (a REP INS once its elements read
ahead are written, any other every 1024 iterations), else 0. HLT: 0. (Unicorn cannot see
the 1024-iteration re-entry of a REP instruction that began in the same run: there it
reports 0 where KVM reports 1.)
"""

from __future__ import annotations

import errno

from .. import vm as _vm
from ..contract import EngineCapabilities, EngineError, Exit, ExitKind, Regs
from ..vm import Engine, EngineVcpu, SlotsListener, Vm

__all__ = [
    "AttachedOnce",
    "Engine",
    "EngineCapabilities",
    "EngineError",
    "EngineVcpu",
    "Exit",
    "ExitKind",
    "Regs",
    "open_engine",
]


class AttachedOnce(SlotsListener):
    """What every engine has: its capabilities and the one `Vm` it is attached to."""

    _caps: EngineCapabilities
    _vm: Vm | None = None

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._caps

    @property
    def vm(self) -> Vm:
        if self._vm is None:
            raise EngineError(errno.EINVAL, "engine is not attached to a Vm")
        return self._vm

    def _claim(self, vm: Vm) -> None:
        """The first step of `attach`: refuse a second Vm, or more address spaces than
        the engine offers; then remember `vm`."""
        if self._vm is not None:
            raise EngineError(errno.EBUSY, "engine already attached to a Vm")
        if vm.address_spaces > self._caps.address_spaces:
            raise EngineError(errno.EINVAL, f"{self._caps.name} here has "
                                            f"{self._caps.address_spaces} address space(s); "
                                            f"the Vm has {vm.address_spaces}")
        self._vm = vm


def kvm_usable() -> str | None:
    """None when /dev/kvm runs guests here, else why not."""
    from ..kvmapi import kvm_available

    return kvm_available()


def open_engine(name: str) -> Engine:
    """A new, unattached engine: "kvm", "unicorn", or "auto" (KVM when /dev/kvm works)."""
    if name == "auto":
        name = "kvm" if kvm_usable() is None else "unicorn"
    if name == "kvm":
        from .kvm import KvmEngine

        return KvmEngine()
    if name == "unicorn":
        from .unicorn import UnicornEngine

        return UnicornEngine()
    raise ValueError(f"unknown engine {name!r}: use 'kvm', 'unicorn' or 'auto'")


_vm.register_engine_opener(open_engine)
