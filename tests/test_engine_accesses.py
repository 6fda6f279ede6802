"""Each guest access is what KVM's emulator makes of it, on every engine (issue 10, point 4).

The cases the differential test (tests/test_engine_differential.py) found engines to differ
on, written out with the exits KVM gives (measured on /dev/kvm), so each engine is held to
them on its own:
- an unaligned MMIO load or store is one access of its size (Unicorn's softmmu made an
  unaligned load the two aligned words around it, and a store single bytes);
- an access that crosses a page is split there and only there: the RAM part is read or
  written, the part without memory (a hole, a store to a read-only slot) is an MMIO exit;
- a store to a tracked page is one tracked write of its size, whatever its alignment;
- `rep ins` into a tracked page or a read-only slot is one write of all the elements its
  exit read ahead (no zero written first); RIP stays at it until that write's exit is taken;
- `rep stos` going down (DF set) goes down, exit after exit;
- a load from a RAM page into a page without memory completes with the RAM bytes read
  before its exit, whatever the host did to them meanwhile (difftest seed 10527); a store
  across the two has written its RAM part by its exit, and nothing more after it;
- 64-bit code with 4-level paging runs (Unicorn maps the page-table pages its walk reads).

The KVM side runs wherever /dev/kvm works and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from expect import GUEST_ENGINES

import kvmem
from kvmem.cpu import modes
from kvmem.engines import Exit, ExitKind
from kvmem.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE

ENGINES = GUEST_ENGINES
RAM = 1 << 20  # slot 0: [0, RAM)
HOLE = RAM  # one page without a slot
RAM2 = HOLE + PAGE_SIZE  # slot 1: one page of RAM
ROM = RAM2 + PAGE_SIZE  # slot 2: one read-only page
TRACKED = 0x3000  # a page of slot 0, write-tracked
MMIO = 0x1000_0000
CODE = 0x1000


def le(value: int, n: int = 4) -> str:
    return value.to_bytes(n, "little").hex()


def mov_edi(gpa: int) -> str:
    return "bf" + le(gpa)


def mov_eax(value: int) -> str:
    return "b8" + le(value)


STORE4, LOAD4, LOAD2 = "8907", "8b07", "668b07"


class Track:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def track_write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, data))

    def track_remove_region(self, gfn: int, npages: int) -> None:
        pass


Boot = Callable[[str, str], tuple[kvmem.Vm, kvmem.Vcpu, Track]]


@pytest.fixture
def boot() -> Iterator[Boot]:
    made: list[tuple[kvmem.Vm, list[kvmem.HostMemory]]] = []

    def boot(engine: str, program: str) -> tuple[kvmem.Vm, kvmem.Vcpu, Track]:
        mems = [kvmem.HostMemory.anonymous(n) for n in (RAM, PAGE_SIZE, PAGE_SIZE)]
        vm = kvmem.Vm(engine=engine)
        made.append((vm, mems))
        vm.set_memory_region(0, 0, 0, RAM, mems[0].hva)
        vm.set_memory_region(1, 0, RAM2, PAGE_SIZE, mems[1].hva)
        mems[2].view()[:] = bytes(range(256)) * 16
        vm.set_memory_region(2, KVM_MEM_READONLY, ROM, PAGE_SIZE, mems[2].hva)
        vm.write(CODE, bytes.fromhex(program + "f4"))  # ... hlt
        track = Track()
        vm.page_track.register(track)
        vm.page_track.add_gfn(TRACKED // PAGE_SIZE)
        cpu = vm.create_vcpu(0)
        cpu.start(CODE)
        return vm, cpu, track

    yield boot
    for vm, mems in made:
        assert vm.engine is not None
        vm.engine.close()
        for m in mems:
            m.close()


def mmio(gpa: int, size: int, written: bytes | None = None) -> Exit:
    if written is None:
        return Exit(ExitKind.MMIO, gpa, size, False)
    return Exit(ExitKind.MMIO, gpa, size, True, written)


def run(cpu: kvmem.Vcpu, answers: dict[int, bytes] | None = None) -> list[tuple[Exit, int]]:
    """(exit, EIP at it) up to the halt; MMIO reads answered from `answers` by gpa."""
    seen = []
    for _ in range(32):
        e = cpu.run()
        seen.append((e, cpu.get_regs().eip))
        if e.reads:
            cpu.complete((answers or {})[e.addr] if e.kind is ExitKind.MMIO
                         else bytes(range(0x61, 0x61 + e.answer_size)))
        if e.kind is ExitKind.HLT:
            return seen
    raise AssertionError(f"no halt: {seen}")


@pytest.mark.parametrize("engine", ENGINES)
def test_unaligned_mmio_accesses_are_one_exit_of_their_size(engine: str, boot: Boot) -> None:
    program = (mov_edi(MMIO + 1) + LOAD4            # 0x1000, 0x1005
               + mov_eax(0x11223344) + "894702"     # 0x1007, 0x100c: mov [edi+2], eax
               + mov_edi(MMIO + 0xFFF) + LOAD2)     # 0x100f, 0x1014: crosses an MMIO page
    _, cpu, _ = boot(engine, program)
    seen = run(cpu, {MMIO + 1: b"\x01\x02\x03\x04", MMIO + 0xFFF: b"\x05",
                     MMIO + 0x1000: b"\x06"})
    assert seen == [(mmio(MMIO + 1, 4), 0x1005),
                    (mmio(MMIO + 3, 4, bytes.fromhex("44332211")), 0x100F),
                    (mmio(MMIO + 0xFFF, 1), 0x1014),  # a page each: an exit each
                    (mmio(MMIO + 0x1000, 1), 0x1014),
                    (Exit(ExitKind.HLT), 0x1018)]
    assert cpu.get_regs().eax == 0x11220605


@pytest.mark.parametrize("engine", ENGINES)
def test_accesses_across_ram_and_no_memory_split_at_the_page(engine: str, boot: Boot) -> None:
    program = (mov_edi(HOLE - 2) + mov_eax(0xA1A2A3A4) + STORE4    # RAM | hole
               + mov_edi(RAM2 - 2) + mov_eax(0xB1B2B3B4) + STORE4  # hole | RAM
               + mov_edi(ROM - 2) + mov_eax(0xC1C2C3C4) + STORE4   # RAM | read-only
               + mov_edi(ROM - 1) + LOAD4)                         # RAM | read-only: RAM
    vm, cpu, _ = boot(engine, program)
    seen = run(cpu)
    assert [e for e, _ in seen] == [mmio(HOLE, 2, bytes.fromhex("a2a1")),
                                    mmio(RAM2 - 2, 2, bytes.fromhex("b4b3")),
                                    mmio(ROM, 2, bytes.fromhex("c2c1")),
                                    Exit(ExitKind.HLT)]
    assert [eip for _, eip in seen[:3]] == [0x100C, 0x1018, 0x1024]  # each store done
    assert vm.read(HOLE - 2, 2) == bytes.fromhex("a4a3")  # the RAM halves are written
    assert vm.read(RAM2, 2) == bytes.fromhex("b2b1")
    assert vm.read(ROM - 2, 2) == bytes.fromhex("c4c3")
    assert cpu.get_regs().eax == 0x020100C3  # RAM's last byte, then the ROM's first three


@pytest.mark.parametrize("engine", ENGINES)
def test_a_store_to_a_tracked_page_is_one_tracked_write(engine: str, boot: Boot) -> None:
    program = (mov_edi(TRACKED + 0x10) + mov_eax(0x11223344) + STORE4
               + mov_edi(TRACKED + 0x21) + STORE4                      # unaligned
               + mov_edi(TRACKED + PAGE_SIZE - 2) + STORE4)            # tracked | RAM
    vm, cpu, track = boot(engine, program)
    assert [e for e, _ in run(cpu)] == [Exit(ExitKind.HLT)]
    data = bytes.fromhex("44332211")
    assert track.writes == [(TRACKED + 0x10, data), (TRACKED + 0x21, data),
                            (TRACKED + PAGE_SIZE - 2, data[:2])]
    assert vm.read(TRACKED + PAGE_SIZE - 2, 4) == data


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("where", ["tracked", "read-only"])
def test_rep_ins_writes_its_elements_at_once(engine: str, where: str, boot: Boot) -> None:
    dest = TRACKED + 0x7FE if where == "tracked" else ROM + 0x7FE
    program = (mov_edi(dest) + "b904000000"   # mov ecx, 4
               + "ba40000000" + "f36c")       # mov edx, 0x40; rep insb (at 0x100f)
    vm, cpu, track = boot(engine, program)
    seen = run(cpu)
    first = (Exit(ExitKind.IO, 0x40, 1, False, count=4), 0x100F)
    if where == "tracked":
        assert seen == [first, (Exit(ExitKind.HLT), 0x1012)]
        assert track.writes == [(dest, b"abcd")]  # no zero first, no byte at a time
        assert vm.read(dest, 4) == b"abcd"
    else:  # one MMIO write of the four bytes; RIP at the instruction until it is taken
        assert seen == [first, (mmio(dest, 4, b"abcd"), 0x100F), (Exit(ExitKind.HLT), 0x1012)]
    assert (cpu.get_regs().ecx, cpu.get_regs().edi) == (0, dest + 4)


@pytest.mark.parametrize("engine", ENGINES)
def test_rep_stos_going_down_goes_down(engine: str, boot: Boot) -> None:
    program = (mov_edi(MMIO + 2) + "b903000000" + mov_eax(0x41)
               + "fd" + "f3aa" + "fc")        # std; rep stosb (at 0x1010); cld; hlt
    _, cpu, _ = boot(engine, program)
    seen = run(cpu)
    assert [e for e, _ in seen] == [mmio(MMIO + 2, 1, b"A"), mmio(MMIO + 1, 1, b"A"),
                                    mmio(MMIO, 1, b"A"), Exit(ExitKind.HLT)]
    assert [eip for _, eip in seen] == [0x1010] * 3 + [0x1014]
    assert cpu.get_regs().edi == MMIO - 1


@pytest.mark.parametrize("engine", ENGINES)
def test_long_mode_with_paging_runs(engine: str, boot: Boot) -> None:
    vm, cpu, _ = boot(engine, "")
    code = bytes.fromhex("48b8" + le(0x1122334455667788, 8) + mov_edi(MMIO + 4)
                         + "488907" + "f4")  # mov rax, imm64; mov edi, MMIO+4; mov [rdi], rax
    vm.write(0x10000, code)
    cpu.set_state(modes.long_mode(0x10000, vm.write, 0x20000))
    assert cpu.run() == mmio(MMIO + 4, 8, bytes.fromhex("8877665544332211"))
    assert cpu.run() == Exit(ExitKind.HLT)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_tracked_part_behind_an_mmio_part_comes_after_its_exit(engine: str,
                                                                  boot: Boot) -> None:
    """A store from a hole into a tracked page: KVM's emulator exits for the hole's part
    first; the tracked part (on the KVM engine an MMIO exit of its read-only split, taken by
    the engine itself) is written when the vCPU is entered again."""
    vm, cpu, track = boot(engine, mov_edi(RAM2 - 2) + mov_eax(0x11223344) + STORE4)
    vm.page_track.add_gfn(RAM2 // PAGE_SIZE)
    assert cpu.run() == mmio(RAM2 - 2, 2, bytes.fromhex("4433"))
    assert track.writes == []
    assert cpu.run() == Exit(ExitKind.HLT)
    assert track.writes == [(RAM2, bytes.fromhex("2211"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_in_is_its_own_exit(engine: str, boot: Boot) -> None:
    """Two INs of one port with the same EDI: two exits (an answer is its instruction's)."""
    _, cpu, _ = boot(engine, "e420" + "88c3" + "e420")  # in al, 0x20; mov bl, al; in ...
    seen = run(cpu)
    assert [e for e, _ in seen] == [Exit(ExitKind.IO, 0x20, 1, False)] * 2 + [
        Exit(ExitKind.HLT)]


@pytest.mark.parametrize("engine", ENGINES)
def test_rep_ins_touches_no_memory_before_its_answer(engine: str, boot: Boot) -> None:
    """At a string IN's exit the destination is as it was and not dirty (QEMU stores a zero
    there first; KVM writes nothing until the answer): a harvest then reports nothing, the
    one after the answer reports the page."""
    vm, cpu, _ = boot(engine, mov_edi(RAM2 + 0x10) + "b902000000" + "ba40000000" + "f36c")
    vm.write(RAM2 + 0x10, b"xy")
    vm.set_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, RAM2, PAGE_SIZE,
                         vm.translate(RAM2))
    assert vm.get_dirty_log(1) == bytes(8)
    assert cpu.run() == Exit(ExitKind.IO, 0x40, 1, False, count=2)
    assert vm.read(RAM2 + 0x10, 2) == b"xy"
    assert vm.get_dirty_log(1) == bytes(8)
    cpu.complete(b"ab")
    assert cpu.run() == Exit(ExitKind.HLT)
    assert vm.read(RAM2 + 0x10, 2) == b"ab"
    assert vm.get_dirty_log(1) == b"\x01" + bytes(7)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_answered_in_survives_a_write_protection_of_its_page(engine: str,
                                                               boot: Boot) -> None:
    """The destination page of a string IN is write-protected at its exit (a harvest): the
    answered element is written once (no second exit for it), and logged."""
    vm, cpu, _ = boot(engine, mov_edi(RAM2 + 0x10) + STORE4 + "b901000000" + "ba40000000"
                      + "fd" + "f36c" + "fc")  # mov [edi], eax; ...; std; rep insb; cld
    vm.set_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, RAM2, PAGE_SIZE, vm.translate(RAM2))
    assert cpu.run() == Exit(ExitKind.IO, 0x40, 1, False, count=1)
    assert vm.get_dirty_log(1) == b"\x01" + bytes(7)  # the store; the page is protected again
    cpu.complete(b"q")
    assert cpu.run() == Exit(ExitKind.HLT)
    assert vm.read(RAM2 + 0x10, 1) == b"q"
    assert vm.get_dirty_log(1) == b"\x01" + bytes(7)


@pytest.mark.parametrize("engine", ENGINES)
def test_rep_ins_across_a_hole_and_a_tracked_page(engine: str, boot: Boot) -> None:
    """The element crossing from the hole into a tracked page: the hole's byte is an MMIO
    exit, the tracked byte a tracked write when the vCPU is entered again."""
    vm, cpu, track = boot(engine, mov_edi(RAM2 - 1) + "b902000000" + "ba40000000"
                          + "66f36d")  # rep insw
    vm.page_track.add_gfn(RAM2 // PAGE_SIZE)
    assert cpu.run() == Exit(ExitKind.IO, 0x40, 2, False, count=1)  # 1 byte left in the page
    cpu.complete(b"ab")
    assert cpu.run() == mmio(RAM2 - 1, 1, b"a")
    assert track.writes == []
    assert cpu.run() == Exit(ExitKind.IO, 0x40, 2, False, count=1)
    assert track.writes == [(RAM2, b"b")]
    cpu.complete(b"cd")
    assert cpu.run() == Exit(ExitKind.HLT)
    assert track.writes == [(RAM2, b"b"), (RAM2 + 1, b"cd")]


SPARE = 0x20_0000  # slot 3 of the tests below: one page, no slot after it


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("change", ["write", "discard"])
def test_a_load_from_ram_into_no_memory_keeps_the_ram_bytes_it_read(
        engine: str, change: str, boot: Boot) -> None:
    """A load crossing from a RAM page into a page without memory: KVM's emulator reads
    the RAM part, then exits for the rest, and completes with the RAM bytes it read
    before the exit — whatever the host did to that page meanwhile (a write, a discard:
    the difftest's seed 10527)."""
    mem = kvmem.HostMemory.anonymous(PAGE_SIZE)
    try:
        vm, cpu, _ = boot(engine, mov_edi(SPARE + PAGE_SIZE - 2) + LOAD4)  # load at 0x1005
        vm.set_memory_region(3, 0, SPARE, PAGE_SIZE, mem.hva)
        vm.write(SPARE + PAGE_SIZE - 2, b"\x11\x22")
        assert cpu.run() == mmio(SPARE + PAGE_SIZE, 2)
        assert cpu.get_regs().eip == 0x1005
        if change == "write":
            vm.write(SPARE + PAGE_SIZE - 2, b"\x77\x88")
        else:
            mem.discard(0, PAGE_SIZE)
        cpu.complete(b"\x33\x44")
        assert cpu.run() == Exit(ExitKind.HLT)
        assert cpu.get_regs().eax == 0x44332211
        vm.set_memory_region(3, 0, SPARE, 0, 0)
    finally:
        mem.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direction", ["ram first", "hole first"])
def test_a_store_across_ram_and_no_memory_wrote_its_ram_part_at_the_exit(
        engine: str, direction: str, boot: Boot) -> None:
    """The mirror case: a store crossing between a RAM page and a page without memory
    has written its RAM part by its MMIO exit (either order); the host changes those
    bytes at the exit and they stay so (the engine writes nothing more after it)."""
    at, ram_part = ((HOLE - 2, HOLE - 2) if direction == "ram first" else (RAM2 - 2, RAM2))
    vm, cpu, _ = boot(engine, mov_edi(at) + mov_eax(0x44332211) + STORE4)
    e = cpu.run()
    assert e.kind is ExitKind.MMIO and e.is_write and e.size == 2
    stored = bytes.fromhex("1122") if direction == "ram first" else bytes.fromhex("3344")
    assert vm.read(ram_part, 2) == stored
    vm.write(ram_part, b"zz")
    assert cpu.run() == Exit(ExitKind.HLT)
    assert vm.read(ram_part, 2) == b"zz"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("warm", [False, True])
def test_a_move_into_no_memory_sends_its_source_as_it_was(engine: str, warm: bool,
                                                          boot: Boot) -> None:
    """A MOVS element whose store crosses from RAM into a page without memory, its source
    overlapping the RAM part (dst = src + 3): KVM's emulator reads the whole source, then
    writes — the exit's byte is the source's as it was, and the RAM part the source's
    first three. (Unicorn stores such a store's RAM bytes first: its TLB fill of the page
    without memory refuses the store before any byte, and the instruction runs exactly.)
    `warm`: the page without memory was stored to before, so Unicorn's TLB knew it."""
    src = HOLE - 6
    # warm-up: mov $HOLE, %edi; movsd; twice (the first maps the page, the second stores
    # to it mapped)
    program = ("bf" + le(HOLE) + "a5") * 2 if warm else ""
    program += "be" + le(src) + mov_edi(src + 3) + "a5"  # mov $src, %esi; movsd
    vm, cpu, _ = boot(engine, program)
    vm.write(src, bytes.fromhex("a1b2c3d4"))
    for _ in range(2 if warm else 0):
        e = cpu.run()
        assert e.kind is ExitKind.MMIO and e.addr == HOLE and e.size == 4
    e = cpu.run()
    assert e == mmio(HOLE, 1, bytes.fromhex("d4")), e
    assert vm.read(src + 3, 3) == bytes.fromhex("a1b2c3")
    assert cpu.run() == Exit(ExitKind.HLT)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mapped", [False, True])
def test_a_move_into_a_write_protected_page_reads_its_source_once(engine: str,
                                                                  mapped: bool) -> None:
    """A MOVS element whose load and store both cross into a RAM page a harvest
    write-protected, the page before writable again, the store overlapping the source
    (dst = src + 1): the element copies the source as it was, on every engine, and both
    pages are logged. (Unicorn's TLB entry for the page, filled for the load, let the store
    on: it stored the bytes before the page, took the write fault on the page, and ran the
    instruction again, which read back what it had stored — difftest seed 13013, long64.
    A read fill of a page not writable RAM now grants no write, so the store fills again
    and takes its write fault before any byte.) `mapped`: the page was touched before the
    harvest (Unicorn maps it, read-only after the harvest); else the load maps it."""
    page = 0x20000
    src, source = page - 3, bytes.fromhex("a1b2c3d4")
    mem = kvmem.HostMemory.anonymous(RAM)
    vm = kvmem.Vm(engine=engine)
    try:
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, mem.hva)
        touch = (mov_edi(page + 8) + LOAD4 + STORE4) if mapped else ""
        vm.write(CODE, bytes.fromhex(
            touch + "f4"  # hlt; then, after the harvest:
            + mov_edi(page - 16) + STORE4  # the page before writable again
            + "be" + le(src) + mov_edi(src + 1) + "a5" + "f4"))  # movsd; hlt
        vm.write(src, source)
        cpu = vm.create_vcpu(0)
        cpu.start(CODE)
        assert cpu.run() == Exit(ExitKind.HLT)
        vm.get_dirty_log(0)  # write-protects every page
        assert cpu.run() == Exit(ExitKind.HLT)  # on from the first HLT
        assert vm.read(src + 1, 4) == source, vm.read(src, 5).hex()
        dirty = vm.get_dirty_log(0)
        assert [i for i in range(RAM // PAGE_SIZE) if dirty[i // 8] >> (i % 8) & 1] == \
            [page // PAGE_SIZE - 1, page // PAGE_SIZE]
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()
