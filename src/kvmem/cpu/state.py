"""The whole architectural state of one x86 vCPU, as values: `VcpuState`.

Defines:
- `Regs`, `Segment`, `DTable`, `Sregs`, `Fpu`, `Msrs`, `ExceptionEvent`, `InterruptEvent`,
  `NmiEvent`, `SmiEvent`, `VcpuEvents` and `VcpuState` — frozen dataclasses that carry KVM's
  struct and field names (struct kvm_regs, kvm_sregs, kvm_segment, kvm_dtable, kvm_fpu,
  kvm_msrs, kvm_vcpu_events, kvm_mp_state), so what a VMM author knows of KVM applies;
- the MSR indices a state carries (`SUPPORTED_MSRS`: the ones both engines hold);
- `canonical(state)` — the one place where the engines' different spellings of the same
  architectural situation are made equal (the rules are the table `CANONICAL_RULES`);
- `VcpuState.to_bytes()` / `VcpuState.from_bytes()` — the versioned serialised form.

Rules of this file:
- Values only: nothing here talks to an engine, and nothing here imports the rest of kvmem.
  `kvm_state` and `uc_state` translate between an engine and these values.
- Every field is checked where a value is made: an int that does not fit the field's width
  (as in the uapi struct) is a `ValueError`, anything that is not an int a `TypeError`; both
  name the class and the field. `bool` is accepted where the uapi has a u8 flag, stored as 0/1.
- The state is *consistent*: `msrs[MSR_FS_BASE]` is `sregs.fs.base` and `msrs[MSR_GS_BASE]`
  is `sregs.gs.base` (KVM reads both from the same place); a state saying otherwise is refused.

What the state leaves out, and why:
- `kvm_sregs.interrupt_bitmap`: it is the queue of an external interrupt injected through the
  userspace irqchip, which KVM also reports, as the same vector, in
  `events.interrupt` (injected, nr) — keeping both would make two spellings of one fact.
  `kvm_state.set_state` writes an empty bitmap and the interrupt through KVM_SET_VCPU_EVENTS.
- IA32_EFER lives in `sregs.efer` only (KVM_SET_SREGS sets it, with its consistency checks).
- `kvm_vcpu_events.triple_fault` and the exception payload: KVM reports them only after
  KVM_CAP_X86_TRIPLE_FAULT_EVENT / KVM_CAP_EXCEPTION_PAYLOAD are enabled, which kvmem does not.
- debug registers, XSAVE beyond the legacy area (YMM upper halves, AVX-512), XCR0, the local
  APIC page, and MSRs outside `SUPPORTED_MSRS`: not part of version 1.

Theory of the canonical form. The same architectural situation reads differently on the two
engines: KVM sets the accessed bit of every segment it loads and reports TR as busy, QEMU's
(Unicorn's) caches keep the descriptor type as read; KVM's `unusable` has no QEMU field at all
(QEMU's own KVM glue uses "unusable = not present"); CR0.ET is hardwired to 1 on QEMU; the six
padding bytes of each x87 register in kvm_fpu are whatever FXSAVE left. `canonical()` maps every
spelling to one, so `get_state` on both engines returns equal states for the same situation, and
each rule in `CANONICAL_RULES` says which hardware fact makes it lossless.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

__all__ = [
    "CANONICAL_RULES",
    "FORMAT_VERSION",
    "MP_STATE_RUNNABLE",
    "MSR_CSTAR",
    "MSR_FS_BASE",
    "MSR_GS_BASE",
    "MSR_IA32_SYSENTER_CS",
    "MSR_IA32_SYSENTER_EIP",
    "MSR_IA32_SYSENTER_ESP",
    "MSR_IA32_TSC",
    "MSR_KERNEL_GS_BASE",
    "MSR_LSTAR",
    "MSR_SFMASK",
    "MSR_STAR",
    "SUPPORTED_MSRS",
    "DTable",
    "ExceptionEvent",
    "Fpu",
    "InterruptEvent",
    "Msrs",
    "NmiEvent",
    "Regs",
    "Segment",
    "SmiEvent",
    "Sregs",
    "VcpuEvents",
    "VcpuState",
    "canonical",
]

# MSR indices (Intel SDM vol. 4; AMD APM vol. 2 for the SYSCALL ones)
MSR_IA32_TSC: Final = 0x10
MSR_IA32_SYSENTER_CS: Final = 0x174
MSR_IA32_SYSENTER_ESP: Final = 0x175
MSR_IA32_SYSENTER_EIP: Final = 0x176
MSR_STAR: Final = 0xC000_0081
MSR_LSTAR: Final = 0xC000_0082
MSR_CSTAR: Final = 0xC000_0083
MSR_SFMASK: Final = 0xC000_0084
MSR_FS_BASE: Final = 0xC000_0100
MSR_GS_BASE: Final = 0xC000_0101
MSR_KERNEL_GS_BASE: Final = 0xC000_0102

SUPPORTED_MSRS: Final = (
    MSR_IA32_TSC,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SFMASK,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
)
"""The MSRs a state carries: every one both engines can hold. MSR_IA32_TSC is a clock: it
advances between two reads of the same vCPU (on KVM even while the vCPU does not run), so two
`get_state` calls differ there and nowhere else if the guest did not run."""

MP_STATE_RUNNABLE: Final = 0  # KVM_MP_STATE_RUNNABLE

_CR0_ET: Final = 1 << 4
_RFLAGS_FIXED: Final = 1 << 1
_SEG_NAMES: Final = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


# ---------------------------------------------------------------------------------------------
# field checking: every value class lists the width of each of its int fields


def _check_int(owner: object, name: str, value: object, bits: int) -> int:
    cls = type(owner).__name__
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int):
        raise TypeError(f"{cls}.{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{cls}.{name}={value:#x} does not fit its {bits}-bit field")
    return value


def _check_fields(obj: Any) -> None:
    """Check (and store as plain int) every field named in `obj._BITS`."""
    for name, bits in obj._BITS.items():
        value = _check_int(obj, name, getattr(obj, name), bits)
        object.__setattr__(obj, name, value)


def _check_type(owner: object, name: str, value: object, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{type(owner).__name__}.{name} must be a {cls.__name__}, "
                        f"got {type(value).__name__}")


def _check_blobs(owner: object, name: str, value: object, count: int, size: int
                 ) -> tuple[bytes, ...]:
    cls = type(owner).__name__
    if not isinstance(value, tuple | list) or len(value) != count:
        raise TypeError(f"{cls}.{name} must be a tuple of {count} values of {size} bytes")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, bytes | bytearray):
            raise TypeError(f"{cls}.{name}[{i}] must be bytes, got {type(v).__name__}")
        if len(v) != size:
            raise ValueError(f"{cls}.{name}[{i}] must be {size} bytes, got {len(v)}")
        out.append(bytes(v))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the values


@dataclass(frozen=True, slots=True)
class Regs:
    """struct kvm_regs: the general registers, RIP and RFLAGS (64 bits each)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = _RFLAGS_FIXED

    NAMES: ClassVar[tuple[str, ...]] = (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")
    _BITS: ClassVar[dict[str, int]] = dict.fromkeys(NAMES, 64)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True, slots=True)
class Segment:
    """struct kvm_segment: a segment register with its hidden part (the descriptor cache).
    `limit` is the byte limit (already scaled by `g`); `type`, `s`, `dpl`, `db`, `l`, `g`,
    `avl` are the descriptor's fields; `unusable` is VMX's "segment unusable" (see
    `canonical`). The default is a real-mode data segment at 0."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the uapi's name
    g: int = 0
    avl: int = 0
    unusable: int = 0

    _BITS: ClassVar[dict[str, int]] = {
        "base": 64, "limit": 32, "selector": 16, "type": 4, "present": 1, "dpl": 2, "db": 1,
        "s": 1, "l": 1, "g": 1, "avl": 1, "unusable": 1}

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def usable(self) -> bool:
        return bool(self.present) and not self.unusable


@dataclass(frozen=True, slots=True)
class DTable:
    """struct kvm_dtable: GDTR / IDTR."""

    base: int = 0
    limit: int = 0xFFFF

    _BITS: ClassVar[dict[str, int]] = {"base": 64, "limit": 16}

    def __post_init__(self) -> None:
        _check_fields(self)


def _reset_cs() -> Segment:
    return Segment(base=0xFFFF_0000, selector=0xF000, type=11)


@dataclass(frozen=True, slots=True)
class Sregs:
    """struct kvm_sregs without the interrupt bitmap (see the module header). The default is
    the state of a vCPU after reset (what KVM_CREATE_VCPU gives): real mode at f000:fff0."""

    cs: Segment = field(default_factory=_reset_cs)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=0))
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0x6000_0010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE0_0900

    SEGMENTS: ClassVar[tuple[str, ...]] = _SEG_NAMES
    CONTROL: ClassVar[tuple[str, ...]] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                          "apic_base")
    _BITS: ClassVar[dict[str, int]] = dict.fromkeys(CONTROL, 64)

    def __post_init__(self) -> None:
        for name in self.SEGMENTS:
            _check_type(self, name, getattr(self, name), Segment)
        for name in ("gdt", "idt"):
            _check_type(self, name, getattr(self, name), DTable)
        _check_fields(self)


@dataclass(frozen=True, slots=True)
class Fpu:
    """struct kvm_fpu: `fpr[i]` is ST(i) (stack order, as FXSAVE stores it: an 80-bit value in
    the low 10 of 16 bytes), `ftwx` the abridged tag (bit i set: *physical* register i is not
    empty), `last_opcode` / `last_ip` / `last_dp` the x87 instruction and data pointers, `xmm`
    XMM0-15 (16 bytes little-endian each). The default is the state after reset."""

    fpr: tuple[bytes, ...] = (bytes(16),) * 8
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: tuple[bytes, ...] = (bytes(16),) * 16
    mxcsr: int = 0x1F80

    _BITS: ClassVar[dict[str, int]] = {"fcw": 16, "fsw": 16, "ftwx": 8, "last_opcode": 16,
                                       "last_ip": 64, "last_dp": 64, "mxcsr": 32}

    def __post_init__(self) -> None:
        object.__setattr__(self, "fpr", _check_blobs(self, "fpr", self.fpr, 8, 16))
        object.__setattr__(self, "xmm", _check_blobs(self, "xmm", self.xmm, 16, 16))
        _check_fields(self)


class Msrs(Mapping[int, int]):
    """MSR index → value for exactly the MSRs in `SUPPORTED_MSRS` (immutable, hashable).
    `Msrs(values)` is every supported MSR at 0, overlaid with `values`; an index outside
    `SUPPORTED_MSRS` is refused."""

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[int, int] | Iterable[tuple[int, int]] = ()) -> None:
        given = dict(values.items() if isinstance(values, Mapping) else values)
        merged = dict.fromkeys(SUPPORTED_MSRS, 0)
        for index, value in given.items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"Msrs: an MSR index must be an int, got {index!r:.40}")
            if index not in merged:
                raise ValueError(f"Msrs: MSR {index:#x} is not one a VcpuState carries "
                                 f"(those are {', '.join(hex(i) for i in SUPPORTED_MSRS)})")
            merged[index] = _check_int(self, f"[{index:#x}]", value, 64)
        self._items: tuple[tuple[int, int], ...] = tuple(sorted(merged.items()))

    def __getitem__(self, index: int) -> int:
        for i, v in self._items:
            if i == index:
                return v
        raise KeyError(index)

    def __iter__(self) -> Iterator[int]:
        return (i for i, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Msrs):
            return self._items == other._items
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return "Msrs({" + ", ".join(f"{i:#x}: {v:#x}" for i, v in self._items) + "})"

    def replace(self, values: Mapping[int, int]) -> Msrs:
        """A copy with `values` overriding."""
        return Msrs({**dict(self._items), **values})


@dataclass(frozen=True, slots=True)
class ExceptionEvent:
    """kvm_vcpu_events.exception: an exception being delivered (`injected`) or raised and not
    yet delivered (`pending`; KVM reports it only with KVM_CAP_EXCEPTION_PAYLOAD, else as
    injected)."""

    injected: int = 0
    nr: int = 0
    has_error_code: int = 0
    pending: int = 0
    error_code: int = 0

    _BITS: ClassVar[dict[str, int]] = {"injected": 1, "nr": 8, "has_error_code": 1,
                                       "pending": 1, "error_code": 32}

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True, slots=True)
class InterruptEvent:
    """kvm_vcpu_events.interrupt: an interrupt being delivered (`soft`: from INT n), and the
    interrupt shadow (KVM_X86_SHADOW_INT_MOV_SS 1, KVM_X86_SHADOW_INT_STI 2)."""

    injected: int = 0
    nr: int = 0
    soft: int = 0
    shadow: int = 0

    _BITS: ClassVar[dict[str, int]] = {"injected": 1, "nr": 8, "soft": 1, "shadow": 2}

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True, slots=True)
class NmiEvent:
    """kvm_vcpu_events.nmi."""

    injected: int = 0
    pending: int = 0
    masked: int = 0

    _BITS: ClassVar[dict[str, int]] = {"injected": 1, "pending": 8, "masked": 1}

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True, slots=True)
class SmiEvent:
    """kvm_vcpu_events.smi: in SMM, an SMI pending, SMM entered from NMI, INIT latched."""

    smm: int = 0
    pending: int = 0
    smm_inside_nmi: int = 0
    latched_init: int = 0

    _BITS: ClassVar[dict[str, int]] = {"smm": 1, "pending": 1, "smm_inside_nmi": 1,
                                       "latched_init": 1}

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True, slots=True)
class VcpuEvents:
    """struct kvm_vcpu_events (without the triple-fault and payload extensions). KVM keeps
    `sipi_vector` only with an in-kernel local APIC (without one it reads back 0)."""

    exception: ExceptionEvent = field(default_factory=ExceptionEvent)
    interrupt: InterruptEvent = field(default_factory=InterruptEvent)
    nmi: NmiEvent = field(default_factory=NmiEvent)
    sipi_vector: int = 0
    smi: SmiEvent = field(default_factory=SmiEvent)

    _BITS: ClassVar[dict[str, int]] = {"sipi_vector": 32}

    def __post_init__(self) -> None:
        for name, cls in (("exception", ExceptionEvent), ("interrupt", InterruptEvent),
                          ("nmi", NmiEvent), ("smi", SmiEvent)):
            _check_type(self, name, getattr(self, name), cls)
        _check_fields(self)

    @property
    def quiet(self) -> bool:
        """No event in flight and no interrupt shadow: what an engine without event
        injection (Unicorn) can hold."""
        return self == VcpuEvents()


@dataclass(frozen=True, slots=True)
class VcpuState:
    """Everything that makes one x86 vCPU what it is, as a value. The default is the vCPU
    after reset (real mode, f000:fff0, runnable, nothing pending)."""

    regs: Regs = field(default_factory=lambda: Regs(rip=0xFFF0, rdx=0x600))
    sregs: Sregs = field(default_factory=Sregs)
    fpu: Fpu = field(default_factory=Fpu)
    msrs: Msrs = field(default_factory=Msrs)
    events: VcpuEvents = field(default_factory=VcpuEvents)
    mp_state: int = MP_STATE_RUNNABLE

    _BITS: ClassVar[dict[str, int]] = {"mp_state": 32}

    def __post_init__(self) -> None:
        if isinstance(self.msrs, Mapping) and not isinstance(self.msrs, Msrs):
            object.__setattr__(self, "msrs", Msrs(self.msrs))
        for name, cls in (("regs", Regs), ("sregs", Sregs), ("fpu", Fpu), ("msrs", Msrs),
                          ("events", VcpuEvents)):
            _check_type(self, name, getattr(self, name), cls)
        _check_fields(self)
        for msr, seg in ((MSR_FS_BASE, "fs"), (MSR_GS_BASE, "gs")):
            base = getattr(self.sregs, seg).base
            if self.msrs[msr] != base:
                raise ValueError(
                    f"VcpuState: msrs[{msr:#x}]={self.msrs[msr]:#x} but sregs.{seg}.base="
                    f"{base:#x}: they are one register (use VcpuState.with_segment)")

    # -- building variants ---------------------------------------------------------------------
    def with_regs(self, **values: int) -> VcpuState:
        """A copy with the named registers changed, e.g. `state.with_regs(rsi=0x1000)`."""
        return dataclasses.replace(self, regs=dataclasses.replace(self.regs, **values))

    def with_sregs(self, **values: Any) -> VcpuState:
        """A copy with the named `Sregs` fields changed. FS and GS keep their MSR twins in
        step."""
        sregs = dataclasses.replace(self.sregs, **values)
        msrs = self.msrs.replace({MSR_FS_BASE: sregs.fs.base, MSR_GS_BASE: sregs.gs.base})
        return dataclasses.replace(self, sregs=sregs, msrs=msrs)

    def with_segment(self, name: str, **values: int) -> VcpuState:
        """A copy with fields of segment `name` ("cs", ..., "ldt") changed."""
        if name not in Sregs.SEGMENTS:
            raise ValueError(f"no segment {name!r}; there are {', '.join(Sregs.SEGMENTS)}")
        return self.with_sregs(**{name: dataclasses.replace(getattr(self.sregs, name),
                                                            **values)})

    def with_msrs(self, values: Mapping[int, int]) -> VcpuState:
        """A copy with MSRs changed; FS_BASE / GS_BASE also change the segment bases."""
        msrs = self.msrs.replace(values)
        sregs = dataclasses.replace(
            self.sregs,
            fs=dataclasses.replace(self.sregs.fs, base=msrs[MSR_FS_BASE]),
            gs=dataclasses.replace(self.sregs.gs, base=msrs[MSR_GS_BASE]))
        return dataclasses.replace(self, sregs=sregs, msrs=msrs)

    # -- serialised form -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The serialised state, layout `FORMAT_VERSION` (see `_Codec`)."""
        return _CODEC.encode(self)

    @staticmethod
    def from_bytes(data: bytes | bytearray | memoryview) -> VcpuState:
        """Parse `to_bytes()` output. A wrong magic or version, truncated or trailing data, or
        a field value the state refuses is a `ValueError` saying which."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"VcpuState.from_bytes needs bytes, got {type(data).__name__}")
        return _CODEC.decode(bytes(data))


# ---------------------------------------------------------------------------------------------
# the canonical form


def _canonical_segment(name: str, seg: Segment) -> Segment:
    usable = seg.usable
    if not usable:
        # "unusable" is VMX's flag; SVM and QEMU have only P. QEMU's KVM glue reads it as
        # unusable = !present, and a null or never-loaded segment has no attributes that any
        # access uses — except DPL of SS, which is the CPL, and the base of FS/GS, which
        # 64-bit code uses with a null selector. Those two survive; the rest is zeroed.
        return Segment(base=seg.base, limit=0, selector=seg.selector, type=0, present=0,
                       dpl=seg.dpl if name == "ss" else 0, db=0, s=0, l=0, g=0, avl=0,
                       unusable=1)
    type_ = seg.type
    if seg.s:
        type_ |= 1  # every load of a code/data descriptor sets its accessed bit
    elif name == "tr" and type_ in (1, 9):
        type_ |= 2  # LTR marks the TSS busy; a loaded TR is always busy (VMX requires it)
    return dataclasses.replace(seg, type=type_, present=1, unusable=0)


def _rule_rflags(state: VcpuState) -> VcpuState:
    return state.with_regs(rflags=state.regs.rflags | _RFLAGS_FIXED)


def _rule_segments(state: VcpuState) -> VcpuState:
    s = state.sregs
    segs: dict[str, Any] = {n: _canonical_segment(n, getattr(s, n)) for n in Sregs.SEGMENTS}
    return dataclasses.replace(state, sregs=dataclasses.replace(s, **segs))


def _rule_cr0_et(state: VcpuState) -> VcpuState:
    return dataclasses.replace(state, sregs=dataclasses.replace(
        state.sregs, cr0=state.sregs.cr0 | _CR0_ET))


def _rule_quiet_events(state: VcpuState) -> VcpuState:
    e = state.events
    exception, interrupt = e.exception, e.interrupt
    if not (exception.injected or exception.pending):
        exception = ExceptionEvent()
    if not interrupt.injected:
        interrupt = InterruptEvent(shadow=interrupt.shadow)
    nmi = NmiEvent(masked=e.nmi.masked) if not (e.nmi.injected or e.nmi.pending) else e.nmi
    return dataclasses.replace(state, events=dataclasses.replace(
        e, exception=exception, interrupt=interrupt, nmi=nmi))


def _rule_fpr_padding(state: VcpuState) -> VcpuState:
    fpr = tuple(v[:10] + bytes(6) for v in state.fpu.fpr)
    return dataclasses.replace(state, fpu=dataclasses.replace(state.fpu, fpr=fpr))


CANONICAL_RULES: Final[tuple[tuple[str, Callable[[VcpuState], VcpuState]], ...]] = (
    # RFLAGS bit 1 is reserved and always reads as 1 on every x86.
    ("rflags bit 1 set", _rule_rflags),
    # unusable = not present; an unusable segment keeps selector, base (FS/GS) and, for SS,
    # DPL; a usable code/data segment has its accessed bit set, a usable TR is busy.
    ("segments: usable, accessed, busy", _rule_segments),
    # CR0.ET is hardwired to 1 since the i486; QEMU forces it, KVM reports what was written.
    ("cr0.ET set", _rule_cr0_et),
    # kvm_fpu keeps 16 bytes per x87 register, 10 of them significant.
    ("fpr padding zeroed", _rule_fpr_padding),
    # KVM leaves the vector and error code of the last delivered event in kvm_vcpu_events
    # after it is no longer injected or pending; an event not in flight has none.
    ("events not in flight zeroed", _rule_quiet_events),
)


def canonical(state: VcpuState) -> VcpuState:
    """`state` with every rule of `CANONICAL_RULES` applied, in order. Idempotent; each
    engine's `get_state` returns canonical states, and `set_state` accepts any."""
    for _name, rule in CANONICAL_RULES:
        state = rule(state)
    return state


# ---------------------------------------------------------------------------------------------
# the serialised form

FORMAT_VERSION: Final = 1
_MAGIC: Final = b"KVMEMCPU"


class _Codec:
    """Serialised `VcpuState`, little-endian. Layout version 1:

    header   magic "KVMEMCPU" (8 bytes), version u16 (= 1), reserved u16 (0), body length u32
    regs     18 × u64 in struct kvm_regs order
    sregs    8 × struct kvm_segment (base u64, limit u32, selector u16, type present dpl db s
             l g avl unusable u8, padding u8) in the order cs ds es fs gs ss tr ldt;
             2 × struct kvm_dtable (base u64, limit u16, 3 × u16 padding) gdt, idt;
             7 × u64 cr0 cr2 cr3 cr4 cr8 efer apic_base (kvm_sregs without interrupt_bitmap)
    fpu      struct kvm_fpu (416 bytes)
    msrs     struct kvm_msrs: nmsrs u32, pad u32, nmsrs × (index u32, reserved u32, data u64),
             ascending index
    events   exception (injected nr has_error_code pending u8, error_code u32), interrupt
             (injected nr soft shadow u8), nmi (injected pending masked u8, pad u8),
             sipi_vector u32, smi (smm pending smm_inside_nmi latched_init u8), pad u32
    mp_state u32, pad u32
    """

    HEADER = struct.Struct("<8sHHI")
    REGS = struct.Struct("<18Q")
    SEGMENT = struct.Struct("<QIH9Bx")
    DTABLE = struct.Struct("<QH6x")
    CONTROL = struct.Struct("<7Q")
    FPU = struct.Struct("<128sHHBxHQQ256sI4x")
    MSR_HEADER = struct.Struct("<I4x")
    MSR = struct.Struct("<I4xQ")
    EVENTS = struct.Struct("<4BI4B3BxI4B4x")
    MP_STATE = struct.Struct("<I4x")

    def encode(self, s: VcpuState) -> bytes:
        r, sr, f, e = s.regs, s.sregs, s.fpu, s.events
        parts = [self.REGS.pack(*(getattr(r, n) for n in Regs.NAMES))]
        for name in Sregs.SEGMENTS:
            g = getattr(sr, name)
            parts.append(self.SEGMENT.pack(g.base, g.limit, g.selector, g.type, g.present,
                                           g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable))
        parts += [self.DTABLE.pack(sr.gdt.base, sr.gdt.limit),
                  self.DTABLE.pack(sr.idt.base, sr.idt.limit),
                  self.CONTROL.pack(*(getattr(sr, n) for n in Sregs.CONTROL)),
                  self.FPU.pack(b"".join(f.fpr), f.fcw, f.fsw, f.ftwx, f.last_opcode,
                                f.last_ip, f.last_dp, b"".join(f.xmm), f.mxcsr),
                  self.MSR_HEADER.pack(len(s.msrs))]
        parts += [self.MSR.pack(i, v) for i, v in s.msrs.items()]
        x, i, n, m = e.exception, e.interrupt, e.nmi, e.smi
        parts += [self.EVENTS.pack(x.injected, x.nr, x.has_error_code, x.pending, x.error_code,
                                   i.injected, i.nr, i.soft, i.shadow, n.injected, n.pending,
                                   n.masked, e.sipi_vector, m.smm, m.pending, m.smm_inside_nmi,
                                   m.latched_init),
                  self.MP_STATE.pack(s.mp_state)]
        body = b"".join(parts)
        return self.HEADER.pack(_MAGIC, FORMAT_VERSION, 0, len(body)) + body

    def decode(self, data: bytes) -> VcpuState:
        reader = _Reader(data)
        magic, version, _reserved, length = reader.take("header", self.HEADER)
        if magic != _MAGIC:
            raise ValueError(f"VcpuState.from_bytes: not a serialised VcpuState (magic "
                             f"{magic!r}, expected {_MAGIC!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"VcpuState.from_bytes: layout version {version} is not supported "
                             f"(this kvmem reads version {FORMAT_VERSION})")
        if reader.left != length:
            how = "truncated" if reader.left < length else "trailing bytes"
            raise ValueError(f"VcpuState.from_bytes: {how}: the header says {length} bytes of "
                             f"state follow, {reader.left} do")
        regs = Regs(*reader.take("regs", self.REGS))
        segs: dict[str, Any] = {}
        for name in Sregs.SEGMENTS:
            segs[name] = Segment(*reader.take(f"sregs.{name}", self.SEGMENT))
        gdt = DTable(*reader.take("sregs.gdt", self.DTABLE))
        idt = DTable(*reader.take("sregs.idt", self.DTABLE))
        values = reader.take("sregs control registers", self.CONTROL)
        control: dict[str, Any] = dict(zip(Sregs.CONTROL, values, strict=True))
        sregs = Sregs(gdt=gdt, idt=idt, **segs, **control)
        fpr, fcw, fsw, ftwx, fop, fip, fdp, xmm, mxcsr = reader.take("fpu", self.FPU)
        fpu = Fpu(tuple(fpr[k:k + 16] for k in range(0, 128, 16)), fcw, fsw, ftwx, fop, fip,
                  fdp, tuple(xmm[k:k + 16] for k in range(0, 256, 16)), mxcsr)
        (count,) = reader.take("msrs header", self.MSR_HEADER)
        if count > len(SUPPORTED_MSRS):
            raise ValueError(f"VcpuState.from_bytes: {count} MSRs; a state has at most "
                             f"{len(SUPPORTED_MSRS)}")
        msrs = Msrs([reader.take(f"msrs[{k}]", self.MSR) for k in range(count)])
        ev = reader.take("events", self.EVENTS)
        events = VcpuEvents(ExceptionEvent(*ev[0:5]), InterruptEvent(*ev[5:9]),
                            NmiEvent(*ev[9:12]), ev[12], SmiEvent(*ev[13:17]))
        (mp_state,) = reader.take("mp_state", self.MP_STATE)
        return VcpuState(regs, sregs, fpu, msrs, events, mp_state)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._off = 0

    @property
    def left(self) -> int:
        return len(self._data) - self._off

    def take(self, what: str, layout: struct.Struct) -> tuple[Any, ...]:
        if self.left < layout.size:
            raise ValueError(f"VcpuState.from_bytes: truncated: {what} needs {layout.size} "
                             f"bytes at offset {self._off}, {self.left} left")
        values = layout.unpack_from(self._data, self._off)
        self._off += layout.size
        return values


_CODEC: Final = _Codec()
