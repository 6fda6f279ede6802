"""The data an engine and the `Vm` exchange: why a vCPU stopped, its registers, what an
engine offers, and how an engine fails.

Defines `ExitKind`, `Exit`, `Regs`, `EngineCapabilities`, `EngineError`. The protocols an
engine implements (`Engine`, `EngineVcpu`) are in `kvmem.vm`, the layer that calls them;
the engines themselves live above it, in `kvmem.engines` (which re-exports all of this).

Rules of this room: plain values only — nothing here runs, locks or imports the layers
that use it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import Enum

from .errors import KvmError

__all__ = ["EngineCapabilities", "EngineError", "Exit", "ExitKind", "Regs"]


class ExitKind(Enum):
    IO = "io"
    MMIO = "mmio"
    HLT = "hlt"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    KICKED = "kicked"
    DIRTY_RING_FULL = "dirty_ring_full"  # KVM_EXIT_DIRTY_RING_FULL: reset the rings first


@dataclass(frozen=True, slots=True)
class Exit:
    """One exit of `Vcpu.run`, with KVM's fields and conventions on every engine (the
    table is in `kvmem.engines`). `addr` is the port (IO) or the gpa (MMIO); `size` the bytes
    of one access; `count` the accesses of a string IN (KVM_EXIT_IO's count: `rep insb`
    reads up to a page or 1 KiB ahead in one exit; every other exit has 1); `data` the bytes
    written (empty for reads). `detail` is engine-specific and not compared."""

    kind: ExitKind
    addr: int = 0
    size: int = 0
    is_write: bool = False
    data: bytes = b""
    detail: str = field(default="", compare=False)
    count: int = 1

    @property
    def answer_size(self) -> int:
        """The bytes `complete(data)` takes after this exit: `size * count` for an IN, `size`
        for an MMIO read, 0 for an exit that does not read."""
        return self.size * self.count if self.reads else 0

    def check_answer(self, data: bytes) -> bytes:
        """`data` as the answer to this exit, or `EngineError(EINVAL)` saying why not."""
        if not self.reads:
            raise EngineError(errno.EINVAL, f"no read exit is waiting for data (last: {self})")
        if len(data) != self.answer_size:
            what = (f"{self.count}x{self.size}" if self.kind is ExitKind.IO else str(self.size))
            raise EngineError(errno.EINVAL, f"{self} needs {self.answer_size} bytes of data "
                                            f"({what}), got {len(data)}")
        return bytes(data)

    @property
    def reads(self) -> bool:
        """The guest waits for `complete(data)`: an IN or an MMIO read."""
        return self.kind in (ExitKind.IO, ExitKind.MMIO) and not self.is_write

    def __str__(self) -> str:
        if self.kind is ExitKind.IO:
            op = f"out {self.data.hex()}" if self.is_write else "in"
            times = f"x{self.count}" if self.count != 1 else ""
            return f"io {self.addr:#x}/{self.size}{times} {op}"
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
    phys_bits: int = 64  # the guest physical address width slots may reach
    guest_memfd: bool = False  # mirrors KVM_MEM_GUEST_MEMFD slots (`Engine.create_guest_memfd`)
    dirty_ring_max_bytes: int = 1 << 20  # KVM_CAP_DIRTY_LOG_RING's answer; 0: no rings


class EngineError(KvmError):
    """The engine cannot mirror kvmem's state any more (a refused ioctl): its vCPUs no
    longer run. The message says which request failed."""
