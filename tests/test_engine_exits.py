"""Exits follow KVM's convention on every engine: the same guest makes the same exits, with
the same fields and the same registers at each, on KVM and on Unicorn.

The convention (measured on /dev/kvm, table in `kvmem.engines`): at an OUT and an MMIO
write the instruction is done (EIP past it); at an IN and an MMIO read it is not (EIP at
it, its destination untouched) until `complete(data)` and the next `run`. A string IN is
one exit of `count` accesses (KVM's read-ahead); a string OUT is one exit per element,
EIP at the instruction while elements remain. An unaligned MMIO store is one exit of its
size. Registers may be set at any exit; after a kick, `run` returns KICKED and runs
nothing. RFLAGS.RF is KVM's at each exit (set inside an unfinished REP string instruction).
At a string IN's exit its element is untouched, and nothing after a port instruction has
run, also in a run's first block with paging on. The expected exits are written out, so
each engine is held to them on its own.

The KVM side runs wherever /dev/kvm works and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Iterator

import pytest
from expect import GUEST_ENGINES

import kvmem
from kvmem.cpu import modes
from kvmem.engines import EngineError, Exit, ExitKind, Regs

ENGINES = GUEST_ENGINES
RAM = 1 << 20
CODE = 0x1000
BUF = 0x2000
MMIO = 0x1000_0000

# (address, bytes) of each instruction: the exits below name them by address
TOUR = [
    (0x1000, "b0 11"),                 # mov al, 0x11
    (0x1002, "e6 80"),                 # out 0x80, al
    (0x1004, "e4 81"),                 # in al, 0x81
    (0x1006, "bf 00 20 00 00"),        # mov edi, BUF
    (0x100B, "b9 04 00 00 00"),        # mov ecx, 4
    (0x1010, "66 ba 82 00"),           # mov dx, 0x82
    (0x1014, "f3 6c"),                 # rep insb
    (0x1016, "be 00 20 00 00"),        # mov esi, BUF
    (0x101B, "b9 04 00 00 00"),        # mov ecx, 4
    (0x1020, "f3 6e"),                 # rep outsb
    (0x1022, "bb 00 00 00 10"),        # mov ebx, MMIO
    (0x1027, "c7 03 44 33 22 11"),     # mov dword [ebx], 0x11223344
    (0x102D, "8b 43 04"),              # mov eax, [ebx + 4]
    (0x1030, "c7 43 01 aa bb cc dd"),  # mov dword [ebx + 1], 0xddccbbaa (unaligned)
    (0x1037, "bf 00 30 00 00"),        # mov edi, BUF + 0x1000
    (0x103C, "b9 02 00 00 00"),        # mov ecx, 2
    (0x1041, "66 ba 84 00"),           # mov dx, 0x84
    (0x1045, "f3 66 6d"),              # rep insw
    (0x1048, "f4"),                    # hlt
]


def code(instructions: list[tuple[int, str]]) -> bytes:
    out = b""
    for addr, text in instructions:
        assert CODE + len(out) == addr, f"{addr:#x}: the listing's addresses are off"
        out += bytes.fromhex(text)
    return out


def io(port: int, size: int, out: bytes | None = None, count: int = 1) -> Exit:
    if out is None:
        return Exit(ExitKind.IO, port, size, False, count=count)
    return Exit(ExitKind.IO, port, size, True, out)


def mmio(gpa: int, size: int, written: bytes | None = None) -> Exit:
    if written is None:
        return Exit(ExitKind.MMIO, gpa, size, False)
    return Exit(ExitKind.MMIO, gpa, size, True, written)


# exit, then (eip, eax, ecx, esi, edi) as the VMM reads them at that exit
TOUR_EXITS = [
    (io(0x80, 1, b"\x11"), (0x1004, 0x11, 0, 0, 0)),                # OUT: past
    (io(0x81, 1), (0x1004, 0x11, 0, 0, 0)),                         # IN: at, AL untouched
    (io(0x82, 1, count=4), (0x1014, 0x41, 4, 0, BUF)),              # INS x4: one exit, at
    (io(0x82, 1, b"A"), (0x1020, 0x41, 3, BUF + 1, BUF + 4)),       # OUTS: one per element
    (io(0x82, 1, b"B"), (0x1020, 0x41, 2, BUF + 2, BUF + 4)),
    (io(0x82, 1, b"C"), (0x1020, 0x41, 1, BUF + 3, BUF + 4)),
    (io(0x82, 1, b"D"), (0x1020, 0x41, 0, BUF + 4, BUF + 4)),       # at, until the next run
    (mmio(MMIO, 4, bytes.fromhex("44332211")), (0x102D, 0x41, 0, BUF + 4, BUF + 4)),
    (mmio(MMIO + 4, 4), (0x102D, 0x41, 0, BUF + 4, BUF + 4)),       # read: at
    (mmio(MMIO + 1, 4, bytes.fromhex("aabbccdd")), (0x1037, 0x44434241, 0, BUF + 4, BUF + 4)),
    (io(0x84, 2, count=2), (0x1045, 0x44434241, 2, BUF + 4, BUF + 0x1000)),
    (Exit(ExitKind.HLT), (0x1049, 0x44434241, 0, BUF + 4, BUF + 0x1004)),
]


@pytest.fixture
def boot() -> Iterator[Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]]:
    made: list[tuple[kvmem.Vm, kvmem.HostMemory]] = []

    def boot(engine: str, program: bytes, regs: Regs | None = None
             ) -> tuple[kvmem.Vm, kvmem.Vcpu]:
        mem = kvmem.HostMemory.anonymous(RAM)
        vm = kvmem.Vm(engine=engine)
        made.append((vm, mem))
        vm.set_memory_region(0, 0, 0, RAM, mem.hva)
        vm.write(CODE, program)
        assert vm.engine is not None
        cpu = vm.create_vcpu(0)
        cpu.start(CODE, regs if regs is not None else Regs(esp=0x8000))
        return vm, cpu

    yield boot
    for vm, mem in made:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


def answer(e: Exit) -> bytes:
    return bytes(range(0x41, 0x41 + e.answer_size))


@pytest.mark.parametrize("engine", ENGINES)
def test_the_tour_makes_kvms_exits(engine: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]
                                   ) -> None:
    vm, cpu = boot(engine, code(TOUR))
    vm.write(BUF, b"abcd")
    seen = []
    for _ in TOUR_EXITS:
        e = cpu.run()
        r = cpu.get_regs()
        seen.append((e, (r.eip, r.eax, r.ecx, r.esi, r.edi)))
        if e.reads:
            cpu.complete(answer(e))
    assert seen == TOUR_EXITS
    assert vm.read(BUF, 4) == b"ABCD"  # the INS read-ahead, then OUTS sent it back
    assert vm.read(BUF + 0x1000, 4) == b"ABCD"


@pytest.mark.parametrize("engine", ENGINES)
def test_complete_refuses_data_of_the_wrong_length(
        engine: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    vm, cpu = boot(engine, code(TOUR))
    assert cpu.run() == io(0x80, 1, b"\x11")
    with pytest.raises(EngineError, match="no read exit"):
        cpu.complete(b"\x00")
    assert cpu.run() == io(0x81, 1)
    for wrong in (b"", b"\x01\x02"):
        with pytest.raises(EngineError, match=r"needs 1 bytes of data \(1x1\), got") as err:
            cpu.complete(wrong)
        assert err.value.errno == errno.EINVAL
    cpu.complete(b"\x07")
    e = cpu.run()
    assert e == io(0x82, 1, count=4)
    with pytest.raises(EngineError, match=r"needs 4 bytes of data \(4x1\), got 1"):
        cpu.complete(b"\x01")
    cpu.complete(b"wxyz")
    for _ in range(5):
        cpu.run()
    assert cpu.run() == mmio(MMIO + 4, 4)
    with pytest.raises(EngineError, match=r"needs 4 bytes of data \(4\), got 8"):
        cpu.complete(bytes(8))
    cpu.complete(b"\x01\x02\x03\x04")
    cpu.run()
    assert cpu.get_regs().eax == 0x04030201
    assert vm.read(BUF, 4) == b"wxyz"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unanswered_read_reads_zeros(engine: str,
                                        boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    vm, cpu = boot(engine, code(TOUR))
    vm.write(BUF, b"abcd")
    cpu.run()
    cpu.run()  # in al, 0x81: not answered
    assert cpu.run() == io(0x82, 1, count=4)
    assert cpu.get_regs().eax == 0
    cpu.run()
    assert vm.read(BUF, 4) == bytes(4)


# at each exit the VMM sets a register; the guest sums them: esi = 1 + 2 + 4 + 8 + 16 + 32
SETTERS = [
    (0x1000, "31 f6"),        # xor esi, esi
    (0x1002, "e6 80"),        # out 0x80, al          ← eax := 1
    (0x1004, "01 c6"),        # add esi, eax
    (0x1006, "e4 81"),        # in al, 0x81           ← ebx := 2: the IN runs again, reads 4
    (0x1008, "01 de"),        # add esi, ebx
    (0x100A, "01 c6"),        # add esi, eax
    (0x100C, "b9 00 00 00 10"),  # mov ecx, MMIO
    (0x1011, "89 01"),        # mov [ecx], eax        ← edx := 8
    (0x1013, "01 d6"),        # add esi, edx
    (0x1015, "8b 39"),        # mov edi, [ecx]        ← ebp := 16: runs again, reads 32
    (0x1017, "01 ee"),        # add esi, ebp
    (0x1019, "01 fe"),        # add esi, edi
    (0x101B, "f4"),           # hlt
]


@pytest.mark.parametrize("engine", ENGINES)
def test_registers_may_be_set_at_every_exit(
        engine: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    _, cpu = boot(engine, code(SETTERS))
    plan = [(io(0x80, 1, b"\x00"), "eax", 1), (io(0x81, 1), "ebx", 2), (io(0x81, 1), "", 0),
            (mmio(MMIO, 4, b"\x04\x00\x00\x00"), "edx", 8), (mmio(MMIO, 4), "ebp", 16),
            (mmio(MMIO, 4), "", 0)]
    for want, name, value in plan:
        e = cpu.run()
        assert e == want
        r = cpu.get_regs()
        if name:
            setattr(r, name, value)
            cpu.set_regs(r)  # at a read: drops it, the instruction runs again
        else:
            cpu.complete(b"\x04" if e.kind is ExitKind.IO else (32).to_bytes(4, "little"))
    assert cpu.run() == Exit(ExitKind.HLT)
    assert cpu.get_regs().esi == 63


@pytest.mark.parametrize("engine", ENGINES)
def test_a_kick_at_an_exit_runs_nothing(engine: str,
                                        boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    _, cpu = boot(engine, bytes.fromhex("e6 80 43 e6 80 eb fb"))  # out; inc ebx; out; jmp
    for _ in range(3):
        assert cpu.run() == io(0x80, 1, b"\x00")
        before = cpu.get_regs()
        cpu.kick()
        assert cpu.run() == Exit(ExitKind.KICKED)
        assert cpu.get_regs() == before
    assert cpu.run() == io(0x80, 1, b"\x00")
    assert cpu.get_regs().ebx == 3


# a store right after a port instruction, in the same straight run of code: nothing of it
# may be in memory at the port exit (Unicorn runs whole blocks between stops)
AFTER_PORTS = [
    (0x1000, "b0 11"),                    # mov al, 0x11
    (0x1002, "e6 80"),                    # out 0x80, al
    (0x1004, "c7 05 00 20 00 00 34 12 00 00"),  # mov dword [BUF], 0x1234
    (0x100E, "e4 81"),                    # in al, 0x81
    (0x1010, "a2 04 20 00 00"),           # mov [BUF + 4], al
    (0x1015, "f4"),                       # hlt
]


@pytest.mark.parametrize("engine", ENGINES)
def test_nothing_after_a_port_instruction_runs_before_its_exit(
        engine: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    vm, cpu = boot(engine, code(AFTER_PORTS))
    for _ in range(2):  # the second time from a fresh start: the code may be new
        vm.write(BUF, bytes(4) + b"\x77")
        assert cpu.run() == io(0x80, 1, b"\x11")
        assert (cpu.get_regs().eip, vm.read(BUF, 5)) == (0x1004, bytes(4) + b"\x77")
        assert cpu.run() == io(0x81, 1)
        assert (cpu.get_regs().eip, vm.read(BUF, 5)) == (0x100E, bytes.fromhex("3412000077"))
        cpu.complete(b"\x99")
        assert cpu.run() == Exit(ExitKind.HLT)
        assert vm.read(BUF, 5) == bytes.fromhex("3412000099")
        cpu.start(CODE, Regs(esp=0x8000))


class Kicker:
    """A page-track notifier that kicks the vCPU at the first tracked write: the stop
    lands while the guest is inside the writing instruction."""

    def __init__(self) -> None:
        self.cpu: kvmem.Vcpu | None = None
        self.writes: list[tuple[int, bytes]] = []

    def track_write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, data))
        if self.cpu is not None and len(self.writes) == 1:
            self.cpu.kick()

    def track_remove_region(self, gfn: int, npages: int) -> None:
        pass


@pytest.mark.parametrize("engine", ENGINES)
def test_a_read_modify_write_runs_once_when_a_stop_lands_in_it(
        engine: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    program = bytes.fromhex("bb 00 20 00 00"  # mov ebx, BUF
                            "ff 03"           # inc dword [ebx]
                            "e6 80"           # out 0x80, al
                            "f4")             # hlt
    vm, cpu = boot(engine, program)
    vm.write(BUF, (41).to_bytes(4, "little"))
    kicker = Kicker()
    vm.page_track.register(kicker)
    vm.page_track.add_gfn(BUF >> 12)
    kicker.cpu = cpu
    exits = [cpu.run()]
    if exits[0].kind is ExitKind.KICKED:
        exits.append(cpu.run())
    assert exits[-1] == io(0x80, 1, b"\x00")
    assert vm.read(BUF, 4) == (42).to_bytes(4, "little")
    assert kicker.writes == [(BUF, (42).to_bytes(4, "little"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_nothing_after_a_port_instruction_runs_before_its_exit_in_real_mode(
        engine: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    """The same in real mode, where the code segment's base is not 0 (CS:IP = 0x7c0:0):
    what names an instruction is its linear address, not IP."""
    program = bytes.fromhex("b0 11"              # mov al, 0x11
                            "e6 80"              # out 0x80, al
                            "c7 06 00 20 34 12"  # mov word [BUF], 0x1234
                            "e4 81"              # in al, 0x81
                            "a2 04 20"           # mov [BUF + 4], al
                            "f4")                # hlt
    vm, cpu = boot(engine, b"\xf4")
    vm.write(0x7C00, program)
    for _ in range(2):
        vm.write(BUF, bytes(4) + b"\x77")
        cpu.set_state(modes.real_mode(0x7C00, sp=0x7000))
        assert cpu.run() == io(0x80, 1, b"\x11")
        assert (cpu.get_regs().eip, vm.read(BUF, 5)) == (0x4, bytes(4) + b"\x77")
        assert cpu.run() == io(0x81, 1)
        assert (cpu.get_regs().eip, vm.read(BUF, 5)) == (0xA, bytes.fromhex("3412000077"))
        cpu.complete(b"\x99")
        assert cpu.run() == Exit(ExitKind.HLT)
        assert vm.read(BUF, 5) == bytes.fromhex("3412000099")


# RFLAGS.RF at each exit: KVM's emulator writes RFLAGS back where it writes RIP back, RF set
# while a REP string instruction is not finished (EIP at it) and clear once an instruction
# finishes; a read exit writes nothing back (RF as the last write-back left it)
HOLE = RAM  # no slot above the RAM: a read there is an MMIO exit
RF_TOUR = [
    (0x1000, "be 00 20 00 00"),        # mov esi, BUF
    (0x1005, "b9 02 00 00 00"),        # mov ecx, 2
    (0x100A, "66 ba 82 00"),           # mov dx, 0x82
    (0x100E, "f3 6e"),                 # rep outsb: RF at each element, the last too
    (0x1010, "e6 80"),                 # out 0x80, al: finished, RF clear
    (0x1012, "bf 00 00 00 10"),        # mov edi, MMIO
    (0x1017, "b9 02 00 00 00"),        # mov ecx, 2
    (0x101C, "f3 aa"),                 # rep stosb into MMIO: RF at each write
    (0x101E, "be 00 00 00 10"),        # mov esi, MMIO
    (0x1023, "bf 00 20 00 00"),        # mov edi, BUF
    (0x1028, "b9 02 00 00 00"),        # mov ecx, 2
    (0x102D, "f3 a4"),                 # rep movsb MMIO -> RAM: reads, RF as before (clear)
    (0x102F, "be 00 00 00 10"),        # mov esi, MMIO
    (0x1034, "bf 10 00 00 10"),        # mov edi, MMIO + 0x10
    (0x1039, "b9 02 00 00 00"),        # mov ecx, 2
    (0x103E, "f3 a4"),                 # rep movsb MMIO -> MMIO: the read after a write: RF
    (0x1040, "bf ff 2f 00 00"),        # mov edi, BUF + 0xfff
    (0x1045, "b9 02 00 00 00"),        # mov ecx, 2
    (0x104A, "f3 6c"),                 # rep insb, 1 byte left in the page: the second IN
                                       # comes after KVM went back to the guest: RF
    (0x104C, "be fc fb 0f 00"),        # mov esi, HOLE - 1028
    (0x1051, "bf 00 40 00 00"),        # mov edi, 0x4000
    (0x1056, "b9 06 04 00 00"),        # mov ecx, 1030
    (0x105B, "e6 80"),                 # out 0x80, al
    (0x105D, "f3 a4"),                 # rep movsb: 1028 bytes of RAM, then the hole: KVM
                                       # went back to the guest at ecx = 1024: RF
    (0x105F, "f4"),                    # hlt: RF clear
]
RF_EXITS = [  # exit, (eip, ecx, RF)
    (io(0x82, 1, b"a"), (0x100E, 1, 1)),
    (io(0x82, 1, b"b"), (0x100E, 0, 1)),
    (io(0x80, 1, b"\0"), (0x1012, 0, 0)),
    (mmio(MMIO, 1, b"\0"), (0x101C, 1, 1)),
    (mmio(MMIO + 1, 1, b"\0"), (0x101C, 0, 1)),
    (mmio(MMIO, 1), (0x102D, 2, 0)),
    (mmio(MMIO + 1, 1), (0x102D, 1, 0)),
    (mmio(MMIO, 1), (0x103E, 2, 0)),
    (mmio(MMIO + 0x10, 1, b"A"), (0x103E, 1, 1)),
    (mmio(MMIO + 1, 1), (0x103E, 1, 1)),
    (mmio(MMIO + 0x11, 1, b"A"), (0x103E, 0, 1)),
    (io(0x82, 1, count=1), (0x104A, 2, 0)),
    (io(0x82, 1, count=1), (0x104A, 1, 1)),
    (io(0x80, 1, b"\0"), (0x105D, 1030, 0)),
    (mmio(HOLE, 1), (0x105D, 2, 1)),
    (mmio(HOLE + 1, 1), (0x105D, 1, 1)),
    (Exit(ExitKind.HLT), (0x1060, 0, 0)),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_rf_at_each_exit_is_kvms(engine: str,
                                 boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    vm, cpu = boot(engine, code(RF_TOUR))
    vm.write(BUF, b"ab")
    seen = []
    for _ in RF_EXITS:
        e = cpu.run()
        r = cpu.get_regs()
        seen.append((e, (r.eip, r.ecx, r.eflags >> 16 & 1)))
        if e.reads:
            cpu.complete(bytes([0x41] * e.answer_size))
    assert seen == RF_EXITS
    assert cpu.get_state().regs.rflags & 1 << 16 == 0


MODES = ["prot32", "long64"]


def enter(vm: kvmem.Vm, cpu: kvmem.Vcpu, mode: str, program: bytes) -> None:
    """Load `program` at 0x10000 and start it in `mode` (long64: 4-level paging)."""
    vm.write(0x10000, program)
    if mode == "long64":
        cpu.set_state(modes.long_mode(0x10000, vm.write, 0x20000))
    else:
        cpu.set_state(modes.protected_mode(0x10000, vm.write, 0x30000))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_a_string_in_leaves_its_element_alone_until_answered(
        engine: str, mode: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    """On a page the guest has written (Unicorn maps it writable), at a REP INS's exit the
    element is what it was (QEMU's INS stores a zero there first; KVM writes nothing until
    the answer), the first time the INS runs (the first block of a run, with paging too)
    and when it runs again; the answer then lands."""
    program = bytes.fromhex("bf 00 20 00 00"  # mov edi, BUF
                            "89 07"           # mov [rdi], eax: the page is written
                            "b9 02 00 00 00"  # mov ecx, 2
                            "ba 40 00 00 00"  # mov edx, 0x40
                            "f3 6c"           # rep insb
                            "f4")
    vm, cpu = boot(engine, b"\xf4")
    for value in (0x77665544, 0x33221100):
        enter(vm, cpu, mode, program)
        cpu.set_regs(dataclasses.replace(cpu.get_regs(), eax=value))
        assert cpu.run() == io(0x40, 1, count=2)
        assert vm.read(BUF, 2) == value.to_bytes(4, "little")[:2]
        cpu.complete(b"xy")
        assert cpu.run() == Exit(ExitKind.HLT)
        assert vm.read(BUF, 2) == b"xy"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_nothing_after_a_port_instruction_runs_before_its_exit_from_a_runs_first_block(
        engine: str, mode: str, boot: Callable[..., tuple[kvmem.Vm, kvmem.Vcpu]]) -> None:
    """The port instruction in the first block a run executes, with paging on too (Unicorn
    reports that block to no hook: the engine walks the page tables to look at it first)."""
    program = bytes.fromhex("b0 11"                                # mov al, 0x11
                            "e6 80"                                # out 0x80, al
                            "c7 04 25 00 20 00 00 34 12 00 00"     # mov dword [BUF], 0x1234
                            "e4 81"                                # in al, 0x81
                            "88 04 25 04 20 00 00"                 # mov [BUF + 4], al
                            "f4")
    vm, cpu = boot(engine, b"\xf4")
    for _ in range(2):
        vm.write(BUF, bytes(4) + b"\x77")
        enter(vm, cpu, mode, program)
        assert cpu.run() == io(0x80, 1, b"\x11")
        assert vm.read(BUF, 5) == bytes(4) + b"\x77"
        assert cpu.run() == io(0x81, 1)
        assert vm.read(BUF, 5) == bytes.fromhex("3412000077")
        cpu.complete(b"\x99")
        assert cpu.run() == Exit(ExitKind.HLT)
        assert vm.read(BUF, 5) == bytes.fromhex("3412000099")
