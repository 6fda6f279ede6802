"""Interrupt, exception and SYSCALL delivery in software, on a `VcpuState` and guest memory.

Defines:
- `Interrupt` (an exception or INT n, with its error code) and `Syscall` — the `Event`s;
- `deliver(state, event, read, write)` — the state after the CPU transferred control for the
  event: through the IVT in real mode, through a 64-bit IDT gate in long mode (stack switch by
  the TSS's RSP0-2 or IST, the interrupt frame pushed through the page tables), or to
  IA32_LSTAR/CSTAR/STAR for SYSCALL. A fault while delivering is handled as the SDM says
  (serially, or as a double fault; a fault while delivering a double fault is `TripleFault`).

Why: an engine that does not deliver events itself — Unicorn stops at every exception and
treats SYSCALL as a no-op — gets the same guest behaviour as KVM by calling this between two
runs (`uc_state.UcTrap` catches the event). The state it computes is the one KVM reports at the
handler's first instruction; the user-mode guests check that on both engines.

Rules:
- Pure: guest memory is read and written only through the callbacks, at guest physical
  addresses; linear addresses go through `paging.translate_gva` (supervisor accesses).
- Out of scope (`UnmodelledEvent`): gates of 16/32-bit protected-mode IDTs (a vector beyond
  the IDT's limit is handled: #GP, and so on to a triple fault), task gates, virtual-8086
  mode. The caller gets told, rather than a guess.
- RIP in `state` is what the event pushes: the faulting instruction for a fault, the next one
  for a trap or INT n, and, for `Syscall`, the instruction after SYSCALL.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .paging import DEFAULT_FEATURES, PageFault, PagingFeatures, translate_gva
from .state import (
    MSR_CSTAR,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    Segment,
    VcpuEvents,
    VcpuState,
)

__all__ = ["Event", "Interrupt", "Syscall", "TripleFault", "UnmodelledEvent", "deliver",
           "deliver_pending"]

Read = Callable[[int, int], bytes]
Write = Callable[[int, bytes], None]

_RFLAGS_TF: Final = 1 << 8
_RFLAGS_IF: Final = 1 << 9
_RFLAGS_NT: Final = 1 << 14
_RFLAGS_RF: Final = 1 << 16
_RFLAGS_VM: Final = 1 << 17
_RFLAGS_AC: Final = 1 << 18
_CR0_PE: Final = 1 << 0
_EFER_SCE: Final = 1 << 0
_EFER_LMA: Final = 1 << 10

_CONTRIBUTORY: Final = frozenset({0, 10, 11, 12, 13})
_NOT_FAULTS: Final = frozenset({1, 3, 4, 8, 18})  # traps (#DB, #BP, #OF) and aborts
_DF: Final = 8
_GP: Final = 13
_NP: Final = 11
_TS: Final = 10
_PF: Final = 14
_UD: Final = 6


@dataclass(frozen=True, slots=True)
class Interrupt:
    """An exception (`software` False; `error_code` for those that push one) or INT n / INT3
    / INTO (`software` True: the gate's DPL is checked against CPL). `cr2` is set for a #PF
    whose address the state does not already hold in CR2. `reinjected`: a delivery that had
    begun (KVM's "injected"), whose RFLAGS already carries the RF a fault sets — it is not
    set again, as KVM does not."""

    vector: int
    error_code: int | None = None
    software: bool = False
    cr2: int | None = None
    reinjected: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.vector <= 255:
            raise ValueError(f"vector {self.vector} is not 0..255")
        if self.error_code is not None and not 0 <= self.error_code < 1 << 32:
            raise ValueError(f"error code {self.error_code:#x} does not fit 32 bits")


@dataclass(frozen=True, slots=True)
class Syscall:
    """SYSCALL, executed (RIP already after its two bytes)."""


Event = Interrupt | Syscall


class UnmodelledEvent(Exception):
    """The event would be delivered through machinery this module does not model (a
    16/32-bit protected-mode IDT gate, a task gate, virtual-8086 mode, NMI or SMM): the
    caller is told instead of given a guess."""


class TripleFault(Exception):
    """A fault while delivering a double fault: the CPU shuts down (KVM_EXIT_SHUTDOWN)."""


class _Fault(Exception):
    def __init__(self, vector: int, error_code: int, cr2: int | None = None) -> None:
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


def deliver(state: VcpuState, event: Event, read: Read, write: Write, *,
            features: PagingFeatures = DEFAULT_FEATURES) -> VcpuState:
    """The state at the first instruction of the handler of `event` (see the module header)."""
    if isinstance(event, Syscall):
        if not state.sregs.efer & _EFER_SCE:
            # SYSCALL with EFER.SCE clear is #UD, a fault: RIP back at the instruction
            return deliver(state.with_regs(rip=(state.regs.rip - 2) & (1 << 64) - 1),
                           Interrupt(_UD), read, write, features=features)
        return _syscall(state)
    current = event
    while True:
        if current.cr2 is not None:
            state = state.with_sregs(cr2=current.cr2)
        try:
            return _Delivery(state, current, read, write, features).run()
        except _Fault as f:
            current = _next_event(current, Interrupt(f.vector, f.error_code, cr2=f.cr2))


def deliver_pending(state: VcpuState, read: Read, write: Write, *,
                    features: PagingFeatures = DEFAULT_FEATURES) -> VcpuState:
    """`state` with the exception or interrupt that `state.events` has in flight delivered,
    as KVM would at the next entry, and no event left: what an engine without event
    injection (Unicorn) can hold. The interrupt shadow, which only delays interrupts no
    such engine has, is dropped. NMI and SMI delivery are not modelled (`UnmodelledEvent`).
    """
    e = state.events
    if e.nmi.injected or e.nmi.pending or e.smi.pending or e.smi.smm:
        raise UnmodelledEvent(f"NMI / SMM delivery is not modelled: {e}")
    quiet = dataclasses.replace(state, events=VcpuEvents())
    if e.exception.injected or e.exception.pending:
        x = e.exception
        event = Interrupt(x.nr, x.error_code if x.has_error_code else None,
                          reinjected=bool(x.injected))
    elif e.interrupt.injected:
        event = Interrupt(e.interrupt.nr, software=bool(e.interrupt.soft), reinjected=True)
    else:
        return quiet
    return deliver(quiet, event, read, write, features=features)


def _kind(event: Interrupt) -> str:
    if event.software:
        return "benign"
    if event.vector == _PF:
        return "page fault"
    if event.vector == _DF:
        return "double fault"
    return "contributory" if event.vector in _CONTRIBUTORY else "benign"


def _next_event(first: Interrupt, second: Interrupt) -> Interrupt:
    """What is delivered when delivering `first` raised `second` (SDM vol. 3 table 6-5)."""
    a, b = _kind(first), _kind(second)
    if b in ("benign", "double fault"):
        return second
    if a == "double fault":
        raise TripleFault(f"#{second.vector} while delivering a double fault")
    if (a == "contributory" and b == "contributory") or a == "page fault":
        return Interrupt(_DF, 0)
    return second


# ---------------------------------------------------------------------------------------------


class _Delivery:
    def __init__(self, state: VcpuState, event: Interrupt, read: Read, write: Write,
                 features: PagingFeatures) -> None:
        self.state = state
        self.event = event
        self.read = read
        self.write = write
        self.features = features
        self.ext = 0 if event.software else 1  # EXT bit of the error codes raised here

    def run(self) -> VcpuState:
        s = self.state.sregs
        if not s.cr0 & _CR0_PE:
            return self.real_mode()
        if self.state.regs.rflags & _RFLAGS_VM:
            raise UnmodelledEvent("event delivery in virtual-8086 mode is not modelled")
        if not s.efer & _EFER_LMA:
            return self.legacy_gate()
        return self.long_mode()

    # -- memory by linear address ---------------------------------------------------------------
    def gpa(self, linear: int, write: bool) -> int:
        try:
            return translate_gva(self.read, self.state.sregs, linear & (1 << 64) - 1,
                                 write=write, features=self.features)
        except PageFault as pf:
            raise _Fault(_PF, pf.error_code, cr2=pf.gva) from None

    def read_linear(self, linear: int, size: int) -> bytes:
        out = b""
        while size:
            chunk = min(size, 0x1000 - (linear & 0xFFF))
            out += self.read(self.gpa(linear, False), chunk)
            linear, size = linear + chunk, size - chunk
        return out

    def write_linear(self, linear: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), 0x1000 - (linear & 0xFFF))
            self.write(self.gpa(linear, True), data[:chunk])
            linear, data = linear + chunk, data[chunk:]

    # -- real mode: the IVT ---------------------------------------------------------------------
    def real_mode(self) -> VcpuState:
        st, s, vec = self.state, self.state.sregs, self.event.vector
        if vec * 4 + 3 > s.idt.limit:
            raise _Fault(_GP, 0)
        ip, cs = struct.unpack("<HH", self.read_linear(s.idt.base + vec * 4, 4))
        sp = st.regs.rsp & 0xFFFF
        for value in (st.regs.rflags & 0xFFFF, s.cs.selector, st.regs.rip & 0xFFFF):
            sp = (sp - 2) & 0xFFFF
            self.write_linear(s.ss.base + sp, struct.pack("<H", value))
        rflags = st.regs.rflags & ~(_RFLAGS_IF | _RFLAGS_TF | _RFLAGS_AC | _RFLAGS_RF)
        # a real-mode CS load changes selector and base only
        state = st.with_segment("cs", selector=cs, base=cs << 4)
        return state.with_regs(rip=ip, rflags=rflags,
                               rsp=(st.regs.rsp & ~0xFFFF) | sp)

    # -- 16/32-bit protected mode: the gate's checks, not the delivery ---------------------------
    def legacy_gate(self) -> VcpuState:
        """The checks on a protected-mode IDT gate that fail before any delivery (the IDT
        limit, the gate type, a software event's DPL, the present bit: SDM vol. 3 §6.12.1) —
        so an empty or zeroed IDT ends in a triple fault as on a CPU; a good gate is
        `UnmodelledEvent`."""
        s, ev = self.state.sregs, self.event
        idt_error = ev.vector * 8 + 2 + self.ext
        if ev.vector * 8 + 7 > s.idt.limit:
            raise _Fault(_GP, idt_error)
        attr = self.read_linear(s.idt.base + ev.vector * 8 + 5, 1)[0]
        if attr & 0x1F not in (0x05, 0x06, 0x07, 0x0E, 0x0F):  # task, 16/32-bit int/trap
            raise _Fault(_GP, idt_error)
        if ev.software and (attr >> 5) & 3 < s.cs.dpl:
            raise _Fault(_GP, ev.vector * 8 + 2)
        if not attr & 0x80:
            raise _Fault(_NP, idt_error)
        raise UnmodelledEvent("event delivery through a 16/32-bit protected-mode IDT gate is "
                              "not modelled")

    # -- long mode: a 64-bit IDT -----------------------------------------------------------------
    def long_mode(self) -> VcpuState:
        st, s, ev = self.state, self.state.sregs, self.event
        vec, ext = ev.vector, self.ext
        idt_error = vec * 8 + 2 + ext
        if vec * 16 + 15 > s.idt.limit:
            raise _Fault(_GP, idt_error)
        lo, sel, ist, attr, mid, hi, _ = struct.unpack(
            "<HHBBHII", self.read_linear(s.idt.base + vec * 16, 16))
        gate_type, gate_dpl, gate_p = attr & 0xF, (attr >> 5) & 3, attr >> 7
        cpl = s.ss.dpl
        if gate_type not in (0xE, 0xF):
            raise _Fault(_GP, idt_error)
        if ev.software and gate_dpl < cpl:
            raise _Fault(_GP, vec * 8 + 2)
        if not gate_p:
            raise _Fault(_NP, idt_error)
        cs = self.code_segment(sel, cpl)
        new_cpl = cs.dpl
        if ist & 7:
            rsp = self.tss_u64(0x24 + 8 * ((ist & 7) - 1))
        elif new_cpl < cpl:
            rsp = self.tss_u64(4 + 8 * new_cpl)
        else:
            rsp = st.regs.rsp
        rsp &= ~0xF & (1 << 64) - 1
        pushed_rflags = st.regs.rflags
        if not ev.software and not ev.reinjected and vec not in _NOT_FAULTS:
            # a fault pushes RFLAGS.RF set, so IRET does not re-trigger an instruction
            # breakpoint on the retried instruction (SDM vol. 3 §17.3.1.1; KVM does the same)
            pushed_rflags |= _RFLAGS_RF
        frame = [s.ss.selector, st.regs.rsp, pushed_rflags, s.cs.selector, st.regs.rip]
        if ev.error_code is not None:
            frame.append(ev.error_code)
        rsp = (rsp - 8 * len(frame)) & (1 << 64) - 1
        self.write_linear(rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame)))
        rflags = st.regs.rflags & ~(_RFLAGS_TF | _RFLAGS_NT | _RFLAGS_RF | _RFLAGS_VM)
        if gate_type == 0xE:
            rflags &= ~_RFLAGS_IF
        sregs = {"cs": dataclasses.replace(cs, selector=(sel & ~3) | new_cpl)}
        if new_cpl != cpl:
            # 64-bit mode: a privilege change loads SS with a null selector of the new RPL
            sregs["ss"] = Segment(base=0, limit=0, selector=new_cpl, type=0, present=0,
                                  dpl=new_cpl, s=0, unusable=1)
        state = st.with_sregs(**sregs)
        return state.with_regs(rip=lo | (mid << 16) | (hi << 32), rsp=rsp, rflags=rflags)

    def code_segment(self, sel: int, cpl: int) -> Segment:
        """The 64-bit code segment `sel` names, for a gate (SDM "64-bit mode IDT")."""
        s, ext = self.state.sregs, self.ext
        err = (sel & 0xFFFC) + ext
        if not sel & ~3:
            raise _Fault(_GP, ext)
        table = s.ldt if sel & 4 else s.gdt
        index = sel & ~7
        if index + 7 > table.limit:
            raise _Fault(_GP, err)
        raw = self.read_linear(table.base + index, 8)
        lo, hi = struct.unpack("<II", raw)
        type_, code_s, dpl = (hi >> 8) & 15, (hi >> 12) & 1, (hi >> 13) & 3
        present, l_bit, db, g = (hi >> 15) & 1, (hi >> 21) & 1, (hi >> 22) & 1, (hi >> 23) & 1
        if not code_s or not type_ & 8 or not l_bit or db or dpl > cpl:
            raise _Fault(_GP, err)
        if not present:
            raise _Fault(_NP, err)
        if not type_ & 1:  # a descriptor load sets the accessed bit in the table
            self.write_linear(table.base + index + 5, bytes([(hi >> 8) & 0xFF | 1]))
        limit = (lo & 0xFFFF) | (hi & 0xF_0000)
        if g:
            limit = (limit << 12) | 0xFFF
        new_cpl = cpl if type_ & 4 else dpl  # a conforming segment keeps CPL
        base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF00_0000)
        return Segment(base=base, limit=limit, selector=sel, type=type_ | 1, present=1,
                       dpl=new_cpl, db=0, s=1, l=1, g=g, avl=(hi >> 20) & 1)

    def tss_u64(self, offset: int) -> int:
        tr = self.state.sregs.tr
        if offset + 7 > tr.limit:
            raise _Fault(_TS, (tr.selector & 0xFFFC) + self.ext)
        return int(struct.unpack("<Q", self.read_linear(tr.base + offset, 8))[0])


def _syscall(state: VcpuState) -> VcpuState:
    """SYSCALL (SDM vol. 2 / AMD APM vol. 3): flat CS and SS from IA32_STAR[47:32], CPL 0."""
    s, r, m = state.sregs, state.regs, state.msrs
    sel = (m[MSR_STAR] >> 32) & 0xFFFF
    long_mode = bool(s.efer & _EFER_LMA)
    cs = Segment(base=0, limit=0xFFFF_FFFF, selector=sel & 0xFFFC, type=11, present=1, dpl=0,
                 db=0 if long_mode else 1, s=1, l=1 if long_mode else 0, g=1)
    ss = Segment(base=0, limit=0xFFFF_FFFF, selector=(sel + 8) & 0xFFFF, type=3, present=1,
                 dpl=0, db=1, s=1, g=1)
    state = state.with_sregs(cs=cs, ss=ss)
    if long_mode:
        target = m[MSR_LSTAR] if s.cs.l else m[MSR_CSTAR]
        return state.with_regs(rcx=r.rip, r11=r.rflags & ~_RFLAGS_RF, rip=target,
                               rflags=r.rflags & ~m[MSR_SFMASK] & ~_RFLAGS_RF
                               & (1 << 64) - 1)
    return state.with_regs(rcx=r.rip & 0xFFFF_FFFF, rip=m[MSR_STAR] & 0xFFFF_FFFF,
                           rflags=r.rflags & ~(_RFLAGS_VM | _RFLAGS_IF | _RFLAGS_RF))
