"""Guests in every mode of `kvmem.cpu.modes`, on both engines, and moving between them.

Every guest runs on the one vCPU object a VMM uses — `kvmem.Vm(engine=...).create_vcpu(0)`
over kvmem's slots, on KVM and on Unicorn. For each bundled program (`real16`, `prot32`,
`long64`, `user64`):
- it runs on KVM and on Unicorn with the exits a Python model of the program predicts, and
  both engines end in the same state with the same memory;
- stopped after any of its exits on one engine, it finishes on the other — KVM → Unicorn and
  Unicorn → KVM, the state moved as a `VcpuState` (also through its serialised form) and the
  memory shared — with the same exits and the same end.
Then the events: what KVM injects, `events.deliver_pending` delivers on Unicorn the same way;
SYSCALL and INT n reach the user-mode stub on Unicorn (and on a KVM that delivers them; the
kvm_pvm of kvmem's CI host does not, and the test says what it does instead); an exception
with no IDT is a shutdown on both.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from expect import GUEST_ENGINES

import kvmem
from kvmem import kvmapi
from kvmem.cpu import events, modes, raw
from kvmem.cpu.state import MSR_IA32_TSC, ExceptionEvent, VcpuEvents, VcpuState
from kvmem.engines import ExitKind
from kvmem.guests import PORT_EXCEPTION, PORT_RESULT, PORT_SYSCALL, program

KVM_MISSING = kvmapi.kvm_available()
needs_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"KVM: {KVM_MISSING}")
ENGINES = GUEST_ENGINES
MEM = 8 << 20
M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def steady(state: VcpuState) -> VcpuState:
    return state.with_msrs({MSR_IA32_TSC: 0})


class Memory:
    """Guest RAM at gpa 0..size in kvmem host memory (what a Vm's slot maps); two Vms may map
    the same memory, so a guest stopped on one engine goes on on the other."""

    def __init__(self, size: int) -> None:
        self.host = kvmem.HostMemory.anonymous(size)
        self.size, self.hva = size, self.host.hva

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.host.view()[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.host.view()[gpa:gpa + len(data)] = data

    def close(self) -> None:
        self.host.close()


_KINDS = {ExitKind.IO: "io", ExitKind.HLT: "hlt", ExitKind.SHUTDOWN: "shutdown"}


class Cpu:
    """vCPU 0 of a Vm with `engine` and one slot over `memory`, its exits as `RawExit`s."""

    def __init__(self, engine: str, memory: Memory) -> None:
        self.name, self.memory = engine, memory
        self.vm = kvmem.Vm(engine=engine)
        self.vm.set_memory_region(0, 0, 0, memory.size, memory.hva)
        self.vcpu = self.vm.create_vcpu(0)

    def get_state(self) -> VcpuState:
        return self.vcpu.get_state()

    def set_state(self, state: VcpuState) -> None:
        self.vcpu.set_state(state)

    def run(self) -> raw.RawExit:
        e = self.vcpu.run()
        return raw.RawExit(_KINDS.get(e.kind, "error"), e.addr, e.size, e.is_write, e.data,
                           detail=e.detail)

    def complete(self, data: bytes) -> None:
        self.vcpu.complete(data)

    def close(self) -> None:
        assert self.vm.engine is not None
        self.vm.engine.close()


def new_cpu(engine: str, mem: Memory) -> Cpu:
    return Cpu(engine, mem)


def rol(x: int, bits: int) -> int:
    mask = (1 << bits) - 1
    return ((x << 1) | (x >> (bits - 1))) & mask


def fold(words: list[int], bits: int) -> int:
    acc = 0
    for w in words:
        acc = rol(acc, bits) ^ w
    return acc


# ---------------------------------------------------------------------------------------------
# the guests: how to start each, what it must do, and what the VMM answers


@dataclass
class Guest:
    name: str
    state: VcpuState
    exits: list[tuple[str, int, int]]  # (kind, port, value) expected, in order
    last: int  # how many exits make a complete run
    vmm: Callable[[Cpu, raw.RawExit], None] = lambda cpu, e: None


def real16(mem: Memory) -> Guest:
    si, cx, bx, bp = 0x2000, 37, 0x5EED, 0x3000
    mem.write(0x7C00, program("real16"))
    words = [((si + 2 * i) ^ bx) & 0xFFFF for i in range(cx)]
    cs = fold(words, 16)
    state = modes.real_mode(0x7C00, sp=0x7000).with_regs(rsi=si, rcx=cx, rbx=bx, rbp=bp)
    return Guest("real16", state, [("io", PORT_RESULT, words[-1]),
                                   ("io", PORT_RESULT, ~cs & 0xFFFF),
                                   ("io", PORT_RESULT, cs), ("hlt", 0, 0)], 4)


def prot32(mem: Memory) -> Guest:
    esi, ecx, ebx = 0x20_0000, 37, 0x0BAD_5EED
    mem.write(0x1_0000, program("prot32"))
    dwords = [((esi + 4 * i) ^ ebx) & M32 for i in range(ecx)]
    state = modes.protected_mode(0x1_0000, mem.write, 0x1000, esp=0x9000).with_regs(
        rsi=esi, rcx=ecx, rbx=ebx)
    return Guest("prot32", state, [("io", PORT_RESULT, dwords[-1]),
                                   ("io", PORT_RESULT, fold(dwords, 32)), ("hlt", 0, 0)], 3)


def long64(mem: Memory) -> Guest:
    rsi, pages, seed = 0x20_0000, 40, 0x1234_5678_9ABC_DEF1
    mem.write(0x1_0000, program("long64"))
    qwords = [(rsi + 4096 * i) ^ seed for i in range(pages)]
    result = (fold(qwords, 64) + seed) & M64
    state = modes.long_mode(0x1_0000, mem.write, 0x10_0000).with_regs(
        rsi=rsi, rcx=pages, rbx=seed, rsp=0x9000)
    return Guest("long64", state, [("io", PORT_RESULT, qwords[-1] & M32),
                                   ("io", PORT_RESULT, result & M32),
                                   ("io", PORT_RESULT, result >> 32), ("hlt", 0, 0)], 4)


USER_SYSTEM, USER_CODE, USER_BUF, USER_STACK, USER_FIXED = (
    0x20_0000, 0x40_0000, 0x50_0000, 0x60_0000, 0x58_0000)


def user64(mem: Memory) -> Guest:
    qwords, seed, passes = 2048, 0x0F0F_5EED, 6
    mem.write(USER_CODE, program("user64"))
    state = modes.user_mode(USER_CODE, mem.write, USER_SYSTEM, rsp=USER_STACK,
                            identity_size=MEM)
    state = state.with_regs(rsi=USER_BUF, rcx=qwords, rbx=seed, rbp=passes,
                            r12=USER_SYSTEM + 0x100)
    def vmm(cpu: Cpu, e: raw.RawExit) -> None:
        if (e.port, e.value) == (PORT_EXCEPTION, 14):  # the guest's store to a kernel page:
            cpu.set_state(cpu.get_state().with_regs(r12=USER_FIXED))  # point it elsewhere

    return Guest("user64", state, [("io", PORT_EXCEPTION, 3), ("io", PORT_EXCEPTION, 14),
                                   ("io", PORT_EXCEPTION, 13)], 3, vmm)


GUESTS = {"real16": real16, "prot32": prot32, "long64": long64, "user64": user64}


def user64_checksum() -> int:
    qwords, seed = 2048, 0x0F0F_5EED
    return fold([(USER_BUF + 8 * i) ^ seed ^ 1 for i in range(qwords)], 64)


def run(cpu: Cpu, guest: Guest, start: int, stop: int) -> list[tuple[str, int, int]]:
    """Exits `start` .. `stop - 1` of `guest` on `cpu` (whose state is where exit `start - 1`
    left it), with the VMM's answers."""
    seen = []
    for _ in range(start, stop):
        e = cpu.run()
        seen.append((e.kind, e.port, e.value))
        if e.kind not in ("io",):
            break
        guest.vmm(cpu, e)
    return seen


@pytest.fixture
def memory() -> Iterator[Memory]:
    mem = Memory(MEM)
    yield mem
    mem.close()


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GUESTS))
@pytest.mark.parametrize("engine", ENGINES)
def test_guest_runs_as_its_model_says(engine: str, name: str,
                                      memory: Memory) -> None:
    guest = GUESTS[name](memory)
    cpu = new_cpu(engine, memory)
    try:
        cpu.set_state(guest.state)
        assert run(cpu, guest, 0, guest.last) == guest.exits
        if name == "user64":
            end = cpu.get_state()
            assert end.regs.rdi == ~user64_checksum() & M64
            assert memory.read(USER_FIXED, 8) == struct.pack("<Q", end.regs.rdi)
    finally:
        cpu.close()


@needs_kvm
@pytest.mark.parametrize("name", list(GUESTS))
def test_both_engines_end_in_the_same_state(name: str) -> None:
    ends = []
    for engine in ("kvm", "unicorn"):
        mem = Memory(MEM)
        guest = GUESTS[name](mem)
        cpu = new_cpu(engine, mem)
        try:
            cpu.set_state(guest.state)
            run(cpu, guest, 0, guest.last)
            ends.append((steady(cpu.get_state()), mem.read(0, MEM)))
        finally:
            cpu.close()
            mem.close()
    assert ends[0][0] == ends[1][0]
    assert ends[0][1] == ends[1][1]


MOVES = [(name, src, k) for name, n in (("real16", 3), ("prot32", 2), ("long64", 3),
                                        ("user64", 2))
         for src in ("kvm", "unicorn") for k in range(1, n + 1)]


@needs_kvm
@pytest.mark.parametrize(("name", "source", "after"), MOVES)
def test_guest_stopped_on_one_engine_finishes_on_the_other(name: str, source: str,
                                                          after: int) -> None:
    target = "unicorn" if source == "kvm" else "kvm"
    # the reference: the whole run on the target engine
    mem = Memory(MEM)
    guest = GUESTS[name](mem)
    ref = new_cpu(target, mem)
    try:
        ref.set_state(guest.state)
        ref_exits = run(ref, guest, 0, guest.last)
        ref_end = steady(ref.get_state()), mem.read(0, MEM)
    finally:
        ref.close()
        mem.close()
    mem = Memory(MEM)
    guest = GUESTS[name](mem)
    first, second = new_cpu(source, mem), new_cpu(target, mem)
    try:
        first.set_state(guest.state)
        exits = run(first, guest, 0, after)
        moved = VcpuState.from_bytes(first.get_state().to_bytes())
        second.set_state(moved)
        exits += run(second, guest, after, guest.last)
        assert exits == ref_exits == guest.exits
        assert (steady(second.get_state()), mem.read(0, MEM)) == ref_end
    finally:
        first.close()
        second.close()
        mem.close()


# ---------------------------------------------------------------------------------------------
# events


@needs_kvm
@pytest.mark.parametrize(("vector", "error_code"), [(13, 0x20), (14, 0x6), (6, None), (3, None)])
def test_software_delivery_matches_kvm_injection(vector: int, error_code: int | None) -> None:
    """KVM injects an exception into user code (KVM_SET_VCPU_EVENTS); Unicorn gets the same
    state through `events.deliver_pending`; both reach the stub's exit identically."""
    results = []
    for engine in ("kvm", "unicorn"):
        mem = Memory(MEM)
        guest = user64(mem)
        pending = dataclasses.replace(guest.state, events=VcpuEvents(exception=ExceptionEvent(
            injected=1, nr=vector, has_error_code=int(error_code is not None),
            error_code=error_code or 0)))
        cpu = new_cpu(engine, mem)
        try:
            if engine == "kvm":
                cpu.set_state(pending)
            else:
                cpu.set_state(events.deliver_pending(pending, mem.read, mem.write))
            e = cpu.run()
            results.append(((e.kind, e.port, e.value), steady(cpu.get_state()),
                            mem.read(USER_SYSTEM, 0x5000)))
        finally:
            cpu.close()
            mem.close()
    assert results[0][0] == ("io", PORT_EXCEPTION, vector)
    assert results[0][1].regs.rdx == (error_code or 0)
    assert results[0] == results[1]


# SYSCALL (rax = 2) then INT3;  INT 0x80 (rax = 5) then INT3
SYSCALL_SNIPPET = bytes.fromhex("b802000000" "0f05" "cc")
INT80_SNIPPET = bytes.fromhex("b805000000" "cd80" "cc")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("snippet", "first"), [(SYSCALL_SNIPPET, (PORT_SYSCALL, 2)),
                                                (INT80_SNIPPET, (PORT_EXCEPTION, 0x80))])
def test_syscall_and_int_n_reach_the_stub(engine: str, snippet: bytes,
                                          first: tuple[int, int],
                                          memory: Memory) -> None:
    memory.write(USER_CODE, snippet)
    state = modes.user_mode(USER_CODE, memory.write, USER_SYSTEM, rsp=USER_STACK,
                            identity_size=MEM)
    cpu = new_cpu(engine, memory)
    try:
        cpu.set_state(state)
        e = cpu.run()
        if engine == "kvm" and (e.port, e.value) != first:
            s = cpu.get_state()
            pytest.skip(f"this KVM does not deliver {'SYSCALL' if first[1] == 2 else 'INT n'} "
                        f"from CPL 3 as the architecture says: the stub saw vector {e.value} "
                        f"(error code {s.regs.rdx:#x}, CR2 {s.regs.rcx:#x})")
        assert (e.port, e.value) == first
        at_stub = cpu.get_state()
        assert at_stub.sregs.cs.dpl == 0
        if first[0] == PORT_SYSCALL:
            assert at_stub.regs.rcx == USER_CODE + 7  # the return address
        e = cpu.run()  # back in user code: the INT3 after it
        assert (e.port, e.value) == (PORT_EXCEPTION, 3)
    finally:
        cpu.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["protected", "long"])
def test_exception_without_idt_is_a_shutdown(engine: str, mode: str,
                                             memory: Memory) -> None:
    memory.write(0x1_0000, bytes.fromhex("0f0b"))  # UD2
    state = (modes.long_mode(0x1_0000, memory.write, 0x10_0000) if mode == "long" else
             modes.protected_mode(0x1_0000, memory.write, 0x1000))
    cpu = new_cpu(engine, memory)
    try:
        cpu.set_state(state)
        assert cpu.run().kind == "shutdown"
    finally:
        cpu.close()


def _no_gate_for_ud(mem: Memory, state: VcpuState) -> VcpuState:
    gate = USER_SYSTEM + 0x1000 + 16 * 6 + 5  # IDT[#UD].attributes: clear P
    mem.write(gate, bytes([mem.read(gate, 1)[0] & 0x7F]))
    return state


def _kernel_stack_unmapped(mem: Memory, state: VcpuState) -> VcpuState:
    tss = state.sregs.tr.base
    mem.write(tss + 4, struct.pack("<Q", 0x7F00_0000_0000))  # RSP0: not mapped
    return state


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("case", "expect"), [
    (_no_gate_for_ud, ("io", PORT_EXCEPTION, 11, 6 * 8 + 2 + 1)),  # #NP(IDT[6], EXT)
    (_kernel_stack_unmapped, ("shutdown", 0, 0, None)),  # #UD → #PF → #DF → triple fault
])
def test_faults_while_delivering(engine: str, case: Callable[..., VcpuState],
                                 expect: tuple[str, int, int, int | None],
                                 memory: Memory) -> None:
    memory.write(USER_CODE, bytes.fromhex("0f0b"))  # UD2 at CPL 3
    state = modes.user_mode(USER_CODE, memory.write, USER_SYSTEM, rsp=USER_STACK,
                            identity_size=MEM)
    state = case(memory, state)
    cpu = new_cpu(engine, memory)
    try:
        cpu.set_state(state)
        e = cpu.run()
        if engine == "kvm" and (e.kind, e.port, e.value) != expect[:3]:
            pytest.skip(f"this KVM does not deliver it as the SDM says (table 6-5: #UD is "
                        f"benign, so a fault delivering it is handled serially): expected "
                        f"{expect[:3]}, got {(e.kind, e.port, e.value)}")
        assert (e.kind, e.port, e.value) == expect[:3]
        if expect[3] is not None:
            assert cpu.get_state().regs.rdx == expect[3]
    finally:
        cpu.close()


def test_bad_arguments_are_refused() -> None:
    memory = raw.GuestMemory(MEM)
    with pytest.raises(ValueError, match="not reachable in real mode"):
        modes.real_mode(0x11_0000)
    with pytest.raises(ValueError, match="16-bit"):
        modes.real_mode(0x7C00, sp=0x1_0000)
    with pytest.raises(ValueError, match="32-bit address"):
        modes.protected_mode(1 << 32, memory.write, 0x1000)
    with pytest.raises(ValueError, match="identity_gib"):
        modes.long_mode(0x1_0000, memory.write, 0x10_0000, identity_gib=0)
    with pytest.raises(ValueError, match="page aligned"):
        modes.user_mode(USER_CODE, memory.write, USER_SYSTEM + 8, rsp=USER_STACK)
    with pytest.raises(ValueError, match="page aligned"):
        modes.identity_map(memory.write, 0x10_0010, 1 << 21)
    with pytest.raises(ValueError, match="outside guest memory"):
        memory.read(MEM - 4, 8)
    with pytest.raises(ValueError, match="outside guest memory"):
        memory.write(-1, b"x")
    memory.close()


@needs_kvm
def test_kvm_vcpu_refuses_an_xsave_image_of_the_wrong_size() -> None:
    memory = raw.GuestMemory(MEM)
    cpu = raw.KvmCpu(memory)
    try:
        image = cpu.vcpu.get_xsave()
        assert len(image) == cpu.vcpu.xsave_size >= 4096
        with pytest.raises(ValueError, match="KVM_SET_XSAVE would read past the buffer"):
            cpu.vcpu.set_xsave(image[:-1])
        cpu.vcpu.set_xsave(image)
    finally:
        cpu.close()
        memory.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_user_code_loads_segments_from_a_supervisor_gdt(engine: str, memory: Memory) -> None:
    """A segment load at CPL 3 reads its descriptor with supervisor rights, though the page
    of the GDT is the supervisor's: no #PF. (On Unicorn, kvmem's walker fills the TLB and is
    not told that QEMU asks with its kernel index: it sees the descriptor-loading
    instruction at a descriptor table's page.) A plain CPL 3 store there still faults."""
    state = modes.user_mode(USER_CODE, memory.write, USER_SYSTEM, rsp=USER_STACK,
                            identity_size=MEM)
    ds = state.sregs.ds.selector
    # mov $ds, %ax; mov %ax, %ds; mov %ax, %es; int3; mov %eax, (%rbx); int3
    memory.write(USER_CODE, bytes([0x66, 0xB8, ds & 0xFF, ds >> 8, 0x8E, 0xD8, 0x8E, 0xC0,
                                   0xCC, 0x89, 0x03, 0xCC]))
    cpu = new_cpu(engine, memory)
    try:
        cpu.set_state(state.with_regs(rbx=USER_SYSTEM + 0x10))
        e = cpu.run()
        assert (e.port, e.value) == (PORT_EXCEPTION, 3), "the segment loads faulted"
        e = cpu.run()
        assert (e.port, e.value) == (PORT_EXCEPTION, 14)
        assert (cpu.get_state().regs.rdx, cpu.get_state().regs.rcx) == (7, USER_SYSTEM + 0x10)
    finally:
        cpu.close()
