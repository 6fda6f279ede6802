"""Engines: what runs guest code on a kvmem `Vm` — `/dev/kvm` or Unicorn.

Defines:
- `Exit` / `ExitKind` — why a vCPU stopped, with the same shape on every engine: port I/O
  (port, size, direction, bytes written), MMIO (gpa, size, direction, bytes written), halt,
  shutdown (an exception the guest could not deliver: triple fault), internal error (the
  engine could not go on, e.g. code fetched from a gpa without memory), kicked (another
  thread called `kick`).
- `Regs` — the registers of a 32-bit protected-mode guest, the mode every engine starts
  a vCPU in (`EngineVcpu.start`): flat 4 GiB segments, CPL 0, no paging, no IDT.
- `Engine` / `EngineVcpu` — the contract (DESIGN "Engines"): an engine is a `Vm` listener
  that applies slot deltas in commit order, creates vCPUs, runs one until an exit, kicks a
  running one from another thread, folds its dirty log into kvmem's when a log is read
  (`dirty_log_sync`), and reports `EngineCapabilities`.
- `open_engine(name)` — "kvm", "unicorn" or "auto" (KVM where /dev/kvm works, else Unicorn).

Rules: engines sit above the `Vm`. They hear about it only as a listener (slot changes,
tracking changes, dirty-log syncs) and through the stage-2 mirror hook of the MMU; the
`Vm` never imports this package — it calls the opener that this module registers
(`vm.register_engine_opener`).

Answering a read: after an `Exit` that reads (IN, MMIO read) call `vcpu.complete(data)`
before the next `run()`; without it the guest reads zeros.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from .. import vm as _vm
from ..errors import KvmError

if TYPE_CHECKING:
    from ..slots import Change, MemorySlot
    from ..vm import Vcpu, Vm

__all__ = [
    "Engine",
    "EngineCapabilities",
    "EngineError",
    "EngineVcpu",
    "Exit",
    "ExitKind",
    "Regs",
    "open_engine",
]


class ExitKind(Enum):
    IO = "io"
    MMIO = "mmio"
    HLT = "hlt"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    KICKED = "kicked"


@dataclass(frozen=True, slots=True)
class Exit:
    """One exit of `EngineVcpu.run`. `addr` is the port (IO) or the gpa (MMIO); `data` the
    bytes written (empty for reads). `detail` is engine-specific and not compared."""

    kind: ExitKind
    addr: int = 0
    size: int = 0
    is_write: bool = False
    data: bytes = b""
    detail: str = field(default="", compare=False)

    @property
    def reads(self) -> bool:
        """The guest waits for `complete(data)`: an IN or an MMIO read."""
        return self.kind in (ExitKind.IO, ExitKind.MMIO) and not self.is_write

    def __str__(self) -> str:
        if self.kind is ExitKind.IO:
            op = f"out {self.data.hex()}" if self.is_write else "in"
            return f"io {self.addr:#x}/{self.size} {op}"
        if self.kind is ExitKind.MMIO:
            op = f"write {self.data.hex()}" if self.is_write else "read"
            return f"mmio {self.addr:#x}/{self.size} {op}"
        return str(self.kind.value) + (f" ({self.detail})" if self.detail else "")


@dataclass
class Regs:
    """The general registers of a 32-bit guest (the low halves where the engine has 64)."""

    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    esi: int = 0
    edi: int = 0
    esp: int = 0
    ebp: int = 0
    eip: int = 0
    eflags: int = 0x2


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    name: str
    address_spaces: int
    max_slots: int
    readonly_mem: bool
    dirty_log: bool
    write_tracking: bool


class EngineError(KvmError):
    """The engine cannot mirror kvmem's state any more (a refused ioctl): its vCPUs no
    longer run. The message says which request failed."""


class AttachedOnce:
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


class EngineVcpu(Protocol):
    """A vCPU of an engine. `run`, `complete`, `regs` and `start` belong to the thread that
    runs it; `kick` may come from any thread."""

    @property
    def id(self) -> int: ...

    @property
    def vcpu(self) -> Vcpu:
        """kvmem's view of this vCPU (its address space, its memory path)."""

    def start(self, entry: int, regs: Regs | None = None) -> None:
        """Reset to 32-bit protected mode (flat segments, CPL 0, no paging) at `entry`."""

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None: ...

    def run(self) -> Exit:
        """Run guest code until the next exit."""

    def complete(self, data: bytes) -> None:
        """The answer to the last reading exit, delivered when `run` resumes the guest."""

    def kick(self) -> None:
        """Make a running (or the next) `run` return `ExitKind.KICKED` promptly."""


class Engine(Protocol):
    """An engine attached to one `Vm` (a listener of its slot updates)."""

    name: str
    stats: dict[str, int]

    @property
    def capabilities(self) -> EngineCapabilities: ...

    def attach(self, vm: Vm) -> None:
        """Mirror `vm`'s current slots and listen to it from now on (called by `Vm`)."""

    def create_vcpu(self, vcpu_id: int) -> EngineVcpu:
        """`vm.create_vcpu(vcpu_id)` and this engine's vCPU over it."""

    @property
    def vcpus(self) -> Sequence[EngineVcpu]: ...

    def close(self) -> None:
        """Stop listening, stop every vCPU, release the engine's resources."""

    # listener methods (SlotsListener, plus tracking and dirty-log sync)
    def slots_invalidated(self, vm: Vm, slot: MemorySlot) -> None: ...

    def slots_updating(self, vm: Vm, changes: list[Change]) -> None: ...

    def slots_committed(self, vm: Vm, changes: list[Change]) -> None: ...

    def dirty_log_sync(self, vm: Vm, slot: MemorySlot) -> None:
        """Fold the engine's dirty bits of `slot` into kvmem's bitmap (slots_lock held)."""


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
