"""VcpuState: values, the serialised form, and the state on both engines.

- a state refuses bad fields (type, width, an MSR it does not carry, FS/GS base out of step)
  with the class and field in the message;
- `to_bytes` / `from_bytes` round-trips any state; a wrong magic or version, truncated or
  trailing bytes are refused, naming what is wrong;
- on each engine (raw KVM vCPU, raw Unicorn CPU over the same memory): set → get gives the
  canonical form of what was set, get → set → get is stable, and the same state set on both
  reads back equal — the TSC aside, which is a clock.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from expect import GUEST_ENGINES
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem import kvmapi
from kvmem.cpu import events, modes, raw
from kvmem.cpu.state import (
    FORMAT_VERSION,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    SUPPORTED_MSRS,
    DTable,
    ExceptionEvent,
    Fpu,
    InterruptEvent,
    Msrs,
    NmiEvent,
    Regs,
    Segment,
    SmiEvent,
    Sregs,
    VcpuEvents,
    VcpuState,
    canonical,
)

KVM_MISSING = kvmapi.kvm_available()
ENGINES = GUEST_ENGINES
MEM = 8 << 20


def steady(state: VcpuState) -> VcpuState:
    """The state without its running clock (the TSC advances between two reads)."""
    return state.with_msrs({MSR_IA32_TSC: 0})


@pytest.fixture
def memory() -> Iterator[raw.GuestMemory]:
    mem = raw.GuestMemory(MEM)
    yield mem
    mem.close()


@pytest.fixture
def make_cpu(memory: raw.GuestMemory) -> Iterator[Callable[[str], raw.RawCpu]]:
    made: list[raw.RawCpu] = []

    def make(engine: str) -> raw.RawCpu:
        cpu: raw.RawCpu = raw.KvmCpu(memory) if engine == "kvm" else raw.UcCpu(memory)
        made.append(cpu)
        return cpu

    yield make
    for cpu in made:
        cpu.close()


# ---------------------------------------------------------------------------------------------
# states to load: every mode, and one with every register holding something


def mode_states(mem: raw.GuestMemory) -> dict[str, VcpuState]:
    return {
        "reset": VcpuState(),
        "real": modes.real_mode(0x7C00, sp=0x7000),
        "protected": modes.protected_mode(0x10000, mem.write, 0x1000, esp=0x9000),
        "long": modes.long_mode(0x10000, mem.write, 0x100000),
        "user": modes.user_mode(0x400000, mem.write, 0x200000, rsp=0x600000,
                                identity_size=MEM),
    }


def busy_state(mem: raw.GuestMemory, seed: int) -> VcpuState:
    """A long-mode state with random GPRs, x87 / SSE registers and MSRs."""
    rng = random.Random(seed)
    base = modes.long_mode(0x10000, mem.write, 0x100000)
    gprs = {name: rng.getrandbits(64) for name in Regs.NAMES if name not in ("rip", "rflags")}
    # arithmetic flags and DF; IF off (neither raw engine has interrupts)
    rflags = 0x2 | rng.choice([0x0, 0x1, 0x4, 0x10, 0x40, 0x80, 0x400, 0x800, 0x8D5])
    top = rng.randrange(8)
    fpr = tuple(struct.pack("<QH", rng.getrandbits(64) | 1 << 63, rng.randrange(1, 0x7FFF))
                + bytes(6) for _ in range(8))
    fpu = Fpu(fpr=fpr, fcw=0x27F, fsw=top << 11, ftwx=rng.getrandbits(8),
              last_opcode=rng.getrandbits(11), last_ip=rng.getrandbits(48),
              last_dp=rng.getrandbits(48),
              xmm=tuple(rng.getrandbits(128).to_bytes(16, "little") for _ in range(16)),
              mxcsr=0x1F80 | rng.choice([0, 0x20, 0x3F]))
    canonical_addr = rng.getrandbits(47)
    state = dataclasses.replace(base, fpu=fpu).with_regs(**gprs, rflags=rflags)
    state = state.with_sregs(cr2=rng.getrandbits(47), cr8=rng.randrange(16))
    return state.with_msrs({
        MSR_STAR: (0x23 << 48) | (0x10 << 32), MSR_LSTAR: canonical_addr,
        MSR_SFMASK: 0x4700, MSR_KERNEL_GS_BASE: rng.getrandbits(47),
        MSR_FS_BASE: rng.getrandbits(47), MSR_GS_BASE: rng.getrandbits(47),
        MSR_IA32_SYSENTER_CS: 0x10, MSR_IA32_SYSENTER_ESP: rng.getrandbits(32),
        MSR_IA32_SYSENTER_EIP: rng.getrandbits(32),
    })


# ---------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize(("make", "field", "message"), [
    (lambda: Regs(rax=1 << 64), "rax", "Regs.rax"),
    (lambda: Regs(rip=-1), "rip", "Regs.rip"),
    (lambda: Regs(rbx="1"), "rbx", "Regs.rbx must be an int"),  # type: ignore[arg-type]
    (lambda: Segment(selector=0x10000), "selector", "Segment.selector"),
    (lambda: Segment(type=16), "type", "Segment.type"),
    (lambda: Segment(dpl=4), "dpl", "Segment.dpl"),
    (lambda: Segment(present=2), "present", "Segment.present"),
    (lambda: Segment(limit=1 << 32), "limit", "Segment.limit"),
    (lambda: DTable(limit=0x10000), "limit", "DTable.limit"),
    (lambda: Sregs(cr0=1.5), "cr0", "Sregs.cr0 must be an int"),  # type: ignore[arg-type]
    (lambda: Sregs(cs=DTable()), "cs", "Sregs.cs must be a Segment"),  # type: ignore[arg-type]
    (lambda: Fpu(fcw=1 << 16), "fcw", "Fpu.fcw"),
    (lambda: Fpu(fpr=(bytes(16),) * 7), "fpr", "Fpu.fpr must be a tuple of 8"),
    (lambda: Fpu(xmm=(bytes(15),) * 16), "xmm", "Fpu.xmm[0] must be 16 bytes"),
    (lambda: ExceptionEvent(nr=256), "nr", "ExceptionEvent.nr"),
    (lambda: InterruptEvent(shadow=4), "shadow", "InterruptEvent.shadow"),
    (lambda: NmiEvent(masked=2), "masked", "NmiEvent.masked"),
    (lambda: SmiEvent(smm=2), "smm", "SmiEvent.smm"),
    (lambda: VcpuEvents(sipi_vector=1 << 32), "sipi_vector", "VcpuEvents.sipi_vector"),
    (lambda: VcpuState(mp_state=-1), "mp_state", "VcpuState.mp_state"),
    (lambda: Msrs({MSR_LSTAR: 1 << 64}), "LSTAR", "Msrs.[0xc0000082]"),
    (lambda: Msrs({0x1B: 0}), "APIC_BASE", "MSR 0x1b is not one a VcpuState carries"),
    (lambda: Msrs({"lstar": 0}), "index", "an MSR index must be an int"),  # type: ignore[arg-type]
    (lambda: VcpuState(msrs=Msrs({MSR_FS_BASE: 0x1000})), "fs", "sregs.fs.base"),
])
def test_bad_field_is_refused_naming_it(make: Callable[[], object], field: str,
                                        message: str) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    assert message in str(info.value)


def test_bools_are_taken_as_flags() -> None:
    seg = Segment(present=True, unusable=False)
    assert seg.present == 1 and type(seg.present) is int
    assert seg == Segment()


def test_states_compare_and_hash_by_value() -> None:
    a = VcpuState().with_regs(rax=7)
    b = VcpuState().with_regs(rax=7)
    assert a == b and hash(a) == hash(b)
    assert a != b.with_regs(rax=8)
    assert len({a, b}) == 1


def test_fs_gs_base_and_their_msrs_move_together() -> None:
    s = VcpuState().with_segment("fs", base=0x1234).with_msrs({MSR_GS_BASE: 0x5678})
    assert s.msrs[MSR_FS_BASE] == 0x1234 and s.sregs.gs.base == 0x5678
    with pytest.raises(ValueError, match="no segment"):
        VcpuState().with_segment("xs", base=0)


def test_canonical_form() -> None:
    s = VcpuState().with_regs(rflags=0).with_sregs(
        ds=Segment(type=2, present=1),
        es=Segment(type=3, present=0, selector=0x10, base=0x99, dpl=2, limit=0xFFFF),
        ss=Segment(type=3, present=1, unusable=1, dpl=3),
        tr=Segment(type=9, s=0), cr0=0)
    c = canonical(s)
    assert c.regs.rflags == 2
    assert c.sregs.ds.type == 3  # accessed
    assert c.sregs.es == Segment(base=0x99, limit=0, selector=0x10, type=0, present=0, dpl=0,
                                 db=0, s=0, unusable=1)
    assert c.sregs.ss.unusable and not c.sregs.ss.present and c.sregs.ss.dpl == 3
    assert c.sregs.tr.type == 11  # busy
    assert c.sregs.cr0 == 0x10
    assert canonical(c) == c
    stale = VcpuState(events=VcpuEvents(exception=ExceptionEvent(nr=14, error_code=2)))
    assert canonical(stale).events == VcpuEvents()


# ---------------------------------------------------------------------------------------------
# the serialised form

u = st.integers
segments = st.builds(Segment, base=u(0, 2**64 - 1), limit=u(0, 2**32 - 1),
                     selector=u(0, 0xFFFF), type=u(0, 15), present=u(0, 1), dpl=u(0, 3),
                     db=u(0, 1), s=u(0, 1), l=u(0, 1), g=u(0, 1), avl=u(0, 1),
                     unusable=u(0, 1))
blobs = st.binary(min_size=16, max_size=16)


@st.composite
def vcpu_states(draw: st.DrawFn) -> VcpuState:
    regs = Regs(**{n: draw(u(0, 2**64 - 1)) for n in Regs.NAMES})
    segs: dict[str, Any] = {n: draw(segments) for n in Sregs.SEGMENTS}
    control: dict[str, Any] = {n: draw(u(0, 2**64 - 1)) for n in Sregs.CONTROL}
    sregs = Sregs(**segs, gdt=DTable(draw(u(0, 2**64 - 1)), draw(u(0, 0xFFFF))),
                  idt=DTable(draw(u(0, 2**64 - 1)), draw(u(0, 0xFFFF))), **control)
    fpu = Fpu(tuple(draw(blobs) for _ in range(8)), draw(u(0, 0xFFFF)), draw(u(0, 0xFFFF)),
              draw(u(0, 255)), draw(u(0, 0xFFFF)), draw(u(0, 2**64 - 1)),
              draw(u(0, 2**64 - 1)), tuple(draw(blobs) for _ in range(16)),
              draw(u(0, 2**32 - 1)))
    msrs = Msrs({m: draw(u(0, 2**64 - 1)) for m in SUPPORTED_MSRS}
                | {MSR_FS_BASE: segs["fs"].base, MSR_GS_BASE: segs["gs"].base})
    ev = VcpuEvents(ExceptionEvent(*(draw(u(0, 1)), draw(u(0, 255)), draw(u(0, 1)),
                                     draw(u(0, 1)), draw(u(0, 2**32 - 1)))),
                    InterruptEvent(draw(u(0, 1)), draw(u(0, 255)), draw(u(0, 1)), draw(u(0, 3))),
                    NmiEvent(draw(u(0, 1)), draw(u(0, 255)), draw(u(0, 1))),
                    draw(u(0, 2**32 - 1)),
                    SmiEvent(draw(u(0, 1)), draw(u(0, 1)), draw(u(0, 1)), draw(u(0, 1))))
    return VcpuState(regs, sregs, fpu, msrs, ev, draw(u(0, 2**32 - 1)))


@settings(max_examples=150, deadline=None)
@given(vcpu_states())
def test_serialised_form_round_trips(state: VcpuState) -> None:
    data = state.to_bytes()
    assert VcpuState.from_bytes(data) == state
    assert VcpuState.from_bytes(bytearray(data)) == state
    assert canonical(canonical(state)) == canonical(state)


def test_serialised_layout_is_the_documented_one() -> None:
    data = VcpuState().with_regs(rax=0x1122).to_bytes()
    magic, version, reserved, length = struct.unpack_from("<8sHHI", data)
    assert (magic, version, reserved) == (b"KVMEMCPU", FORMAT_VERSION, 0)
    assert length == len(data) - 16
    assert struct.unpack_from("<Q", data, 16)[0] == 0x1122  # regs.rax first
    sregs_at = 16 + 18 * 8
    assert struct.unpack_from("<QIH", data, sregs_at) == (0xFFFF_0000, 0xFFFF, 0xF000)  # cs


def test_bad_serialised_data_is_refused_saying_why() -> None:
    good = VcpuState().to_bytes()
    with pytest.raises(ValueError, match="magic"):
        VcpuState.from_bytes(b"NOTASTAT" + good[8:])
    with pytest.raises(ValueError, match="version 2 is not supported"):
        VcpuState.from_bytes(good[:8] + struct.pack("<H", 2) + good[10:])
    with pytest.raises(ValueError, match="truncated: header"):
        VcpuState.from_bytes(good[:10])
    with pytest.raises(ValueError, match="truncated: the header says"):
        VcpuState.from_bytes(good[:-1])
    with pytest.raises(ValueError, match="trailing bytes"):
        VcpuState.from_bytes(good + b"\0")
    # a consistent header over a short body: the missing section is named
    body = good[16:16 + 200]
    with pytest.raises(ValueError, match=r"truncated: sregs\.\w+ needs 24 bytes"):
        VcpuState.from_bytes(good[:12] + struct.pack("<I", len(body)) + body)
    # a field the state refuses: selector of CS (u16 in the layout) cannot be wrong, but
    # the dpl byte can
    bad = bytearray(good)
    bad[16 + 18 * 8 + 16] = 9  # cs.type = 9 is fine; cs.present:
    bad[16 + 18 * 8 + 15] = 7
    with pytest.raises(ValueError, match=r"Segment\.present"):
        VcpuState.from_bytes(bytes(bad))
    with pytest.raises(TypeError):
        VcpuState.from_bytes("text")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# both engines


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["reset", "real", "protected", "long", "user"])
def test_set_then_get_gives_the_canonical_state(engine: str, mode: str,
                                                memory: raw.GuestMemory,
                                                make_cpu: Callable[[str], raw.RawCpu]) -> None:
    state = mode_states(memory)[mode]
    cpu = make_cpu(engine)
    cpu.set_state(state)
    got = cpu.get_state()
    assert steady(got) == steady(canonical(state))
    cpu.set_state(got)
    assert steady(cpu.get_state()) == steady(got)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", range(4))
def test_every_register_round_trips(engine: str, seed: int, memory: raw.GuestMemory,
                                    make_cpu: Callable[[str], raw.RawCpu]) -> None:
    state = busy_state(memory, seed)
    cpu = make_cpu(engine)
    cpu.set_state(state)
    assert steady(cpu.get_state()) == steady(canonical(state))


@pytest.mark.skipif(KVM_MISSING is not None, reason=f"KVM: {KVM_MISSING}")
@pytest.mark.parametrize("seed", range(3))
def test_both_engines_read_the_same_state_back(seed: int, memory: raw.GuestMemory,
                                               make_cpu: Callable[[str], raw.RawCpu]) -> None:
    state = busy_state(memory, seed)
    kvm, uc = make_cpu("kvm"), make_cpu("unicorn")
    kvm.set_state(state)
    uc.set_state(state)
    assert steady(kvm.get_state()) == steady(uc.get_state())
    # and a state read from one engine loads into the other unchanged
    uc.set_state(kvm.get_state())
    assert steady(uc.get_state()) == steady(kvm.get_state())


@pytest.mark.parametrize("engine", ENGINES)
def test_the_tsc_continues_from_the_value_set(engine: str,
                                              make_cpu: Callable[[str], raw.RawCpu]) -> None:
    cpu = make_cpu(engine)
    target = 1 << 50
    cpu.set_state(VcpuState().with_msrs({MSR_IA32_TSC: target}))
    first = cpu.get_state().msrs[MSR_IA32_TSC]
    second = cpu.get_state().msrs[MSR_IA32_TSC]
    assert first <= second
    if engine == "kvm" and not target <= first < target + (1 << 40):
        # kvm_pvm runs guest code on the host's TSC with no offset to move it
        pytest.skip(f"this KVM does not move the guest TSC on a host write of IA32_TSC "
                    f"(wrote {target:#x}, read back {first:#x})")
    assert target <= first < target + (1 << 40)


@pytest.mark.skipif(KVM_MISSING is not None, reason=f"KVM: {KVM_MISSING}")
def test_kvm_round_trips_events_in_flight(memory: raw.GuestMemory,
                                          make_cpu: Callable[[str], raw.RawCpu]) -> None:
    cpu = make_cpu("kvm")
    base = modes.long_mode(0x10000, memory.write, 0x100000)
    for ev in (VcpuEvents(exception=ExceptionEvent(injected=1, nr=13, has_error_code=1,
                                                   error_code=0x18)),
               VcpuEvents(interrupt=InterruptEvent(injected=1, nr=0x30)),
               VcpuEvents(interrupt=InterruptEvent(shadow=1)),
               VcpuEvents(nmi=NmiEvent(pending=1)), VcpuEvents(nmi=NmiEvent(masked=1))):
        cpu.set_state(dataclasses.replace(base, events=ev))
        assert cpu.get_state().events == ev


def test_unicorn_refuses_what_it_cannot_hold(memory: raw.GuestMemory,
                                             make_cpu: Callable[[str], raw.RawCpu]) -> None:
    cpu = make_cpu("unicorn")
    base = modes.long_mode(0x10000, memory.write, 0x100000)
    pending = dataclasses.replace(base, events=VcpuEvents(
        exception=ExceptionEvent(injected=1, nr=13, has_error_code=1)))
    with pytest.raises(ValueError, match="events in flight"):
        cpu.set_state(pending)
    with pytest.raises(ValueError, match="mp_state"):
        cpu.set_state(dataclasses.replace(base, mp_state=3))
    with pytest.raises(ValueError, match="inconsistent long mode"):
        cpu.set_state(base.with_sregs(efer=base.sregs.efer & ~(1 << 10)))
    # what it can do instead: deliver the event first (here into an empty IDT: a triple
    # fault, as KVM would report it with a shutdown exit)
    with pytest.raises(events.TripleFault):
        events.deliver_pending(pending, memory.read, memory.write)


@pytest.mark.skipif(KVM_MISSING is not None, reason=f"KVM: {KVM_MISSING}")
def test_kvm_refuses_a_state_it_does_not_take(memory: raw.GuestMemory,
                                              make_cpu: Callable[[str], raw.RawCpu]) -> None:
    cpu = make_cpu("kvm")
    base = modes.long_mode(0x10000, memory.write, 0x100000)
    with pytest.raises(OSError, match="KVM_SET_MSRS refused MSR 0xc0000082"):
        cpu.set_state(base.with_msrs({MSR_LSTAR: 1 << 63}))  # not canonical
    # no in-kernel irqchip: KVM takes no mp_state but RUNNABLE (load leaves RUNNABLE out: it
    # is what the vCPU always is, but every other one still reaches KVM and is refused)
    for mp_state in (1, 3):  # UNINITIALIZED, HALTED
        with pytest.raises(OSError, match="KVM_SET_MP_STATE"):
            cpu.set_state(dataclasses.replace(base, mp_state=mp_state))
    cpu.set_state(base)
    assert cpu.get_state().mp_state == 0
