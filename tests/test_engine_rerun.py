"""Running a guest again after kvmem write-protected the pages it wrote, on every engine.

Each way a page that the guest has mapped writable becomes write-protected — a harvest by
GET, GET + CLEAR with manual protect, turning logging on by a flags-only change, tracking
then untracking a gfn — is followed by running the walker again with a new seed. The first
write to each page after the protection faults; the guest must still see its writes: the
checksum it reports is the model's, memory holds the new seed's pattern, and the next
harvest reports every page written. A migration source must also log the last store made
before a kick, and the copy built from its harvests must equal guest memory.

The KVM side runs wherever /dev/kvm works and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from expect import GUEST_ENGINES

import kvmem
from kvmem.engines import Exit, ExitKind, Regs
from kvmem.guests import PORT_RESULT, PORT_TORN, program
from kvmem.uapi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE

ENGINES = GUEST_ENGINES
RAM = 4 << 20
NPAGES = RAM // PAGE_SIZE
CODE = 0x1000
WALK = 0x10000  # the walker writes one word at the start of each of these pages
WALKED = list(range(WALK // PAGE_SIZE, WALK // PAGE_SIZE + 16))  # not 32: see model_checksum
DATA = 0x200000  # the loop guest's counter


class Guest:
    """One VM, its memory and vCPU 0, with a bundled program loaded at CODE."""

    def __init__(self, engine: str, flags: int, name: str) -> None:
        self.mem = kvmem.HostMemory.anonymous(RAM)
        self.vm = kvmem.Vm(engine=engine)
        self.vm.set_memory_region(0, flags, 0, RAM, self.mem.hva)
        self.vm.write(CODE, program(name))
        if flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.vm.get_dirty_log(0)  # the load itself is not the guest's doing
        assert self.vm.engine is not None
        self.cpu = self.vm.create_vcpu(0)

    def close(self) -> None:
        assert self.vm.engine is not None
        self.vm.engine.close()
        self.mem.close()


@pytest.fixture
def boot() -> Iterator[Callable[..., Guest]]:
    made: list[Guest] = []

    def make(engine: str, flags: int = KVM_MEM_LOG_DIRTY_PAGES, name: str = "walker") -> Guest:
        made.append(Guest(engine, flags, name))
        return made[-1]

    yield make
    for guest in made:
        guest.close()


def bits(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def model_checksum(seed: int) -> int:
    """What one pass of the walker over WALKED reports. Over 32 words the seed's bits
    would be rotated through every position and cancel or not by parity alone: seeds 7
    and 8 would report the same checksum."""
    s = 0
    for gfn in WALKED:
        s = ((s << 1) | (s >> 31)) & 0xFFFF_FFFF
        s ^= (gfn * PAGE_SIZE) ^ seed ^ 1
    return s


def test_the_model_tells_the_seeds_apart() -> None:
    assert len({model_checksum(seed) for seed in (7, 8, 9)}) == 3


def walk_and_check(guest: Guest, seed: int, restart: str = "start") -> None:
    """Run the walker with `seed` to its halt; it saw its own writes and so does the host."""
    regs = Regs(esi=WALK, ecx=len(WALKED) * PAGE_SIZE, edi=PAGE_SIZE, ebx=seed, ebp=1)
    if restart == "start":
        guest.cpu.start(CODE, regs)
    else:  # the same vCPU, registers rewritten: no start(), so no flush of translated code
        guest.cpu.set_regs(Regs(regs.eax, regs.ebx, regs.ecx, regs.edx, regs.esi, regs.edi,
                                regs.esp, regs.ebp, eip=CODE, eflags=0x2))
    want = model_checksum(seed).to_bytes(4, "little")
    assert guest.cpu.run() == Exit(ExitKind.IO, PORT_RESULT, 4, True, want), \
        f"seed {seed}: the guest's checksum is not the model's: some of its writes were lost"
    assert guest.cpu.run().kind is ExitKind.HLT
    stale = [gfn for gfn in WALKED
             if guest.vm.read(gfn * PAGE_SIZE, 4)
             != ((gfn * PAGE_SIZE) ^ seed ^ 1).to_bytes(4, "little")]
    assert stale == [], f"seed {seed}: pages without the new pattern: {[hex(g) for g in stale]}"


def clear_all(vm: kvmem.Vm) -> list[int]:
    """Manual protect's harvest: GET, then CLEAR exactly what GET reported."""
    bitmap = vm.get_dirty_log(0)
    vm.clear_dirty_log(0, 0, NPAGES, bitmap)
    return bits(bitmap)


@pytest.mark.parametrize("restart", ["start", "set_regs"])
@pytest.mark.parametrize("engine", ENGINES)
def test_rerun_after_get_dirty_log(engine: str, restart: str,
                                   boot: Callable[..., Guest]) -> None:
    guest = boot(engine)
    walk_and_check(guest, 7)
    assert bits(guest.vm.get_dirty_log(0)) == WALKED
    for seed in (8, 9):
        walk_and_check(guest, seed, restart)
        assert bits(guest.vm.get_dirty_log(0)) == WALKED, f"seed {seed}"


@pytest.mark.parametrize("engine", ENGINES)
def test_rerun_after_manual_protect_clear(engine: str, boot: Callable[..., Guest]) -> None:
    guest = boot(engine)
    guest.vm.enable_manual_dirty_log_protect()
    walk_and_check(guest, 7)
    assert clear_all(guest.vm) == WALKED
    for seed in (8, 9):
        walk_and_check(guest, seed)
        assert clear_all(guest.vm) == WALKED, f"seed {seed}"


@pytest.mark.parametrize("engine", ENGINES)
def test_rerun_after_logging_is_turned_on(engine: str, boot: Callable[..., Guest]) -> None:
    guest = boot(engine)
    # Logged pages are mapped 4 KiB at a time, and stay mapped when logging goes off; the
    # 2 MiB mappings of a slot that never logged are dropped, not write-protected.
    walk_and_check(guest, 6)
    guest.vm.set_memory_region(0, 0, 0, RAM, guest.mem.hva)
    walk_and_check(guest, 7)  # logging off: the pages stay mapped writable
    guest.vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, guest.mem.hva)  # flags only
    walk_and_check(guest, 8)
    assert bits(guest.vm.get_dirty_log(0)) == WALKED
    walk_and_check(guest, 9)
    assert bits(guest.vm.get_dirty_log(0)) == WALKED


@pytest.mark.parametrize("engine", ENGINES)
def test_rerun_after_tracking_then_untracking(engine: str, boot: Callable[..., Guest]) -> None:
    guest = boot(engine)
    walk_and_check(guest, 7)  # not harvested: only tracking write-protects the pages
    for seed in (8, 9):  # the second round starts from a harvested, empty log
        for gfn in WALKED:
            guest.vm.page_track.add_gfn(gfn)
        for gfn in WALKED:
            guest.vm.page_track.remove_gfn(gfn)
        walk_and_check(guest, seed)
        assert bits(guest.vm.get_dirty_log(0)) == WALKED, f"seed {seed}"


@pytest.mark.parametrize("engine", ENGINES)
def test_migration_logs_the_last_store_before_a_kick(engine: str,
                                                     boot: Callable[..., Guest]) -> None:
    """Pre-copy rounds while the loop guest counts, then a kick and one final harvest: the
    copy equals the source, and both hold the last counter value the guest stored."""
    guest = boot(engine, name="loop")
    vm, cpu = guest.vm, guest.cpu
    cpu.start(CODE, Regs(esi=DATA, ecx=0, ebx=0))  # count until kicked
    exits: list[Exit] = []

    def run() -> None:
        while not exits or exits[-1].kind is ExitKind.IO:
            exits.append(cpu.run())

    def stored_since(value: bytes) -> None:
        deadline = time.monotonic() + 10
        while vm.read(DATA, 4) == value:
            assert time.monotonic() < deadline, "the guest stopped storing"
            time.sleep(0.001)

    copy = bytearray(vm.read(0, RAM))  # the bulk copy, made while the log was clean
    runner = threading.Thread(target=run)
    runner.start()
    try:
        # many rounds: a store lost after a harvest shows only if it held a new value; a
        # harvest that stops the guest just after a store leaves EIP on it, and the store
        # run again then writes what memory already holds
        for _ in range(100):
            stored_since(bytes(copy[DATA:DATA + 4]))
            for gfn in bits(vm.get_dirty_log(0)):
                copy[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE] = vm.read(gfn * PAGE_SIZE, PAGE_SIZE)
        stored_since(bytes(copy[DATA:DATA + 4]))  # a store the pre-copy did not see
    finally:
        cpu.kick()
        runner.join(timeout=10)
    final = bits(vm.get_dirty_log(0))
    for gfn in final:
        copy[gfn * PAGE_SIZE:(gfn + 1) * PAGE_SIZE] = vm.read(gfn * PAGE_SIZE, PAGE_SIZE)
    torn = [e for e in exits if e.kind is ExitKind.IO and e.addr == PORT_TORN]
    assert torn == [], f"the guest read back {len(torn)} values it had not just written"
    assert exits[-1:] == [Exit(ExitKind.KICKED)]
    assert DATA // PAGE_SIZE in final
    assert bytes(copy) == vm.read(0, RAM)
    regs = cpu.get_regs()
    # Past the store (offset 1) the guest has stored ebx. At it, the store is to come on
    # KVM; on Unicorn it may already be in memory: a stop that lands just after a store
    # leaves EIP at that instruction, which runs again on the next run().
    stored = [regs.ebx - 1, regs.ebx] if regs.eip == CODE + 1 else [regs.ebx]
    assert int.from_bytes(copy[DATA:DATA + 4], "little") in stored, \
        f"the guest's last store, of {regs.ebx:#x} (eip {regs.eip:#x}), was not migrated"


# The CPU's own writes: accessed and dirty bits in the guest's page tables. A CPU walking the
# tables on a TLB miss sets A in every entry it uses and D in the leaf of a write; under
# dirty logging those are guest writes to the table pages like any other (KVM logs them).
TABLES = 0x20000  # long_mode's PML4, PDPT, PD (2 MiB pages)
STORE_AT = 0x300000  # in the second 2 MiB page
AD = 0x60
# mov dword [STORE_AT], 0x1234 ; out 0x10, al ; hlt
AD_PROGRAM = bytes([0xC7, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x34, 0x12, 0x00, 0x00,
                    0xE6, 0x10, 0xF4])


def _entries(vm: kvmem.Vm) -> dict[tuple[int, int], int]:
    """The A/D bits of every entry of the three table pages that has any."""
    out = {}
    for page in range(3):
        raw = vm.read(TABLES + page * PAGE_SIZE, PAGE_SIZE)
        for i in range(512):
            ad = int.from_bytes(raw[8 * i:8 * i + 8], "little") & AD
            if ad:
                out[(page, i)] = ad
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_accessed_and_dirty_bits_are_guest_writes(engine: str) -> None:
    """Tables without A/D bits: the run sets A on PML4[0], PDPT[0] and PD[0] (the code's
    page, fetched) and A|D on PD[1] (the store's) — nothing else — on both engines; the
    dirty log reports the three table pages with the stored one; a restore of a snapshot
    taken before the run puts the tables back without those bits, and the run made again
    from there sets and logs them again."""
    from kvmem.cpu import modes

    mem = kvmem.HostMemory.anonymous(RAM)
    vm = kvmem.Vm(engine=engine)
    try:
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, mem.hva)
        state = modes.long_mode(CODE, vm.write, TABLES)
        for page in range(3):  # clear every A and D bit the helper wrote
            raw = bytearray(vm.read(TABLES + page * PAGE_SIZE, PAGE_SIZE))
            for i in range(512):
                e = int.from_bytes(raw[8 * i:8 * i + 8], "little")
                raw[8 * i:8 * i + 8] = (e & ~AD).to_bytes(8, "little")
            vm.write(TABLES + page * PAGE_SIZE, bytes(raw))
        vm.write(CODE, AD_PROGRAM)
        cpu = vm.create_vcpu(0)
        cpu.set_state(state)
        vm.get_dirty_log(0)  # the set-up is not the guest's doing
        snap = vm.snapshot()
        assert cpu.run().kind is ExitKind.IO
        assert _entries(vm) == {(0, 0): 0x20, (1, 0): 0x20, (2, 0): 0x20, (2, 1): AD}
        assert bits(vm.get_dirty_log(0)) == [TABLES // PAGE_SIZE + i for i in range(3)] \
            + [STORE_AT // PAGE_SIZE]
        vm.restore(snap)
        assert _entries(vm) == {}, "the restore left bits the guest's CPU set"
        vm.get_dirty_log(0)
        assert cpu.run().kind is ExitKind.IO  # again from the snapshot: the same walks
        assert _entries(vm) == {(0, 0): 0x20, (1, 0): 0x20, (2, 0): 0x20, (2, 1): AD}
        assert bits(vm.get_dirty_log(0)) == [TABLES // PAGE_SIZE + i for i in range(3)] \
            + [STORE_AT // PAGE_SIZE]
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


def test_a_unicorn_lookup_outside_the_guest_sets_no_bit() -> None:
    """Unicorn looks code addresses up through its TLB outside emu_start too (a code hook
    removed, a cache dropped): kvmem's fill then translates without setting bits, and the
    entry is flushed before the guest runs — else the guest's first fetch would hit it and
    its walk, with the accessed bits it sets, would never happen."""
    from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

    from kvmem.cpu import modes
    from kvmem.engines.unicorn import UnicornVcpu

    mem = kvmem.HostMemory.anonymous(RAM)
    vm = kvmem.Vm(engine="unicorn")
    try:
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM, mem.hva)
        state = modes.long_mode(CODE, vm.write, TABLES)
        pd0 = int.from_bytes(vm.read(TABLES + 2 * PAGE_SIZE, 8), "little")
        vm.write(TABLES + 2 * PAGE_SIZE, (pd0 & ~AD).to_bytes(8, "little"))
        vm.write(CODE, AD_PROGRAM)
        cpu = vm.create_vcpu(0)
        cpu.set_state(state)
        assert cpu.run().kind is ExitKind.IO  # every page mapped: no more mirror changes
        assert _entries(vm)[(2, 0)] == 0x20
        vm.write(TABLES + 2 * PAGE_SIZE, (pd0 & ~AD).to_bytes(8, "little"))
        cpu.set_state(state)
        backend = cpu._backend
        assert isinstance(backend, UnicornVcpu)
        # no translation cached (a state with the same CR3 keeps them)
        backend._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        backend._uc.ctl_remove_cache(CODE, CODE + 1)  # a lookup of the code's page
        assert _entries(vm).get((2, 0), 0) == 0, "a lookup outside the guest set a bit"
        assert cpu.run().kind is ExitKind.IO
        assert _entries(vm).get((2, 0), 0) == 0x20, "the guest's fetch did not walk"
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_tables_in_a_read_only_slot_keep_their_bits(engine: str) -> None:
    """KVM's walker skips the accessed/dirty bits of a table it cannot write: tables in a
    read-only slot stay as they are, and the guest runs on."""
    from kvmem.cpu import modes

    mem = kvmem.HostMemory.anonymous(RAM)
    vm = kvmem.Vm(engine=engine)
    try:
        vm.set_memory_region(0, 0, 0, TABLES, mem.hva)
        vm.set_memory_region(1, kvmem.KVM_MEM_READONLY, TABLES, 0x10000, mem.hva + TABLES)
        vm.set_memory_region(2, 0, TABLES + 0x10000, RAM - TABLES - 0x10000,
                             mem.hva + TABLES + 0x10000)
        view = mem.view()

        def write(gpa: int, data: bytes) -> None:
            view[gpa:gpa + len(data)] = data

        state = modes.long_mode(CODE, write, TABLES, gdt_gpa=0x3000)
        for page in range(3):
            for i in range(4):
                at = TABLES + page * PAGE_SIZE + 8 * i
                e = int.from_bytes(view[at:at + 8], "little")
                write(at, (e & ~AD).to_bytes(8, "little"))
        write(CODE, AD_PROGRAM)
        tables = bytes(view[TABLES:TABLES + 3 * PAGE_SIZE])
        cpu = vm.create_vcpu(0)
        cpu.set_state(state)
        assert cpu.run().kind is ExitKind.IO
        assert vm.read(STORE_AT, 4) == (0x1234).to_bytes(4, "little")
        assert bytes(view[TABLES:TABLES + 3 * PAGE_SIZE]) == tables
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


@pytest.mark.parametrize("hook", ["_on_tlb_fill", "_on_write"])
def test_an_error_in_a_c_api_hook_is_the_vcpus(hook: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The TLB fill hook and the exact step's memory hooks are called from C (not through
    Unicorn's Python binding): an exception there cannot propagate, so it stops the guest
    and `run` raises it. The store goes to a page without memory, so it is stepped."""
    from kvmem.engines import EngineError
    from kvmem.engines.unicorn import UnicornVcpu

    def boom(self: UnicornVcpu, uc: object, *args: int) -> None:
        # _on_tlb_fill(uc, vaddr, access, entry, data); _on_write(uc, access, gpa, ...)
        raise RuntimeError(f"{hook} of {args[0 if hook == '_on_tlb_fill' else 1]:#x} failed")

    monkeypatch.setattr(UnicornVcpu, hook, boom)
    mem = kvmem.HostMemory.anonymous(RAM)
    vm = kvmem.Vm(engine="unicorn")
    try:
        vm.set_memory_region(0, 0, 0, 0x200000, mem.hva)  # nothing at STORE_AT
        vm.write(CODE, AD_PROGRAM[:11] + bytes([0xF4]))  # mov dword [STORE_AT], ...; hlt
        cpu = vm.create_vcpu(0)
        cpu.start(CODE)
        at = CODE if hook == "_on_tlb_fill" else STORE_AT
        with pytest.raises(EngineError, match=f"{hook} of {at:#x} failed"):
            cpu.run()
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


def _unicorn_walker(ram: int) -> tuple[kvmem.Vm, kvmem.HostMemory, Callable[[], int]]:
    """The walker over `ram` bytes on Unicorn, paging off; the callable runs it from
    `start` and returns how many TLB fills the run took."""
    mem = kvmem.HostMemory.anonymous(ram)
    vm = kvmem.Vm(engine="unicorn")
    vm.set_memory_region(0, 0, 0, ram, mem.hva)
    vm.write(CODE, program("walker"))
    cpu = vm.create_vcpu(0)
    assert vm.engine is not None
    stats = vm.engine.stats

    def run() -> int:
        before = stats["tlb_fills"]
        cpu.start(CODE, Regs(esi=WALK, ecx=ram - WALK, edi=PAGE_SIZE, ebx=7, ebp=1))
        assert cpu.run().kind is ExitKind.IO
        assert cpu.run().kind is ExitKind.HLT
        return int(stats["tlb_fills"]) - before

    return vm, mem, run


def test_unicorns_tlb_grows_to_the_working_set() -> None:
    """QEMU resizes its TLB only when it is flushed, and a guest with paging off never
    flushes it: a sweep of 1,008 pages through its first 256 entries would miss on every
    page of every pass (a call into kvmem's walker each). The engine flushes once the fills
    since the last flush outnumber the entries, and QEMU doubles the TLB: by the third
    pass the whole sweep hits."""
    vm, mem, run = _unicorn_walker(RAM)
    try:
        pages = (RAM - WALK) // PAGE_SIZE
        assert run() > pages  # the sum sweep misses what the fill sweep's evicted
        run()
        assert run() == 0, "the TLB did not grow to the working set"
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()


def test_unicorn_keeps_translations_where_kvm_does() -> None:
    """KVM_SET_SREGS drops the guest's TLB only when CR0, CR3, CR4 or EFER change, or in
    PAE paging, whose PDPTEs it loads anew (`uc_state.mmu_reset_needed`, after KVM's
    `__set_sregs`): `start` again in the same mode keeps every translation (no fill), a state
    with another CR3 drops them all."""
    from unicorn.unicorn_const import UC_ARCH_X86, UC_MODE_64
    from unicorn.unicorn_py3 import Uc

    from kvmem.cpu import uc_state

    small = 1 << 19  # 113 pages: within QEMU's first 256 entries
    vm, mem, run = _unicorn_walker(small)
    try:
        assert run() > 0
        run()
        assert run() == 0, "start() in the same mode dropped the TLB"
        cpu = vm.vcpus[0]
        state = cpu.get_state()  # at the HLT; CR3 is 0, paging off
        sregs = state.sregs
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc_state.set_state(uc, state)
        assert not uc_state.mmu_reset_needed(uc, sregs)
        for changed in (dataclasses.replace(sregs, cr0=sregs.cr0 ^ 1 << 16),
                        dataclasses.replace(sregs, cr3=PAGE_SIZE),
                        dataclasses.replace(sregs, cr4=sregs.cr4 ^ 1 << 9),
                        dataclasses.replace(sregs, efer=sregs.efer ^ 1)):
            assert uc_state.mmu_reset_needed(uc, changed), changed
        pae = dataclasses.replace(sregs, cr0=sregs.cr0 | 1 << 31, cr4=sregs.cr4 | 1 << 5,
                                  cr3=TABLES)
        uc_state.set_state(uc, dataclasses.replace(state, sregs=pae))
        assert uc_state.mmu_reset_needed(uc, pae), "PAE paging loads its PDPTEs anew"
        del uc
        # on the engine: another CR3 drops every translation
        moved = dataclasses.replace(state, sregs=dataclasses.replace(sregs, cr3=PAGE_SIZE),
                                    regs=dataclasses.replace(
                                        state.regs, rip=CODE, rsi=WALK, rcx=small - WALK,
                                        rdi=PAGE_SIZE, rbp=1))
        cpu.set_state(moved)
        assert vm.engine is not None
        before = vm.engine.stats["tlb_fills"]
        assert cpu.run().kind is ExitKind.IO
        assert vm.engine.stats["tlb_fills"] - before >= (small - WALK) // PAGE_SIZE
    finally:
        assert vm.engine is not None
        vm.engine.close()
        mem.close()
