"""Raw vCPUs: one `/dev/kvm` vCPU or one Unicorn CPU over a plain host buffer, no `Vm`.

Defines:
- `GuestMemory` — anonymous host memory seen by the guest at gpa 0..size; both kinds of raw
  vCPU map the *same* buffer (KVM through a memory slot, Unicorn through `mem_map_ptr`), so a
  guest can stop on one engine and go on on the other with nothing but its `VcpuState` moved;
- `RawExit` — why `run` returned: port I/O, HLT, shutdown (triple fault), or an error;
- `KvmCpu`, `UcCpu` — `get_state`, `set_state`, `run`, `complete` (the answer to an IN),
  `close`, with the same exits on both engines. `UcCpu.run` delivers exceptions, INT n and
  SYSCALL in software (`events.deliver`), the one thing Unicorn does not do itself.

Why: the state, mode and paging code of `kvmem.cpu` is checked and measured at this level
(tests/test_cpu_*.py, benchmarks/bench_cpu.py); the engines integrate the same functions over
kvmem's own memory and MMU.

Rules: a raw vCPU owns what it creates (fds, Uc) and closes it; the `GuestMemory` belongs to the
caller and must outlive every vCPU that maps it. MMIO does not exist here: every gpa below
`size` is RAM, and an access beyond it is an "error" exit.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field
from typing import Final, Protocol

from unicorn import unicorn_const as UC
from unicorn import x86_const as X
from unicorn.unicorn_py3 import Uc, UcError

from .. import kvmapi
from . import kvm_state, uc_state
from .events import TripleFault, UnmodelledEvent, deliver
from .state import VcpuState

__all__ = ["GuestMemory", "KvmCpu", "RawCpu", "RawExit", "UcCpu"]

_GUEST_BASE: Final = 0


class GuestMemory:
    """`size` bytes of anonymous memory, guest physical addresses 0..size."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"size {size:#x} must be a positive multiple of the page size")
        self.size = size
        self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.hva = ctypes.addressof(self._anchor)

    def _range(self, gpa: int, n: int) -> slice:
        if not (gpa >= 0 and n >= 0 and gpa + n <= self.size):
            raise ValueError(f"[{gpa:#x}, {gpa + n:#x}) is outside guest memory "
                             f"[0, {self.size:#x})")
        return slice(gpa, gpa + n)

    def read(self, gpa: int, n: int) -> bytes:
        return self._map[self._range(gpa, n)]

    def write(self, gpa: int, data: bytes) -> None:
        self._map[self._range(gpa, len(data))] = data

    def close(self) -> None:
        del self._anchor
        self._map.close()


@dataclass(frozen=True, slots=True)
class RawExit:
    """`kind` "io" (port, size, is_write, data: the bytes an OUT wrote), "hlt", "shutdown" or
    "error" (detail says what)."""

    kind: str
    port: int = 0
    size: int = 0
    is_write: bool = False
    data: bytes = b""
    detail: str = field(default="", compare=False)

    @property
    def value(self) -> int:
        """The value an OUT wrote."""
        return int.from_bytes(self.data, "little")


class RawCpu(Protocol):
    name: str
    memory: GuestMemory

    def get_state(self) -> VcpuState: ...

    def set_state(self, state: VcpuState) -> None: ...

    def run(self) -> RawExit: ...

    def complete(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class KvmCpu:
    """A KVM VM with one memory slot over `memory` and one vCPU with KVM's full CPUID."""

    name = "kvm"

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._kvm = kvmapi.Kvm()
        try:
            self._vm = self._kvm.create_vm()
            self._vm.set_user_memory_region(0, 0, _GUEST_BASE, memory.size, memory.hva)
            self.vcpu = self._vm.create_vcpu(0)
            self.cpuid = kvm_state.setup_cpuid(self._kvm, self.vcpu)
        except BaseException:
            self._kvm.close()
            raise
        self.features = kvm_state.paging_features(self.cpuid)
        self._io: kvmapi.KvmIo | None = None

    def get_state(self) -> VcpuState:
        return kvm_state.get_state(self.vcpu)

    def set_state(self, state: VcpuState) -> None:
        kvm_state.set_state(self.vcpu, state)

    def run(self) -> RawExit:
        self._io = None
        reason = self.vcpu.run()
        if reason == kvmapi.KVM_EXIT_IO:
            io = self._io = self.vcpu.io()
            data = self.vcpu.io_data(io) if io.is_write else b""
            return RawExit("io", io.port, io.size, io.is_write, data)
        if reason == kvmapi.KVM_EXIT_HLT:
            return RawExit("hlt")
        if reason == kvmapi.KVM_EXIT_SHUTDOWN:
            return RawExit("shutdown")
        detail = f"exit reason {reason}"
        if reason == kvmapi.KVM_EXIT_INTERNAL_ERROR:
            detail += f", internal error {self.vcpu.internal_error()}"
        return RawExit("error", detail=detail)

    def complete(self, data: bytes) -> None:
        if self._io is None or self._io.is_write:
            raise ValueError("no IN is waiting for data")
        self.vcpu.set_io_data(self._io, data)

    def close(self) -> None:
        self.vcpu.close()
        self._vm.close()
        self._kvm.close()


class UcCpu:
    """A Unicorn CPU (UC_MODE_64, any mode by its state) with `memory` mapped at gpa 0."""

    name = "unicorn"
    features = uc_state.PAGING_FEATURES

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.uc = Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)
        self.uc.mem_map_ptr(_GUEST_BASE, memory.size, UC.UC_PROT_ALL, memory.hva)
        uc_state.configure(self.uc)
        self._trap = uc_state.UcTrap(self.uc)
        self._exit: RawExit | None = None
        self._in_size = 0
        self.uc.hook_add(UC.UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        self.uc.hook_add(UC.UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _: object) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._exit = RawExit("io", port, size, True, data)
        uc.emu_stop()

    def _on_in(self, uc: Uc, port: int, size: int, _: object) -> int:
        # Unicorn completes the IN with the value returned here; `complete` patches RAX later
        self._exit = RawExit("io", port, size, False)
        self._in_size = size
        uc.emu_stop()
        return 0

    def get_state(self) -> VcpuState:
        return uc_state.get_state(self.uc)

    def set_state(self, state: VcpuState) -> None:
        uc_state.set_state(self.uc, state)

    def run(self) -> RawExit:
        self._exit = None
        self._in_size = 0
        while True:
            try:
                uc_state.resume(self.uc)
                event = self._trap.take()
            except UcError as e:
                rip = int(self.uc.reg_read(X.UC_X86_REG_RIP))
                if e.errno != UC.UC_ERR_INSN_INVALID:
                    return RawExit("error", detail=f"Unicorn: {e} at rip {rip:#x}")
                event = self._trap.invalid_opcode()
            if self._exit is not None:
                return self._exit
            if event is None:
                return RawExit("hlt")
            try:
                state = deliver(self.get_state(), event, self.memory.read, self.memory.write,
                                features=self.features)
            except TripleFault as e:
                return RawExit("shutdown", detail=str(e))
            except UnmodelledEvent as e:
                return RawExit("error", detail=f"cannot deliver {event}: {e}")
            self.set_state(state)

    def complete(self, data: bytes) -> None:
        if not self._in_size:
            raise ValueError("no IN is waiting for data")
        if len(data) != self._in_size:
            raise ValueError(f"an IN of {self._in_size} bytes needs {self._in_size} bytes")
        mask = (1 << (8 * self._in_size)) - 1
        rax = int(self.uc.reg_read(X.UC_X86_REG_RAX))
        value = int.from_bytes(data, "little")
        # a 32-bit register write zero-extends; 8/16-bit ones keep the rest of RAX
        rax = value if self._in_size == 4 else (rax & ~mask) | value
        self.uc.reg_write(X.UC_X86_REG_RAX, rax)
        self._in_size = 0

    def close(self) -> None:
        self._trap.remove(self.uc)
        self.uc.mem_unmap(_GUEST_BASE, self.memory.size)
