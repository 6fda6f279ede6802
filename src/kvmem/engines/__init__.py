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

Rules: engines sit above the `Vm`. They hear about it only as a `SlotsListener` (slot
changes, tracking changes, dirty-log syncs) and, for Unicorn, as a stage-2 mirror of the
MMU; they use only public interfaces. The `Vm` never imports this package — it calls the
opener that this module registers (`vm.register_engine_opener`).

Answering a read: after an `Exit` that reads (IN, MMIO read) call `vcpu.complete(data)`
before the next `run()`; without it the guest reads zeros.
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
