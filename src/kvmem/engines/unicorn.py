"""The Unicorn engine: guest code on Unicorn's x86 CPU, with kvmem's MMU as the stage-2.

Theory of operation. Unicorn maps nothing up front. The first touch of a page faults into
a hook, which takes the page through kvmem's fault path (DESIGN path 3, `mmu.fault`) and
maps exactly what the resulting spte maps — the host page(s) by pointer, read-only unless
the spte is writable. So dirty logging and write tracking work as in KVM: a write to a
read-only mapping faults again, and either makes the spte writable (marking the page
dirty) or cannot (a tracked gfn, a read-only slot). Pages that cannot be plain RAM — no
slot (MMIO), read-only slots, tracked gfns — are mapped as Unicorn MMIO pages whose
callbacks run every access through `vcpu.guest_read` / `vcpu.guest_write`, the full vCPU
memory path: RAM where a slot has appeared since, a tracked write, or an MMIO exit with
KVM's shape.

Rules of this room:
- Each vCPU owns one `Uc` (UC_MODE_64: any mode, by the state `kvmem.cpu.uc_state` loads)
  and a worker thread that alone runs it (map, unmap, protect, emu_start). `run` hands the
  worker a go and waits for the exit it posts. Between two runs the worker is out of
  emu_start and the vCPU between two instructions, so the caller reads and writes
  registers and state directly.
- Exits leave emu_start, with KVM's convention (see `kvmem.engines`), yet the guest runs
  block-wise (no instruction count): Unicorn checks for a stop only at block starts, after
  every load and store (EIP put back at the instruction of the access) and at a code hook.
  A stop is made exact where an exit needs it:
  - a slow page (MMIO, tracked, read-only slot, hole): its callback only asks for an
    *exact step* and stops; the run ends at the instruction, nothing of it done, and the
    worker runs just it again (count=1) with memory hooks on, which see each access whole
    and do it as KVM's emulator does (see "exact steps" below). Inside a step no stop lands
    mid-instruction (a zap or a kick waits for its end), so it runs once. A run without an
    instruction count after one with it makes Unicorn drop every translated block
    (uc_emu_start deletes its count hook and calls tb_flush): the block-wise runs after a
    step pass a count no run reaches (`_FOREVER`), keeping the hook, until one stops for
    something other than a slow page. Blocks translated meanwhile call the hook (a C
    counter) before each instruction, so a stop may land at any instruction there.
  - IN / OUT: the port hooks run inside the instruction and the block would go on past it.
    So port instructions are *learned* before they run: every new block whose bytes hold
    a port opcode (any byte E4-E7, EC-EF, 6C-6F) stops the run before it starts (an edge
    hook); the worker gives it a code hook on every instruction (a *scan*), which notes
    the port instructions it meets, until each was seen once. A learned port instruction
    has a code hook on the instruction after it, so a stop its port hook makes lands there;
    an INS one on itself too (`_at_ins`): QEMU's INS stores a zero at EDI before its IN,
    so its exit is posted before it runs. The first block of a run Unicorn reports to no
    edge hook: the worker looks at the block at RIP itself (with paging on, where its code
    translates: `_walk_code`). One met unlearned all the same (a block
    that could not be looked at) is rewound to the context its hook saved, and scanned;
    meanwhile hooks do nothing (what its block did until the stop is not undone).
  Instructions are named by linear address (CS base + RIP), as code hooks name them.
  A read cannot wait for its answer inside the hook: the hook saves the context from
  before the instruction and the worker restores it after the stop; `complete` queues the
  answer and the next run replays the instruction, whose hooks read it (by gpa, or by port
  and EDI for the elements of a string IN, so an instruction Unicorn restarts reads the
  same answers; answers belong to the RIP of their instruction). A REP INS going up is
  finished between runs as KVM's emulator finishes it (`_string_in_writeback`). A context
  saved in a hook carries the EFLAGS read then (`_save` / `_restore`). A load whose RAM
  part was read before its MMIO exit takes those bytes in the replay, as KVM's emulator
  does, even where Unicorn maps that page as RAM (`_read_parts_slow`).
- The MMU tells the engine of every spte it drops or write-protects (`stage2_unmapped`,
  under the MMU lock). The vCPU records the range as pending and, if its guest may be
  running (`_inside`), stops Unicorn and waits until the guest is out — so when the MMU's
  flush returns, no guest instruction uses the old mapping. A gfn being faulted in counts
  as mapped for this (`_inflight`): the mirror maps an spte after the fault path handed it
  over (from the hook, or in a restart), and a zap meanwhile must not miss it. Pending
  ranges are unmapped between two `emu_start`s; a hook that re-enters the guest while
  some are pending protects their regions PROT_NONE first (a fenced access restarts the
  instruction after the real unmap). A memory hook never unmaps or re-protects the page
  under the current access: Unicorn forbids the unmap, and a store finishes with the TLB
  entry it read before calling the hook — for a read-only page, one that drops the write.
  Such a hook returns False and leaves the change to `_restart`, run between two
  emu_starts; the instruction then runs again. Mapping an unmapped page from its hook is
  safe: Unicorn gives an unmapped page a TLB entry that never hits, so the access reads a
  fresh one.
- Regions. Unicorn's map, unmap and protect each rebuild its whole memory map, at a cost
  that grows with its number of regions, and an unmap flushes its TLB page by page. So,
  once the mirror maps `_MERGE_PAGES` pages, it keeps few, short regions: within a chunk
  of `_CHUNK` gfns (no region crosses one), consecutive RAM pages over consecutive host
  pages with one protection are one region; a slow page is a region of its own. (Below
  that, a region per page: a write fault after a harvest is then one protection change
  over few regions, where a merged chunk takes about four map/unmap calls.) `_remap`
  re-cuts the regions that changed pages touch, with their neighbours — a region whose
  extent stays is protected, the others unmapped and mapped — and only between two
  emu_starts, as it unmaps and maps again neighbours that the instruction or its block
  may be using. A hook maps a page itself only where no other region changes
  (`_map_in_hook`: no neighbour to merge with); else it leaves the mapping to `_restart`
  (caution: no test failed when hooks merged themselves). A fence covers a whole region:
  an access anywhere in it restarts.
- Hooks never hold `_inside` while they wait for a lock or for the VMM (`_leave`/`_enter`).
- RF (RFLAGS bit 16) at an exit is KVM's, set by `_report_rf` (QEMU's RF is not KVM's:
  it leaves RF alone in REP string instructions). KVM's emulator writes RFLAGS back only
  where it writes RIP back: RF set while a REP string instruction is not finished, clear
  once an instruction finishes. So: at a write exit (MMIO write, OUT(S), a REP INS's
  writeback) RF is 1 if the instruction is a REP string one still at RIP, else 0; at a read
  exit (IN, MMIO read) and any other stop RF is as the last write-back left it: as at the
  run's start if the run finished no instruction (RIP is where it started) — or 1 if a REP
  string instruction there went back to the guest meanwhile (a REP INS once its elements
  read ahead are written, any other every 1024 iterations) — and 0 if it did.
- Events (an exception, INT n, SYSCALL) stop Unicorn (`uc_state.UcTrap`); the worker
  delivers them between two emu_starts (`kvmem.cpu.events`, memory through the vCPU's
  accessors) and goes on, or exits SHUTDOWN for what cannot be delivered. The event of an
  instruction that exited or is run again is dropped with it.
- Guest virtual memory: Unicorn's TLB is virtual (UC_TLB_VIRTUAL) and kvmem's walker fills
  it (`_on_tlb_fill`), over the vCPU's accessors — so table pages need no mapping, and the
  accessed and dirty bits a walk sets are writes kvmem makes for the vCPU, logged like
  KVM's (QEMU's own walker would set them by physical stores no log sees). An entry grants
  what the walk allows the CPL filling it (QEMU keeps one TLB per privilege), a write only
  once the leaf is dirty. A walk that fails refuses the fill: Unicorn stops before the
  instruction does anything and the worker delivers the #PF, CR2 read from Unicorn
  (`uc_state.fault_address`). Fills made outside emu_start (Unicorn's own code lookups)
  set no bit and are flushed before the guest runs. The TLB is dropped where KVM drops
  it (`uc_state.mmu_reset_needed`: a state load that changes CR0/3/4/EFER; the guest's own
  CR3 writes, INVLPG, ...) and, besides, when the fills since the last drop outnumber its
  entries: QEMU sizes its TLB only when it is flushed (doubling it when more than 70% was
  in use), so a working set wider than the 256 entries it starts with, under a guest that
  never flushes (paging off, one CR3), would otherwise miss on every page of every sweep —
  and each miss here is a call into Python. A real TLB may drop entries at any time, so
  the guest cannot tell. A block-wise store's fill of a slow
  page is refused too (`_store_gate`), before any byte of the store — QEMU fills the page
  a store crosses into first — and the instruction runs exactly; its fill of a RAM page
  not mapped writable takes the write fault then, and the instruction runs again. So an
  entry grants a write only for a write's fill or a page mapped writable RAM: a store to a
  page a load filled fills again.
- A vCPU in SMM maps address space 1: switching drops every mapping.
- Dirty rings: the worker keeps its vCPU loaded, so the marks of its faults go to that
  vCPU's ring. A mark that raises the ring's soft-full request stops the guest: a fault's
  access is not done (the instruction runs after the reset, as KVM re-enters a faulting
  instruction after its requests; an exact step completes first), and every entry checks
  the request first:
  `run` returns DIRTY_RING_FULL, running nothing, until a reset makes room (KVM's
  kvm_dirty_ring_check_request before each guest entry).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import errno
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from unicorn import x86_const as X
from unicorn.unicorn_const import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_HOOK_CODE,
    UC_HOOK_EDGE_GENERATED,
    UC_HOOK_INSN,
    UC_HOOK_MEM_PROT,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_NONE,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
)
from unicorn.unicorn_py3 import Uc, UcError
from unicorn.unicorn_py3 import unicorn as _ucb

from .. import sync
from ..cpu import PageFault, PagingFeatures, Segment, Sregs, VcpuState, events, uc_state
from ..cpu import Regs as KvmRegs
from ..cpu.events import Event, Interrupt
from ..cpu.paging import Controls, TlbEntry, translate_gva, walk_for_tlb
from ..errors import KvmError
from ..mmu import MemoryFault, MmioExit, Spte, TrackedWrite
from ..uapi import KVM_USER_MEM_SLOTS, PAGE_SHIFT, PAGE_SIZE
from . import AttachedOnce, EngineCapabilities, EngineError, Exit, ExitKind, Regs

if TYPE_CHECKING:
    from ..slots import Change
    from ..vm import Vcpu, Vm

__all__ = ["UnicornEngine", "UnicornVcpu"]

_REGS = (("eax", X.UC_X86_REG_RAX), ("ebx", X.UC_X86_REG_RBX), ("ecx", X.UC_X86_REG_RCX),
         ("edx", X.UC_X86_REG_RDX), ("esi", X.UC_X86_REG_RSI), ("edi", X.UC_X86_REG_RDI),
         ("esp", X.UC_X86_REG_RSP), ("ebp", X.UC_X86_REG_RBP), ("eip", X.UC_X86_REG_RIP),
         ("eflags", X.UC_X86_REG_RFLAGS))
_RAM, _SLOW = "ram", "slow"
_PageMap = tuple[str, int, bool]  # how the mirror maps a page: kind, hva (RAM), writable
_SLOW_PAGE: _PageMap = (_SLOW, 0, False)
_Region = tuple[int, int, str, int, bool]  # base gfn, npages, kind, hva (RAM), writable
_CHUNK = 64  # gfns: no region of the mirror crosses a multiple of it (see "Regions")
_MERGE_PAGES = 128  # the mirror merges pages into regions once it maps this many
_STEPPED = Exit(ExitKind.INTERNAL_ERROR, detail="one instruction run")  # _settle's, by identity
_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf2\xf3")
_PIO_READ_AHEAD = 1024  # KVM's emulator reads a string IN ahead into a 1 KiB buffer
_REX = frozenset(range(0x40, 0x50))  # before IN/OUT only in 64-bit code (else inc/dec)
_CR0_PE, _CR0_PG = 1, 1 << 31
_RFLAGS_AC = 1 << 18
_MSR_EFER = 0xC000_0080
_PF = 14
_AT_STOP = object()  # _want_exact's: the instruction to run exactly is where the run stopped
_FOREVER = 1 << 62  # an instruction count no run reaches (see "exact steps")
_TLB_ENTRIES = 256  # QEMU's first TLB size per privilege (CPU_TLB_DYN_DEFAULT_BITS)
_TLB_ENTRIES_MAX = 1 << 15  # grown no further by kvmem's flushes (128 MiB of pages)
_PORT_OPCODES = frozenset((*range(0xE4, 0xE8), *range(0xEC, 0xF0), *range(0x6C, 0x70)))
# the string instructions (ins, outs, movs, cmps, stos, lods, scas; byte and wider forms)
_STRING_OPCODES = frozenset((*range(0x6C, 0x70), *range(0xA4, 0xA8), *range(0xAA, 0xB0)))
_RF = 1 << 16  # RFLAGS.RF (see "RF" in the header)
_REP_REENTRY = 1024  # KVM's emulator re-enters the guest every 1024 REP iterations


def controls_of(reg: _FastRegs, cr0: int | None = None) -> Controls:
    """The registers a page walk depends on, read through `reg`."""
    return Controls(reg(X.UC_X86_REG_CR0) if cr0 is None else cr0, reg(X.UC_X86_REG_CR3),
                    reg(X.UC_X86_REG_CR4), reg.efer())


class _Scan:
    """A block under scan: its instruction count and size, the instructions seen."""

    def __init__(self, icount: int, size: int) -> None:
        self.icount, self.size = icount, size
        self.seen: set[int] = set()
        self.done = False
        self.hook: int | None = None




def _flat(selector: int, type_: int) -> Segment:
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1,
                   dpl=0, db=1, s=1, l=0, g=1)


def _start_state(entry: int, r: Regs) -> VcpuState:
    """What `KvmEngineVcpu.start` loads: flat 32-bit protected mode, CPL 0, no paging."""
    data = _flat(0x10, 3)
    return VcpuState(
        regs=KvmRegs(rax=r.eax, rbx=r.ebx, rcx=r.ecx, rdx=r.edx, rsi=r.esi, rdi=r.edi,
                     rsp=r.esp, rbp=r.ebp, rip=entry, rflags=0x2),
        sregs=Sregs(cs=_flat(0x08, 11), ds=data, es=data, fs=data, gs=data, ss=data,
                    cr0=0x11))


class UnicornEngine(AttachedOnce):
    """kvmem on Unicorn. Create with `Vm(engine="unicorn")`; reach it as `vm.engine`."""

    name = "unicorn"

    def __init__(self) -> None:
        self._caps = EngineCapabilities(name=self.name, address_spaces=2,
                                        max_slots=KVM_USER_MEM_SLOTS, readonly_mem=True,
                                        dirty_log=True, write_tracking=True,
                                        guest_memfd=True)
        self._vm: Vm | None = None
        self._vcpus: list[UnicornVcpu] = []
        # `paused`: workers wait at this gate between two emu_starts while it is held
        self._gate_lock = sync.Mutex("unicorn_engine.gate")
        self._gate = sync.Condition(self._gate_lock)
        self._paused = 0
        self.stats = {"faults": 0, "maps": 0, "unmaps": 0, "slow_accesses": 0,
                      "stops": 0, "restarts": 0, "steps": 0, "scans": 0, "rewinds": 0,
                      "events": 0, "tlb_fills": 0, "pauses": 0}

    def attach(self, vm: Vm) -> None:
        self._claim(vm)
        vm.mmu.add_mirror(self)
        vm.add_listener(self)

    def create_vcpu_backend(self, vcpu: Vcpu) -> UnicornVcpu:
        if self._vm is not vcpu.vm:
            raise EngineError(errno.EINVAL, f"{vcpu!r} is not a vCPU of this engine's Vm")
        cpu = UnicornVcpu(self, vcpu)
        self._vcpus.append(cpu)
        return cpu

    def create_guest_memfd(self, size: int, flags: int) -> None:
        """kvmem's memfd holds the pages: Unicorn maps what kvmem's stage-2 maps, a
        guest_memfd page through kvmem's direct map."""
        return None

    def close(self) -> None:
        vm, self._vm = self._vm, None
        for cpu in self._vcpus:
            cpu._close()
        if vm is not None:
            vm.mmu.remove_mirror(self)
            with contextlib.suppress(KvmError):
                vm.remove_listener(self)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No vCPU runs guest code in the block (`Engine.paused`): each running one is
        stopped between two instructions and its worker waits at the gate; its `run`
        goes on afterwards as after a zap's stop."""
        with self._gate_lock:
            self._paused += 1
            self.stats["pauses"] += 1
        try:
            for cpu in self._vcpus:
                cpu._hold()
            yield
        finally:
            with self._gate_lock:
                self._paused -= 1
                self._gate.notify_all()

    # -- the stage-2 mirror ---------------------------------------------------------------------
    def stage2_unmapped(self, as_id: int, start_gfn: int, end_gfn: int) -> None:
        for cpu in self._vcpus:
            cpu._zap(as_id, start_gfn, end_gfn)

    # -- Vm listener (zaps and write protections reach the mirror from the MMU) -------------------
    def slots_committed(self, vm: Vm, changes: Sequence[Change]) -> None:
        # RAM appeared where MMIO pages may be mapped: let them fault in as RAM
        for c in changes:
            if c.new is not None:
                for cpu in self._vcpus:
                    cpu._zap(c.new.as_id, c.new.base_gfn, c.new.end_gfn)

    def guest_tables_restored(self, vm: Vm) -> None:
        # translations Unicorn's TLB holds may come from the tables as they were: flushed
        # before each vCPU's next emu_start (a state load writing CR3 flushes it too)
        for cpu in self._vcpus:
            cpu._tlb_stale = True

    def track_changed(self, vm: Vm, as_id: int, gfn: int, tracked: bool) -> None:
        if not tracked:  # the slow page may become RAM again
            for cpu in self._vcpus:
                cpu._zap(as_id, gfn, gfn + 1)


class UnicornVcpu:
    """The Unicorn half of a `kvmem.Vcpu` (its backend): a `Uc` driven by its own worker
    thread."""

    def __init__(self, engine: UnicornEngine, vcpu: Vcpu) -> None:
        self._engine = engine
        self._vcpu = vcpu
        uc = Uc(UC_ARCH_X86, UC_MODE_64)  # any mode, by the state loaded (uc_state)
        uc_state.configure(uc)
        self._uc = uc
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_PROT, self._on_prot)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_EDGE_GENERATED, self._on_new_block)
        # kvmem's walker fills Unicorn's TLB (see the rules): QEMU's would set accessed and
        # dirty bits by physical stores that no log sees
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self._fill_hook = _raw_tlb_fill_hook(uc, self._on_tlb_fill)
        self._mem_hooks = _RawMemHooks(
            uc, lambda access, gpa, size, value: self._on_read(uc, access, gpa, size, value,
                                                                None),
            lambda access, gpa, size, value: self._on_write(uc, access, gpa, size, value,
                                                            None),
            self._fill_hook[2])
        self._reg = _FastRegs(uc)
        self._page_fault: Interrupt | None = None  # the #PF of the last fill that failed
        self._emulating = False  # inside emu_start: fills are the guest's
        self._tlb_stale = False  # a fill outside emu_start (Unicorn's own lookups) cached
        self._fills = 0  # TLB fills since this worker last dropped the TLB
        self._tlb_entries = _TLB_ENTRIES  # what QEMU's TLB has grown to, as far as known
        # exceptions, INT n and SYSCALL: caught here, delivered by `_deliver`
        self._trap = uc_state.UcTrap(uc)
        # mappings (worker-owned; read by zappers under _lock)
        self._lock = sync.Mutex("unicorn_vcpu.mappings")
        self._zcv = sync.Condition(self._lock)
        # base gfn → npages, kind, hva, writable (see "Regions" in the module notes)
        self._regions: dict[int, tuple[int, str, int, bool]] = {}
        self._sorted: list[int] = []  # the bases, in order
        self._npages = 0  # pages they map
        self._fenced: set[int] = set()
        # gfns faulted in and not yet known mapped: a zap of one is pending all the same
        # (the mirror maps the spte after the MMU gave it, or after a restart)
        self._inflight: set[int] = set()
        self._pending: list[tuple[int, int]] = []
        self._mapped_as = vcpu.as_id
        self._inside = False
        self._epoch = 0
        self._stop_requested = False
        self._kicked = False
        self._restart: Callable[[], None] | None = None
        self._fatal: Exit | None = None
        # handshake with the thread calling run()
        self._cv_lock = sync.Mutex("unicorn_vcpu.handshake")
        self._cv = sync.Condition(self._cv_lock)
        self._worker: threading.Thread | None = None
        self._go = False
        self._closing = False
        self._posted: Exit | None = None
        self._error: BaseException | None = None
        # exits (worker-owned while the guest runs, the caller's between runs)
        self._exits: list[Exit] = []  # posted by hooks during one emu_start, in order
        self._undo: Any = None  # the context before an instruction whose read exited
        # the answers for the reads of a replay, by access: (MMIO, gpa) or (IO, port, the
        # EDI of the element) — Unicorn may restart an instruction (a fault on its store),
        # and the access run again must read the same answer
        self._answers: dict[tuple[Any, ...], bytes] = {}
        self._used: set[tuple[Any, ...]] = set()  # the answers the replay took
        self._read_rdi = 0  # EDI at the last read exit
        self._answer_rip = 0  # RIP of the instruction the answers are for
        self._ins_answer: bytes | None = None  # the answer to a string IN, whole
        self._rip_after: int | None = None  # where a string IN's writeback leaves RIP
        self._exit_pc = -1  # the instruction (pc) of the last exit posted: see _report_rf
        # the state at the last tracked write of a run (KVM writes RFLAGS back there)
        self._rf_mark: tuple[int, bool, int] | None = None
        # exact steps (see _want_exact): the context to run again exactly, whether the next
        # run is that step, the bytes its loads read, the writes it made (by gpa, data)
        self._exact: Any = None
        self._exact_step = False
        self._exact_bytes: dict[int, int] = {}
        self._exact_done: set[tuple[int, bytes]] = set()
        self._exact_in = False  # the step's IN has run
        self._parts_slowed: list[int] = []  # RAM pages the step maps slow (_read_parts_slow)
        self._drop_answers = False  # the step made a tracked write (see _on_write)
        self._after_exits: list[tuple[int, bytes]] = []  # tracked writes behind an exit
        self._last: Exit | None = None
        self._unanswered = False
        self._at_read = False  # the vCPU is at a read's instruction (see _settle)
        self._step = False  # the worker runs one instruction (_settle's)
        # port instructions learned before they run, steps (worker-owned): see "Exits" above
        self._inert = False  # a rewind is pending: hooks do nothing
        self._rewind: Any = None  # the context before a port instruction not yet learned
        self._sites: dict[int, int | None] = {}  # port instruction → next one's hook
        self._ins_sites: dict[int, int] = {}  # a learned INS → its own hook (_at_ins)
        self._site_todo: list[tuple[int, int]] = []  # noted by scans: (pc, next pc)
        self._scans: dict[int, _Scan] = {}  # block pc → its scan (done ones stay)
        self._scan_stop = False  # the run stopped before a new block, to scan it
        self._clean: set[int] = set()  # block pcs whose bytes hold no port opcode
        self._stepping = False  # a one-instruction run (count=1) is running
        self._keep_count = False  # block-wise runs keep Unicorn's count hook (exact steps)
        self._fault_stops = False  # the last _hook_fault's _enter asked for a stop
        self._loaded: tuple[VcpuState, Any] | None = None  # the last state set, as a context
        self._start_template: tuple[VcpuState, Any] | None = None  # `start`'s mode, likewise
        self._busy = False  # the worker is in _run_guest (engine gate lock)
        self._held = False  # ... and waits at the engine's gate

    @property
    def id(self) -> int:
        return self._vcpu.id

    # -- registers ------------------------------------------------------------------------------
    def start(self, entry: int, regs: Regs | None = None) -> None:
        """Also forgets every translated block: code the host wrote into guest memory since
        (a new program at the same gpa) is what runs. Host writes to code while the guest
        runs are not seen until then — a CPU with a software TB cache is not coherent with
        a DMA-like writer, and kvmem's accessors do not tell engines about writes."""
        self._uc.ctl_flush_tb()
        self._forget_exit()
        self._forget_code()
        # the mode is loaded from a context saved the first time (one copy, not the ~45
        # register writes of set_state: ~1 ms through the binding); then the registers
        template = self._start_template
        if template is None:
            state = _start_state(0, Regs())
            uc_state.set_state(self._uc, state)
            self._start_template = (state, self._uc.context_save())
        else:
            uc_state.load_context(self._uc, template[1], template[0])
        r = regs if regs is not None else Regs()
        for name, reg in _REGS:
            self._reg.write(reg, entry if name == "eip" else 0x2 if name == "eflags"
                            else getattr(r, name))

    def get_regs(self) -> Regs:
        m = 0xFFFF_FFFF
        return Regs(**{name: self._uc.reg_read(reg) & m for name, reg in _REGS})

    def set_regs(self, regs: Regs) -> None:
        """At any exit: the guest is never inside an instruction between two runs. At an IN
        or MMIO read the registers are those before the instruction, and setting them drops
        the read: the instruction runs again from them (as on KVM)."""
        self._answers, self._used, self._ins_answer = {}, set(), None
        self._unanswered = self._at_read = False
        self._rip_after = None
        for name, reg in _REGS:
            self._uc.reg_write(reg, getattr(regs, name))

    # -- the whole state ------------------------------------------------------------------------
    def get_state(self) -> VcpuState:
        """The vCPU's whole state (`kvmem.cpu.VcpuState`). At an IN or MMIO read exit the
        instruction is finished first, with the answer given (zeros if none), as on KVM."""
        self._settle()
        return uc_state.get_state(self._uc)

    def set_state(self, state: VcpuState) -> None:
        """Load `state`; a pending read is finished on the old state first (as `get_state`).
        The last state loaded is kept as Unicorn's CPU context: loading that same object
        again (a snapshot's, restored per fuzz input) is one context copy."""
        self._settle()
        loaded = self._loaded
        if loaded is not None and loaded[0] is state:
            uc_state.load_context(self._uc, loaded[1], state)
        else:
            uc_state.set_state(self._uc, state)
            self._loaded = (state, self._uc.context_save())
        self._uc.ctl_flush_tb()
        self._forget_exit()
        self._forget_code()

    # -- page walks ------------------------------------------------------------------------------
    def paging_registers(self) -> tuple[Sregs, int]:
        state = uc_state.get_state(self._uc)
        return state.sregs, state.regs.rflags

    @property
    def paging_features(self) -> PagingFeatures:
        return uc_state.PAGING_FEATURES

    def translate(self, gva: int) -> None:
        """Unicorn offers no translation of its own: kvmem's walker answers."""
        return None

    def _forget_exit(self) -> None:
        self._answers, self._used, self._ins_answer = {}, set(), None
        self._rip_after = None
        self._unanswered = self._at_read = False
        self._last = None

    def _forget_code(self) -> None:
        """Port sites and scans are of the code that was there: the code may be new."""
        for hook in self._sites.values():
            if hook is not None:
                self._uc.hook_del(hook)
        for hook in self._ins_sites.values():
            self._uc.hook_del(hook)
        self._ins_sites = {}
        for scan in self._scans.values():
            if scan.hook is not None:
                self._uc.hook_del(scan.hook)
        self._sites, self._site_todo, self._scans = {}, [], {}
        self._clean = set()

    def _settle(self) -> None:
        """At a read exit, run just its instruction (kvm_state.settle's counterpart), so the
        state read or replaced is the one after it."""
        if not self._at_read:
            return
        if self._unanswered:
            assert self._last is not None
            self._queue_answer(bytes(self._last.answer_size))
        exits = self._string_in_writeback()
        if exits is not None:
            self._at_read = False
            self._answers, self._used = {}, set()
            if exits:
                self._exits[:0] = exits
                raise EngineError(errno.EAGAIN, f"finishing the read made another exit "
                                                f"({exits[0]}); take it with run() first")
            return
        rip = self._reg(X.UC_X86_REG_RIP)
        start = self._run_start()
        self._step = True
        try:
            # a string IN takes one step per element answered
            while True:
                exit_ = self._run_worker()
                if exit_ is not _STEPPED:
                    self._exits.insert(0, exit_)  # the next run() reports it
                    raise EngineError(errno.EAGAIN, f"finishing the read made another exit "
                                                    f"({exit_}); take it with run() first")
                if (len(self._used) >= len(self._answers)
                        or self._reg(X.UC_X86_REG_RIP) != rip):
                    break
            self._report_rf(None, start)
        finally:
            self._step = False
            self._at_read = False
            self._answers, self._used = {}, set()

    # -- run / complete / kick ------------------------------------------------------------------
    def complete(self, data: bytes) -> None:
        if self._last is None or not self._unanswered:
            raise EngineError(errno.EINVAL, "no read exit is waiting for data")
        self._queue_answer(self._last.check_answer(data))

    def _queue_answer(self, data: bytes) -> None:
        """The replay of the instruction that exited takes `data`, one access at a time."""
        last = self._last
        assert last is not None
        self._answer_rip = self._reg(X.UC_X86_REG_RIP)
        if last.kind is ExitKind.MMIO:
            self._answers[(ExitKind.MMIO, last.addr)] = data
        else:
            down = self._reg(X.UC_X86_REG_RFLAGS) & 0x400
            step = -last.size if down else last.size
            for k in range(last.count):
                rdi = (self._read_rdi + k * step) & 0xFFFF_FFFF
                self._answers[(ExitKind.IO, last.addr, rdi)] = data[k * last.size:
                                                                    (k + 1) * last.size]
            self._ins_answer = data
        self._unanswered = False

    def _string_in_writeback(self) -> list[Exit] | None:
        """KVM's emulator ends a REP INS going up (DF clear) with one write of all the
        elements its exit read ahead (OP_MEM_STR): the bytes at EDI as one access, whose
        part without memory is MMIO write exits of up to 8 bytes each (a tracked part:
        tracked writes of up to 8 bytes, as the KVM engine's read-only split makes them);
        EDI and ECX stepped by them all; RIP past the instruction once ECX is 0 — after the
        last of those exits, at the next run (KVM finishes the instruction when it is
        re-entered). Between two
        runs, after the answer to such an exit: do it so (instead of replaying element by
        element) and return its exits; None where it does not apply."""
        data, self._ins_answer = self._ins_answer, None
        uc = self._uc
        if data is None or self._reg(X.UC_X86_REG_RIP) != self._answer_rip:
            return None
        prefixes = self._ins_prefixes()
        if (prefixes is None or not {0xF2, 0xF3} & set(prefixes)
                or self._reg(X.UC_X86_REG_RFLAGS) & 0x400):
            return None
        bits = uc_state.code_bits(uc)
        if 0x67 in prefixes:
            bits = 32 if bits == 64 else 48 - bits
        mask = (1 << bits) - 1
        last = self._last
        assert last is not None
        rdi, rcx = self._reg(X.UC_X86_REG_RDI), self._reg(X.UC_X86_REG_RCX)
        # the destination's pages through the guest's page tables, as KVM's emulator writes
        # them: a write walk each, which sets their accessed/dirty bits (a fault: the
        # elements are replayed one by one instead, and Unicorn's fill raises it)
        parts: list[tuple[int, int, int]] = []  # (linear, gpa, bytes)
        for linear, n in _page_parts(rdi & mask, len(data)):
            gpa = self._write_walk(linear)
            if gpa is None:
                self._ins_answer = data
                return None
            parts.append((linear, gpa, n))
        self._answers, self._used = {}, set()
        exits: list[Exit] = []
        for linear, part, n in parts:
            chunk = data[linear - (rdi & mask):][:n]
            for at in range(0, n, 8):
                if exits and self._tracked(part):  # behind an exit, as in _on_write
                    self._after_exits.append((part + at, chunk[at:at + 8]))
                else:
                    exits += self._write_between_runs(part + at, chunk[at:at + 8])
        left = ((rcx & mask) - last.count) & mask
        uc.reg_write(X.UC_X86_REG_RDI, (rdi & ~mask) | ((rdi + len(data)) & mask))
        uc.reg_write(X.UC_X86_REG_RCX, (rcx & ~mask) | left)
        if left == 0:  # (a state taken before the next run still has RIP at it, as KVM's)
            self._rip_after = self._answer_rip + len(prefixes) + 1
        # KVM goes back to the guest with RF set (the INS finishes when re-entered)
        self._exit_pc = self._pc()
        self._set_rf(True)
        return exits

    def _write_walk(self, linear: int) -> int | None:
        """Between two runs: the gpa a guest write to `linear` reaches, its walk setting the
        accessed/dirty bits (as KVM's emulator's does); None if it would fault."""
        cr0 = self._cr0()
        if not cr0 & _CR0_PG:
            return linear
        try:
            with self._vcpu.loaded():  # the bits' marks go to this vCPU's ring
                got = self._walk(controls_of(self._reg, cr0), linear, "write", self._cpl3())
        except PageFault:
            return None
        return got.gpa | (linear & (PAGE_SIZE - 1))

    def _walk(self, controls: Controls, linear: int, kind: str, user: bool) -> TlbEntry:
        """kvmem's walk of a guest `kind` access ("read", "write", "fetch") to the page of
        `linear` (`paging.walk_for_tlb`: accessed/dirty bits set, marked as the vCPU's
        writes): what the page grants; `PageFault` where the walk faults."""
        ac = bool(self._reg(X.UC_X86_REG_EFLAGS) & _RFLAGS_AC)
        return walk_for_tlb(self._vcpu.read, self._set_bits, controls,
                            linear & ~(PAGE_SIZE - 1), access=kind, user=user, ac=ac,
                            features=uc_state.PAGING_FEATURES)

    def _cpl3(self) -> bool:
        return self._reg(X.UC_X86_REG_CS) & 3 == 3

    def _cr0(self) -> int:
        return self._reg(X.UC_X86_REG_CR0)

    def _write_between_runs(self, gpa: int, data: bytes) -> list[Exit]:
        """A guest write within one page that the caller's thread makes for the guest, the
        vCPU loaded (its dirty ring takes the marks): [] or its MMIO exit."""
        with self._vcpu.loaded():
            try:
                self._vcpu.guest_write(gpa, data)
            except MmioExit:
                return [Exit(ExitKind.MMIO, gpa, len(data), True, data)]
        return []

    def _finish_string_in(self) -> None:
        if self._rip_after is not None:
            self._uc.reg_write(X.UC_X86_REG_RIP, self._rip_after)
            self._rip_after = None
            self._set_rf(False)

    # -- RF -------------------------------------------------------------------------------------
    def _set_rf(self, on: bool) -> None:
        flags = self._reg(X.UC_X86_REG_EFLAGS)
        self._reg.write(X.UC_X86_REG_EFLAGS, flags | _RF if on else flags & ~_RF)

    def _run_start(self) -> tuple[int, bool, int]:
        """What `_report_rf` needs of the state a run starts from: pc, RF, RCX."""
        return (self._pc(), bool(self._reg(X.UC_X86_REG_EFLAGS) & _RF),
                self._reg(X.UC_X86_REG_RCX))

    def _report_rf(self, exit_: Exit | None, start: tuple[int, bool, int] | None) -> None:
        """Set RF as KVM reports it after `exit_` (None: a settling step), for a run that
        started from `start` (None: the exit was queued, nothing ran). See the header."""
        pc = self._pc()
        if exit_ is not None and exit_.kind in (ExitKind.IO, ExitKind.MMIO) and \
                not exit_.reads:
            self._set_rf(pc == self._exit_pc and self._rep_string(pc) is not None)
            return
        if start is None:
            return
        start_pc, start_rf, start_rcx = start
        if pc != start_pc:
            self._set_rf(False)  # an instruction finished
        else:  # (QEMU may have cleared it meanwhile)
            self._set_rf(start_rf or self._rep_reentered(pc, start_rcx))

    def _rep_string(self, pc: int) -> tuple[bytes, int] | None:
        """(prefixes, opcode) of the instruction at `pc` if it is a REP string one."""
        code = self._code(pc)
        i = _prefix_length(code)
        prefixes = code[:i]
        if i < len(code) and code[i] in _STRING_OPCODES and {0xF2, 0xF3} & set(prefixes):
            return prefixes, code[i]
        return None

    def _rep_reentered(self, pc: int, start_rcx: int) -> bool:
        """Did KVM go back to the guest in the REP string instruction at `pc` (with RF set)
        since RCX was `start_rcx`? A REP INS does once the elements it read ahead are
        written; any other after each iteration that leaves the count a multiple of 1024."""
        rep = self._rep_string(pc)
        if rep is None:
            return False
        prefixes, opcode = rep
        bits = uc_state.code_bits(self._uc)
        if 0x67 in prefixes:
            bits = 32 if bits == 64 else 48 - bits
        mask = (1 << bits) - 1
        before = start_rcx & mask
        now = self._reg(X.UC_X86_REG_RCX) & mask
        if now >= before:
            return False  # no iteration done
        if opcode in (0x6C, 0x6D):
            return True
        return now == 0 or (before - 1) // _REP_REENTRY != (now - 1) // _REP_REENTRY

    def run(self) -> Exit:
        if self._unanswered:
            assert self._last is not None
            self._queue_answer(bytes(self._last.answer_size))  # an unanswered read: zeros
        with self._lock:
            kicked, self._kicked = self._kicked, False
        if kicked:
            return Exit(ExitKind.KICKED)
        while not self._exits and self._after_exits:
            self._exits += self._write_between_runs(*self._after_exits.pop(0))
        if not self._exits:
            self._finish_string_in()
            self._exits = self._string_in_writeback() or []
            if not self._exits:
                self._finish_string_in()
        # more exits of one instruction (an MMIO store split at a page) need no guest run
        if self._exits:
            exit_, start = self._exits.pop(0), None
        else:
            start = self._run_start()
            self._rf_mark = None
            exit_ = self._run_worker()
            if self._rf_mark is not None:
                start = self._rf_mark
                start = (start[0], self._rep_string(start[0]) is not None, start[2])
        self._report_rf(exit_, start)
        if not exit_.reads:
            # KVM drops what a string IN read ahead once it exits to userspace meanwhile
            self._answers, self._used, self._ins_answer = {}, set(), None
        self._last = exit_
        self._unanswered = self._at_read = exit_.reads
        return exit_

    def _run_worker(self) -> Exit:
        with self._cv_lock:
            if self._closing:
                raise EngineError(errno.EIO, "vCPU closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._worker_main, daemon=True,
                                                name=f"kvmem-unicorn-vcpu{self.id}")
                self._worker.start()
            self._go = True
            self._cv.notify_all()
            self._cv.wait_until(lambda: self._posted is not None or self._error is not None)
            error, self._error = self._error, None
            exit_, self._posted = self._posted, None
        if error is not None:
            raise EngineError(errno.EIO, f"Unicorn vCPU {self.id} failed: {error!r}") from error
        assert exit_ is not None
        return exit_

    def kick(self) -> None:
        with self._lock:
            self._kicked = True
            self._stop_guest()

    def _stop_guest(self) -> None:
        """Under `_lock`: if the guest may be running, stop it and wait until it is out.
        Unicorn forgets a stop that lands just before emu_start begins: repeat it."""
        if not self._inside:
            return
        self._stop_requested = True
        self._engine.stats["stops"] += 1
        epoch = self._epoch
        while self._inside and self._epoch == epoch:
            self._uc.emu_stop()
            self._zcv.wait_until(lambda: not self._inside or self._epoch != epoch, 0.001)

    def _hold(self) -> None:
        """From the pausing thread, the engine's gate raised: stop the guest if it runs and
        wait until the worker is out of it — at the gate, or not running at all."""
        with self._lock:
            self._stop_guest()
        eng = self._engine
        with eng._gate_lock:
            eng._gate.wait_until(lambda: not self._busy or self._held)

    def _close(self) -> None:
        self.kick()
        with self._cv_lock:
            self._closing = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # -- the worker -----------------------------------------------------------------------------
    def _worker_main(self) -> None:
        # the worker runs only this vCPU: it is loaded here for good, so every mark made on
        # the guest's behalf (faults, slow accesses, tracked writes) goes to its ring
        with self._vcpu.loaded():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cv_lock:
                self._cv.wait_until(lambda: self._go or self._closing)
                if self._closing:
                    return
                self._go = False
            eng = self._engine
            with eng._gate_lock:
                self._busy = True
            try:
                exit_ = self._run_guest()
            except BaseException as e:  # handed to run(), which raises it
                with self._cv_lock:
                    self._error = e
                    self._cv.notify_all()
                continue
            finally:
                with eng._gate_lock:
                    self._busy = False
                    eng._gate.notify_all()
            with self._cv_lock:
                self._posted = exit_
                self._cv.notify_all()

    def _run_guest(self) -> Exit:
        uc = self._uc
        eng = self._engine
        while True:
            if not self._step:  # a settling step is the pausing thread's own
                with eng._gate_lock:
                    if eng._paused:
                        self._held = True
                        eng._gate.notify_all()
                        eng._gate.wait_until(lambda: not eng._paused)
                        self._held = False
            with self._lock:
                if self._kicked:
                    self._kicked = False
                    return Exit(ExitKind.KICKED)
            # KVM checks its requests before every entry: a soft-full ring keeps the vCPU
            # out (a read being finished is not an entry: KVM completes it first)
            if not self._step and self._vcpu.dirty_ring.check_request():
                return Exit(ExitKind.DIRTY_RING_FULL)
            walked = None if self._step or self._exact_step else self._walk_code()
            held = False
            while True:
                with self._lock:
                    # a pause raised after the gate above finds us inside (and stops us)
                    # or is seen here; likewise a zap between the unmaps and this store
                    held = bool(eng._paused) and not self._step
                    if held:
                        break
                    if not self._pending and self._vcpu.as_id == self._mapped_as:
                        self._inflight.clear()  # what they faulted in is mapped, or pending
                        self._inside = True
                        self._epoch += 1
                        self._stop_requested = False
                        break
                self._apply_pending()
            if held:
                continue
            error: UcError | None = None
            rip = self._reg(X.UC_X86_REG_RIP)
            pc = self._pc(rip)
            self._between_runs(pc, walked)
            self._page_fault = None
            exact = self._exact_step
            if exact:
                self._read_parts_slow(pc)
            hooks = exact and self._exact_hooks(pc)
            if self._tlb_stale or self._fills > self._tlb_entries:
                # entries filled outside the guest set no accessed bit; or the TLB is too
                # small for the working set, and QEMU grows it only at a flush (see "Guest
                # virtual memory" in the module notes)
                if self._fills > self._tlb_entries:
                    self._tlb_entries = min(2 * self._tlb_entries, _TLB_ENTRIES_MAX)
                uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
                self._tlb_stale = False
                self._fills = 0
            self._emulating = True
            try:
                if self._step or exact:
                    self._stepping = True
                    self._engine.stats["steps"] += 1
                    uc.emu_start(rip, 0, count=1)
                else:
                    uc.emu_start(rip, 0, count=_FOREVER if self._keep_count else 0)
            except UcError as e:
                error = e
            finally:
                self._emulating = False
                with self._lock:
                    self._inside = False
                    stopped, self._stop_requested = self._stop_requested, False
                    self._zcv.notify_all()
                self._stepping = False
                if hooks:
                    self._mem_hooks.delete()
                    uc.ctl_remove_cache(pc, pc + 1)  # the step's code calls the hooks
            if exact:
                self._keep_count = True
            elif not self._step:
                self._keep_count = self._exact is not None  # stopped for another step
            failed = self._fill_hook[2]
            if failed:  # the TLB fill hook raised: the vCPU's error (run() raises it)
                raise failed.pop(0)
            # an event of an instruction that exited, or that runs again, is not delivered
            event = self._trap.take()
            if self._inert:
                # a port instruction not learned yet: nothing of it was done; rewind it
                # and scan it (the scan's code hook learns it: exact from then on)
                self._inert = False
                self._restart = self._fatal = None
                self._exact, self._undo = None, None
                rewind, self._rewind = self._rewind, None
                self._engine.stats["rewinds"] += 1
                self._restore(rewind)
                self._rescan(self._pc())
                continue
            scan_stop, self._scan_stop = self._scan_stop, False
            self._exact_in = False
            if exact and error is not None and self._restart is not None and \
                    self._undo is None:
                # Unicorn gave the instruction up (a store to a page it must remap): again,
                # exactly; what the hooks did is not done twice (_exact_done)
                redo, self._restart = self._restart, None
                self._engine.stats["restarts"] += 1
                redo()
                continue
            if exact:
                self._exact_step = False
                self._exact_bytes, self._exact_done = {}, set()
                self._read_parts_fast()
                if self._drop_answers and self._undo is None:
                    self._answers, self._used = {}, set()
                self._drop_answers = False
            if self._exact is not None and self._undo is None:
                # a slow page was touched: the instruction again, exactly (_want_exact)
                ctx, self._exact = self._exact, None
                if ctx is _AT_STOP:
                    # QEMU's lazy flags, as flags (a run started from them reads them right)
                    uc.reg_write(X.UC_X86_REG_EFLAGS, self._reg(X.UC_X86_REG_EFLAGS))
                else:
                    self._restore(ctx)
                self._exact_step = True
                self._exits = []
                pending, self._restart = self._restart, None
                if pending is not None:
                    pending()
                continue
            self._exact = None
            if self._undo is not None:
                # a read exited: back to before its instruction, which runs again with the
                # answer (KVM's RIP at an IN or MMIO read is the instruction's own)
                undo, self._undo = self._undo, None
                self._restore(undo)
            elif self._used and not self._step and error is None and (
                    len(self._used) >= len(self._answers)
                    or self._reg(X.UC_X86_REG_RIP) != self._answer_rip):
                self._answers, self._used = {}, set()  # the replay is done
            if self._exits:
                return self._exits.pop(0)
            if self._fatal is not None:
                fatal, self._fatal = self._fatal, None
                return fatal
            if error is not None:
                restart, self._restart = self._restart, None
                if restart is not None:
                    self._engine.stats["restarts"] += 1
                    restart()
                    continue
                if error.errno in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
                    return Exit(ExitKind.INTERNAL_ERROR, detail=f"instruction fetch failed "
                                f"at {self._reg(X.UC_X86_REG_RIP):#x}: {error}")
                if error.errno == UC_ERR_INSN_INVALID:
                    event = uc_state.UcTrap.invalid_opcode()  # RIP at the instruction
                elif error.errno == UC_ERR_EXCEPTION and self._page_fault is not None and \
                        (cr2 := uc_state.fault_address(uc)) & ~(PAGE_SIZE - 1) \
                        == self._page_fault.cr2:
                    # a fill found no translation: the guest's #PF, CR2 the whole address
                    event = dataclasses.replace(self._page_fault, cr2=cr2)
                elif error.errno == UC_ERR_EXCEPTION:
                    return Exit(ExitKind.SHUTDOWN, detail=str(error))
                else:
                    return Exit(ExitKind.INTERNAL_ERROR, detail=str(error))
            if event is not None:
                exit_ = self._deliver(event)
                if exit_ is not None:
                    return exit_
                if self._step:
                    return _STEPPED
                continue
            if self._step:
                return _STEPPED
            if exact:
                continue  # the instruction is done: on, block-wise
            if scan_stop and not stopped:
                continue  # stopped before a new block only to scan it
            if stopped and self._vcpu.dirty_ring.request:
                continue  # a mark filled the ring: the check above decides
            if not stopped or self._halted():
                return Exit(ExitKind.HLT)
            with self._lock:
                if self._kicked:
                    self._kicked = False
                    return Exit(ExitKind.KICKED)
            # a zap's stop: unmap what is pending and go on

    # -- exact stops ----------------------------------------------------------------------------
    def _learn(self, pc: int, end: int) -> None:
        """The port instruction at `pc` (up to `end`) gets a code hook on the instruction
        after it, so a stop its port hook makes lands there (at a block start for a REP
        element)."""
        if self._sites.get(pc) is not None:
            return
        self._sites[pc] = self._uc.hook_add(UC_HOOK_CODE, _nothing_at, None, end, end)
        if self._opcode(pc) in (0x6C, 0x6D) and pc not in self._ins_sites:
            self._ins_sites[pc] = self._uc.hook_add(UC_HOOK_CODE, self._at_ins, None, pc, pc)
        self._uc.ctl_remove_cache(pc, end + 1)

    def _rescan(self, pc: int) -> None:
        """Scan the instruction at `pc` again (a port instruction met unlearned)."""
        old = self._scans.pop(pc, None)
        if old is not None and old.hook is not None:
            self._uc.hook_del(old.hook)
        self._clean.discard(pc)
        self._scans[pc] = _Scan(1, 15)
        self._sites[pc] = None  # a port instruction: exact from now (the scan hook follows)
        self._engine.stats["scans"] += 1

    def _walk_code(self) -> tuple[int, int] | None:
        """Paging on, before a run from a block not known yet: translate its code (kvmem's
        walker, no bit set) — its page and the next, where a block may go on — and map its
        page, so that `_between_runs` can have Unicorn translate the block: each fill that
        makes finds a translation (a fill refused outside emu_start has nowhere to go).
        (pc, its gfn), or None where paging is off, the block is known, a walk faults or
        the page has no RAM. Not inside the guest (`_inside`): it takes the MMU's locks."""
        cr0 = self._reg(X.UC_X86_REG_CR0)
        if not cr0 & _CR0_PG:
            return None
        pc = self._pc()
        if pc in self._scans or pc in self._clean:
            return None
        controls = controls_of(self._reg, cr0)
        user = self._reg(X.UC_X86_REG_CS) & 3 == 3
        try:
            gfn, _ = (translate_gva(self._vcpu.read, controls, gva, fetch=True, user=user,
                                    features=uc_state.PAGING_FEATURES) >> PAGE_SHIFT
                      for gva in (pc, (pc | (PAGE_SIZE - 1)) + 1))
            if self._base_of(gfn) is None:
                self._remap(_spte_pages(self._vcpu.fault_in(gfn << PAGE_SHIFT, False)))
        except (PageFault, KvmError, MemoryFault, MmioExit, TrackedWrite):
            return None
        return pc, gfn

    def _between_runs(self, rip: int, walked: tuple[int, int] | None = None) -> None:
        """Hook what scans noted and the blocks to scan; end the scans that are done."""
        uc = self._uc
        if self._reg(X.UC_X86_REG_CR0) & _CR0_PG:
            ready = (walked is not None and walked[0] == rip
                     and self._base_of(walked[1]) is not None)
        else:
            ready = self._base_of(rip >> PAGE_SHIFT) is not None
        if rip not in self._scans and rip not in self._clean and ready:
            # The edge hook does not see the first block of a run while Unicorn has not
            # yet left a block the ordinary way (its record of the last block is set only
            # then): look at the block at RIP first. With paging on, only where its code
            # translates (`_walk_code`): a fill refused inside Unicorn's control call has
            # nowhere to go.
            self._inert = True  # nothing is faulted in while Unicorn translates it
            try:
                pc, icount, size = uc.ctl_request_cache(rip)
                self._note_block(pc, icount, size)
            except UcError:
                pass
            finally:
                self._inert = False
                self._restart = None
        todo, self._site_todo = self._site_todo, []
        for site, end in todo:
            self._learn(site, end)
        for pc, scan in self._scans.items():
            if scan.hook is None and not scan.done:
                scan.hook = uc.hook_add(UC_HOOK_CODE, self._on_scan, scan, pc,
                                        pc + scan.size - 1)
                uc.ctl_remove_cache(pc, pc + scan.size)
            elif scan.hook is not None and scan.done:
                uc.hook_del(scan.hook)  # Unicorn drops the blocks it instrumented
                scan.hook = None

    def _note_block(self, pc: int, icount: int, size: int) -> bool:
        """A new block: True (and a scan to start) if its bytes may hold a port opcode."""
        if pc in self._scans or pc in self._clean:
            return False
        if not _PORT_OPCODES.intersection(self._code(pc, size)):
            self._clean.add(pc)
            return False
        self._scans[pc] = _Scan(icount, size)
        self._engine.stats["scans"] += 1
        return True

    def _on_new_block(self, uc: Uc, cur: Any, prev: Any, data: Any) -> None:
        """UC_HOOK_EDGE_GENERATED: a block was translated and is about to run. If it may
        hold a port instruction, stop before it (Unicorn checks at every block start)."""
        if not self._stepping and self._note_block(cur.pc, cur.icount, cur.size):
            self._scan_stop = True
            uc.emu_stop()

    def _on_scan(self, uc: Uc, address: int, size: int, scan: _Scan) -> None:
        """A scanned block's code hook, before each of its instructions: note port ones."""
        scan.seen.add(address)
        if len(scan.seen) >= scan.icount:
            scan.done = True
        if (self._sites.get(address, 0) is None  # known (a rewind's), length unknown
                or (address not in self._sites and self._opcode(address) in _PORT_OPCODES)):
            self._sites[address] = None  # exact from now: the scan hook follows it
            self._site_todo.append((address, address + size))
        if address not in self._ins_sites and self._opcode(address) in (0x6C, 0x6D):
            self._at_ins(uc, address, size, None)  # what its own hook will do once learned

    def _pc(self, rip: int | None = None) -> int:
        """The linear address of the instruction at CS:RIP (`rip` if read already) — what
        code hooks and blocks name (CS's base is 0 in every mode kvmem starts guests in
        but real mode, where it is the selector times 16)."""
        if rip is None:
            rip = self._reg(X.UC_X86_REG_RIP)
        if self._reg(X.UC_X86_REG_CR0) & _CR0_PE:
            return rip
        return ((self._reg(X.UC_X86_REG_CS) & 0xFFFF) << 4) + (rip & 0xFFFF)

    def _code(self, rip: int, size: int = 15) -> bytes:
        """Up to `size` code bytes at `rip` (a block's, or an instruction's: not past its
        page, which may be the last one mapped)."""
        try:
            return bytes(self._uc.mem_read(rip, size if size != 15 else
                                           min(15, PAGE_SIZE - rip % PAGE_SIZE)))
        except UcError:
            return b""

    def _opcode(self, rip: int) -> int:
        """The first opcode byte of the instruction at `rip` (-1 if unreadable)."""
        code = self._code(rip)
        i = _prefix_length(code)
        return code[i] if i < len(code) else -1

    def _port_exact(self) -> bool:
        """At a port hook (EIP is the instruction's): may it stop exactly? If not, rewind it
        and learn its site."""
        if self._stepping or self._pc() in self._sites:
            return True
        self._inert = True
        self._rewind = self._save()
        self._uc.emu_stop()
        return False

    # -- events: what Unicorn leaves to its user --------------------------------------------------
    def _deliver(self, event: Event) -> Exit | None:
        """Between two emu_starts: take the guest to the handler of `event` as the CPU does
        (`kvmem.cpu.events`, through the vCPU's accessors), or say why it cannot go on."""
        uc = self._uc
        self._engine.stats["events"] += 1
        try:
            state = events.deliver(uc_state.get_state(uc), event, self._vcpu.read,
                                   self._vcpu.write, features=uc_state.PAGING_FEATURES)
        except events.TripleFault as e:
            return Exit(ExitKind.SHUTDOWN, detail=str(e))
        except events.UnmodelledEvent as e:
            return Exit(ExitKind.INTERNAL_ERROR, detail=f"cannot deliver {event}: {e}")
        uc_state.set_state(uc, state)
        return None

    def _halted(self) -> bool:
        """Unicorn returns after HLT as after a stop: look at the instruction before EIP
        (a stop landing right after an instruction ending in byte f4 reads as a halt)."""
        eip = self._reg(X.UC_X86_REG_RIP)
        try:
            return bytes(self._uc.mem_read(eip - 1, 1)) == b"\xf4"
        except UcError:
            return False

    # -- mappings -------------------------------------------------------------------------------
    def _zap(self, as_id: int, start: int, end: int) -> None:
        """From any thread (the MMU lock held): drop [start, end) from this vCPU's mappings
        before returning, as far as a running guest is concerned."""
        with self._lock:
            if as_id != self._mapped_as or not (
                    self._overlaps(start, end) or any(start <= g < end for g in self._inflight)):
                return
            self._pending.append((start, end))
            self._stop_guest()

    def _base_of(self, gfn: int) -> int | None:
        """The base gfn of the region that maps `gfn`, None if none does."""
        i = bisect.bisect_right(self._sorted, gfn) - 1
        if i < 0:
            return None
        base = self._sorted[i]
        return base if gfn < base + self._regions[base][0] else None

    def _overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._sorted, end) - 1
        if i < 0:
            return False
        base = self._sorted[i]
        return base >= start or base + self._regions[base][0] > start

    def _bases(self, start: int, end: int) -> list[int]:
        first = self._base_of(start)
        i = bisect.bisect_left(self._sorted, start if first is None else first)
        j = bisect.bisect_left(self._sorted, end)
        return self._sorted[i:j]

    def _apply_pending(self) -> None:
        """Between two emu_starts: unmap pending ranges; follow an SMM switch. A page whose
        spte is still there, over the same host page, only changes permissions (a dirty-log
        write protection): its region keeps its extent where it can, and is protected, not
        unmapped and mapped again (see "Regions")."""
        with self._lock:
            pending, self._pending = self._pending, []
            if self._vcpu.as_id != self._mapped_as:
                self._mapped_as = self._vcpu.as_id
                pending = [(b, b + self._regions[b][0]) for b in self._sorted]
                switched = True
            else:
                switched = False
        mmu = self._engine.vm.mmu
        changes: dict[int, _PageMap | None] = {}
        for start, end in pending:
            for base in self._bases(start, end):
                npages, kind, hva, _ = self._regions[base]
                for g in range(max(base, start), min(base + npages, end)):
                    spte = None if switched or kind != _RAM else mmu.spte(self._mapped_as, g)
                    at = hva + ((g - base) << PAGE_SHIFT)
                    if (spte is not None and spte.frame.hva + ((g - spte.gfn) << PAGE_SHIFT)
                            == at and spte.current(g)):
                        changes[g] = (_RAM, at, spte.writable)
                    else:
                        changes[g] = None
        self._remap(changes)

    def _remap(self, changes: Mapping[int, _PageMap | None]) -> None:
        """Between two emu_starts: map each gfn of `changes` as it says (None: unmapped),
        re-cutting the regions of its chunk into maximal runs of RAM pages over contiguous
        host memory with one protection (a slow page is a region of its own). Only the
        regions that differ are unmapped and mapped; one whose extent stays is protected."""
        uc = self._uc
        stats = self._engine.stats
        if len(changes) == 1 and self._npages < _MERGE_PAGES:
            # a region per page: one page's protection change is one mem_protect
            ((g, page),) = changes.items()
            region = self._regions.get(g)
            if page is not None and region is not None and region[0] == 1 \
                    and region[1:3] == page[:2]:
                if region[3] != page[2] or g in self._fenced:
                    with self._lock:
                        self._regions[g] = (1, *page)
                        self._fenced.discard(g)
                    uc.mem_protect(g << PAGE_SHIFT, PAGE_SIZE, _perms(page[2]))
                return
        for chunk, runs in _runs(changes).items():
            # the regions the runs touch, and their neighbours (merges are of neighbours)
            lo = max(chunk * _CHUNK, runs[0][0] - 1)
            hi = min((chunk + 1) * _CHUNK, runs[-1][1] + 1)
            old = {b: self._regions[b] for b in self._bases(lo, hi)}
            segs = [(b, *r) for b, r in old.items()]
            merge = max(self._npages, len(changes)) >= _MERGE_PAGES
            for start, end, page in runs:
                cut: list[_Region] = []
                for b, n, kind, hva, w in segs:
                    if b + n <= start or b >= end:
                        cut.append((b, n, kind, hva, w))
                        continue
                    if b < start:
                        cut.append((b, start - b, kind, hva, w))
                    if b + n > end:
                        cut.append((end, b + n - end, kind,
                                    hva + ((end - b) << PAGE_SHIFT) if kind == _RAM else 0, w))
                if page is not None:
                    if page[0] == _RAM and merge:
                        cut.append((start, end - start, *page))
                    elif page[0] == _RAM:
                        cut += [(g, 1, _RAM, page[1] + ((g - start) << PAGE_SHIFT), page[2])
                                for g in range(start, end)]
                    else:
                        cut += [(g, 1, *page) for g in range(start, end)]
                segs = sorted(cut)
            new: dict[int, tuple[int, str, int, bool]] = {}
            last: _Region | None = None
            for seg in segs:
                if (merge and last is not None and seg[2] == last[2] == _RAM and seg[4] == last[4]
                        and seg[0] == last[0] + last[1]
                        and seg[3] == last[3] + (last[1] << PAGE_SHIFT)):
                    last = (last[0], last[1] + seg[1], _RAM, last[3], last[4])
                else:
                    if last is not None:
                        new[last[0]] = last[1:]
                    last = seg
            if last is not None:
                new[last[0]] = last[1:]
            unmap: list[int] = []
            protect: list[tuple[int, bool]] = []
            for b, (n, kind, hva, w) in old.items():
                want = new.get(b)
                if want is None or want[:3] != (n, kind, hva):
                    unmap.append(b)
                    continue
                if want[3] != w or b in self._fenced:
                    protect.append((b, want[3]))
                del new[b]
            with self._lock:
                for b in unmap:
                    del self._regions[b]
                    self._fenced.discard(b)
                for b, w in protect:
                    self._regions[b] = (*self._regions[b][:3], w)
                    self._fenced.discard(b)
                self._regions.update(new)
                self._npages += (sum(r[0] for r in new.values())
                                 - sum(old[b][0] for b in unmap))
                if unmap or new:
                    self._sorted = sorted(self._regions)
            for b in unmap:
                uc.mem_unmap(b << PAGE_SHIFT, old[b][0] << PAGE_SHIFT)
                stats["unmaps"] += 1
            for b, w in protect:
                uc.mem_protect(b << PAGE_SHIFT, old[b][0] << PAGE_SHIFT, _perms(w))
            for start, end, page in runs:
                # a gpa mapped again may be other host memory: drop code translated from it
                # (a page merged with its neighbours maps the same memory again)
                for b, (n, kind, hva, _) in old.items():
                    s, e = max(b, start), min(b + n, end)
                    if s < e and (page is None or page[0] != kind or (kind == _RAM and
                                  page[1] + ((s - start) << PAGE_SHIFT)
                                  != hva + ((s - b) << PAGE_SHIFT))):
                        uc.ctl_remove_cache(s << PAGE_SHIFT, e << PAGE_SHIFT)
            for b, (n, kind, hva, w) in new.items():
                if kind == _RAM:
                    uc.mem_map_ptr(b << PAGE_SHIFT, n << PAGE_SHIFT, _perms(w), hva)
                else:
                    self._mmio_map(b)
                stats["maps"] += 1

    def _map_in_hook(self, pages: dict[int, _PageMap]) -> bool:
        """From a memory hook, for an unmapped page: map `pages` (one spte's, or a slow
        page) as one region if that needs no other region changed — none of them mapped,
        no neighbour in the chunk to merge with. False if not: `_remap` must do it, between
        two emu_starts."""
        lo, hi = min(pages), max(pages) + 1
        if lo // _CHUNK != (hi - 1) // _CHUNK or self._overlaps(lo, hi):
            return False
        kind, hva, w = pages[lo]
        if kind == _RAM and self._npages >= _MERGE_PAGES:
            for g, at in ((lo - 1, hva - PAGE_SIZE), (hi, hva + ((hi - lo) << PAGE_SHIFT))):
                b = self._base_of(g) if g // _CHUNK == lo // _CHUNK else None
                if b is not None:
                    _, k, bhva, bw = self._regions[b]
                    if k == _RAM and bw == w and bhva + ((g - b) << PAGE_SHIFT) == at:
                        return False
        if kind == _RAM:
            self._uc.mem_map_ptr(lo << PAGE_SHIFT, (hi - lo) << PAGE_SHIFT, _perms(w), hva)
        else:
            self._mmio_map(lo)
        with self._lock:
            self._regions[lo] = (hi - lo, kind, hva, w)
            bisect.insort(self._sorted, lo)
            self._npages += hi - lo
        self._engine.stats["maps"] += 1
        return True

    def _mmio_map(self, gfn: int) -> None:
        """Map the page as Unicorn MMIO: every access takes kvmem's vCPU memory path."""
        page = gfn << PAGE_SHIFT

        def read(uc: Uc, offset: int, size: int, data: Any) -> int:
            return self._slow_read(page + offset, size)

        def write(uc: Uc, offset: int, size: int, value: int, data: Any) -> None:
            self._slow_write(page + offset, size, value)

        self._uc.mmio_map(page, PAGE_SIZE, read, None, write, None)

    # -- hooks: leaving and re-entering the guest -----------------------------------------------
    def _leave(self) -> None:
        with self._lock:
            self._inside = False
            self._zcv.notify_all()

    def _enter(self) -> bool:
        """Back into the guest from a hook. Regions zapped meanwhile are fenced (PROT_NONE)
        and the guest stops at the end of its block, as it does when a kick came meanwhile
        (the kicker saw the guest out and did not wait). True if the guest must stop."""
        with self._lock:
            self._inside = True
            self._epoch += 1
            bases = [b for s, e in self._pending for b in self._bases(s, e)]
            fence = [b for b in bases if self._regions[b][1] == _RAM and b not in self._fenced]
            self._fenced.update(fence)
            stop = (bool(bases) or self._kicked or self._vcpu.dirty_ring.request
                    or bool(self._engine._paused))
            if stop:
                self._stop_requested = True
        for b in fence:
            self._uc.mem_protect(b << PAGE_SHIFT, self._regions[b][0] << PAGE_SHIFT,
                                 UC_PROT_NONE)
        if stop and not self._stepping:
            self._uc.emu_stop()
        return stop

    def _pending_covers(self, gfn: int) -> bool:
        with self._lock:
            return any(s <= gfn < e for s, e in self._pending)

    def _hook_fault(self, address: int, size: int, write: bool) -> Spte | None:
        """The fault path for a memory hook, outside the guest: the spte to map, None for
        the slow path (MMIO, read-only, tracked), or None with `_fatal` set."""
        with self._lock:
            self._inflight.add(address >> PAGE_SHIFT)
        self._leave()
        try:
            self._engine.stats["faults"] += 1
            return self._vcpu.fault_in(address, write)
        except (MmioExit, TrackedWrite):
            return None
        except MemoryFault as e:
            self._fatal = Exit(ExitKind.INTERNAL_ERROR, address, size, write, detail=str(e))
            return None
        finally:
            self._fault_stops = self._enter()

    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry: Any, data: Any) -> bool:
        """UC_HOOK_TLB_FILL (Unicorn's virtual TLB): the page at linear address `vaddr` for
        an access of kind `access`, by the CPL running. kvmem's walker translates it over
        the vCPU's accessors and sets accessed/dirty bits as KVM's walker does (marked dirty
        like every write kvmem makes for a vCPU); the entry grants what the walk allows
        that CPL, a write only once the leaf is dirty. A walk that fails leaves its #PF in
        `_page_fault` and refuses: Unicorn then stops with UC_ERR_EXCEPTION, RIP at the
        instruction, and the worker delivers the #PF."""
        self._engine.stats["tlb_fills"] += 1
        self._fills += 1
        cr0 = self._cr0()
        if not cr0 & _CR0_PG:
            if access == UC_MEM_WRITE and self._emulating and \
                    not self._store_gate(vaddr >> PAGE_SHIFT):
                return False
            entry.paddr = vaddr
            # a store to a page not writable RAM fills again, for the store gate
            entry.perms = UC_PROT_ALL if access == UC_MEM_WRITE or \
                self._writable_ram(vaddr >> PAGE_SHIFT) else UC_PROT_READ | UC_PROT_EXEC
            return True
        if not self._emulating:
            # Unicorn's own lookup of a code address (a hook removed, a cache dropped), not
            # a guest access: translate, set no bit, fault nothing; and flush the entry
            # before the guest runs, so that its first access walks and sets them
            self._tlb_stale = True
            try:
                gpa = translate_gva(self._vcpu.read, controls_of(self._reg), vaddr, fetch=True,
                                    features=uc_state.PAGING_FEATURES)
            except PageFault:
                return False
            entry.paddr, entry.perms = gpa & ~(PAGE_SIZE - 1), UC_PROT_ALL
            return True
        kind = "write" if access == UC_MEM_WRITE else "fetch" if access == UC_MEM_FETCH \
            else "read"
        controls = controls_of(self._reg, cr0)
        user = self._cpl3()
        if user and self._system_table(vaddr) and self._loads_descriptor(controls):
            # QEMU reads descriptors with supervisor rights at any CPL (its kernel MMU
            # index), and the hook is not told which index asks: a page of the GDT, LDT or
            # TSS, filled for an instruction that loads a descriptor, is the supervisor's
            user = False
        self._leave()
        try:
            got = self._walk(controls, vaddr, kind, user)
        except PageFault as e:
            # CR2 is the whole address, which the hook is not told: taken at the stop
            self._page_fault = Interrupt(_PF, e.error_code, cr2=vaddr)
            return False
        finally:
            if self._enter():
                self._restart = _nothing  # a stop: the instruction again, after it
        if self._restart is _nothing:
            return False
        if kind == "write" and not self._store_gate(got.gpa >> PAGE_SHIFT):
            return False
        entry.paddr = got.gpa
        # a store to a page not writable RAM fills again, for the store gate
        write = got.write and (kind == "write" or self._writable_ram(got.gpa >> PAGE_SHIFT))
        entry.perms = (UC_PROT_READ if got.read else 0) | (UC_PROT_WRITE if write else 0) \
            | (UC_PROT_EXEC if got.fetch else 0)
        return True

    def _store_gate(self, gfn: int) -> bool:
        """A fill for a store to `gfn`, inside the guest: False if the store may not go on
        block-wise — its page is slow, and the instruction runs again exactly (_want_exact)
        with nothing of it done. Unicorn fills the page a store crosses into before it
        stores a byte, so a store from RAM into a slow page leaves its RAM part alone (the
        slow page's own hook would see the store only after the RAM part was written, and
        an overlapping string move would then read it back). In an exact step the store is
        granted; the step's memory hooks, removed after it, flush Unicorn's TLB, so the
        next store there is gated again (test_a_move_into_no_memory_sends_its_source_as_it_
        was, warm). A store to a RAM page mapped read-only takes its write fault here, before
        any byte is stored (difftest seed 13013, long64)."""
        if self._exact_step or self._undo is not None or self._inert:
            return True
        base = self._base_of(gfn)
        fenced = False
        if base is not None:
            _, kind, _, writable = self._regions[base]
            fenced = base in self._fenced
            if kind == _RAM and writable and not fenced:
                return True
            slow = kind == _SLOW
        else:  # not mapped yet: what the mirror would map (`_tracked` asks out of the guest)
            slot = self._vcpu.slot_set().search(gfn)
            slow = slot is None or slot.readonly or self._tracked(gfn << PAGE_SHIFT)
        if slow:
            self._want_exact()
            return False
        if self._ins_prefixes() is not None:
            return True  # QEMU's INS zero store: the prot and unmapped hooks handle it
        if fenced:
            self._restart = _nothing  # a zap is pending: the instruction after it
            return False
        # RAM not mapped writable (not yet, or write-protected by a harvest, a CLEAR,
        # logging turned on): its write fault comes first too — else Unicorn would store
        # the part before the page, fault in the prot or unmapped hook, and run the
        # instruction again, reading back what it stored (an overlapping MOVS)
        self._write_fault(gfn << PAGE_SHIFT, 1)
        return False

    def _writable_ram(self, gfn: int) -> bool:
        """Whether the mirror maps `gfn` as writable RAM (a store there goes straight on)."""
        base = self._base_of(gfn)
        return base is not None and base not in self._fenced and \
            self._regions[base][1] == _RAM and self._regions[base][3]

    def _set_bits(self, gpa: int, entry: bytes) -> None:
        """A walk's accessed/dirty bits, written as KVM writes them: a table in a read-only
        slot keeps its bits (KVM skips a table it cannot write)."""
        with contextlib.suppress(KvmError):
            self._vcpu.write(gpa, entry)

    def _loads_descriptor(self, controls: Controls) -> bool:
        """Whether the instruction at CS:RIP reads descriptors: a segment register load (mov
        or pop to one, LDS/LES/LSS/LFS/LGS), a far jump, call or return, IRET, LAR, LSL,
        VERR or VERW. (INT n, exceptions and SYSCALL are kvmem's to deliver.)"""
        rip = self._pc()
        try:
            gpa = translate_gva(self._vcpu.read, controls, rip, fetch=True, user=True,
                                features=uc_state.PAGING_FEATURES)
            code = self._vcpu.read(gpa, min(15, PAGE_SIZE - gpa % PAGE_SIZE))
        except (PageFault, KvmError, MmioExit, MemoryFault, ValueError):
            return False
        i = _prefix_length(code)
        op = code[i:i + 3]
        if not op:
            return False
        if op[0] in (0x8E, 0x07, 0x17, 0x1F, 0xC4, 0xC5, 0xEA, 0x9A, 0xCA, 0xCB, 0xCF):
            return True
        if op[0] == 0xFF and len(op) > 1:
            return (op[1] >> 3) & 7 in (3, 5)  # call / jmp far, indirect
        if op[0] == 0x0F and len(op) > 1:
            if op[1] in (0xA1, 0xA9, 0xB2, 0xB4, 0xB5, 0x02, 0x03):
                return True
            return op[1] == 0x00 and len(op) > 2 and (op[2] >> 3) & 7 in (4, 5)  # VERR/W
        return False

    def _system_table(self, vaddr: int) -> bool:
        """Whether the page at `vaddr` holds part of the GDT, the LDT or the TSS."""
        uc = self._uc
        for reg in (X.UC_X86_REG_GDTR, X.UC_X86_REG_LDTR, X.UC_X86_REG_TR):
            t = uc.reg_read(reg)
            base, limit = int(t[1]), int(t[2])
            if reg != X.UC_X86_REG_GDTR and not t[0] & ~3:
                continue  # no LDT / TR loaded
            if base <= vaddr + PAGE_SIZE - 1 and vaddr <= base + limit:
                return True
        return False

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int,
                     data: Any) -> bool:
        if self._inert:
            return False
        gfn = address >> PAGE_SHIFT
        fetch = access == UC_MEM_FETCH_UNMAPPED
        write = access == UC_MEM_WRITE_UNMAPPED
        if write and self._ins_dummy():
            return False
        spte = self._hook_fault(address, size, write)
        if self._fatal is not None or (spte is None and fetch):
            return False
        if self._pending_covers(gfn):
            self._restart = _nothing  # zapped while we faulted: unmap, then try again
            return False
        pages = {gfn: _SLOW_PAGE} if spte is None else _spte_pages(spte)
        if not self._map_in_hook(pages):
            # merged into a neighbour's region, which the instruction or its block may use:
            # Unicorn unmaps and maps it again between two emu_starts, and the access reruns
            self._restart = lambda: self._remap(pages)
            return False
        if fetch or self._fault_stops:
            # fetch: the block being translated keeps wrong EIPs for its instructions (a
            # stop or a hook would see the EIP of an earlier one): translate it again.
            # A stop: it would land after this access, and the instruction would run
            # again from its start (a store done twice): run it after the stop instead.
            self._restart = _nothing
            return False
        return True

    def _ins_dummy(self) -> bool:
        """QEMU's INS stores a zero at EDI before its IN (to fault early); KVM writes
        nothing before the IN is answered. A write fault of that store, with no answer for
        the element yet, posts the IN's exit instead: the page is not faulted in, nothing
        is written or marked dirty. (On a page already writable, a learned INS posts its
        exit before it runs: `_at_ins`.) True if so: the hook returns False."""
        if self._undo is not None or self._exact is not None or self._exact_in:
            return False
        return self._ins_exit()

    def _at_ins(self, uc: Uc, address: int, size: int, data: Any) -> None:
        """A learned INS's code hook, before each of its runs (each REP element): with no
        answer for the element, post its IN exit and stop before it, so that QEMU's zero
        store never reaches a page Unicorn maps writable (KVM writes nothing at EDI until
        the answer; a host reading the element at the exit reads what was there)."""
        if (self._undo is not None or self._exact is not None or self._inert
                or self._stepping or self._exits):
            return
        rep = self._rep_string(address)
        if rep is not None:
            bits = uc_state.code_bits(uc)
            if 0x67 in rep[0]:
                bits = 32 if bits == 64 else 48 - bits
            if not self._reg(X.UC_X86_REG_RCX) & ((1 << bits) - 1):
                return  # no element: the instruction does nothing
        self._ins_exit()

    def _ins_exit(self) -> bool:
        """Post the IN exit of the INS at RIP for the element at EDI, unless it is not an
        INS or the element has its answer (the replay). True if posted."""
        prefixes = self._ins_prefixes()
        if prefixes is None:
            return False
        uc = self._uc
        port = self._reg(X.UC_X86_REG_RDX) & 0xFFFF
        rdi = self._reg(X.UC_X86_REG_RDI) & 0xFFFF_FFFF
        if self._answers.get((ExitKind.IO, port, rdi)) is not None and \
                self._reg(X.UC_X86_REG_RIP) == self._answer_rip:
            return False  # the replay: the hooks of the IN take the answer
        code = bytes(uc.mem_read(self._reg(X.UC_X86_REG_RIP) + len(prefixes), 1))
        size = 1 if code == b"\x6c" else 2 if 0x66 in prefixes else 4
        self._read_rdi = rdi
        self._post_read(Exit(ExitKind.IO, port, size, False,
                             count=self._string_in_count(size)))
        return True

    def _on_prot(self, uc: Uc, access: int, address: int, size: int, value: int,
                 data: Any) -> bool:
        if self._inert:
            return False
        gfn = address >> PAGE_SHIFT
        base = self._base_of(gfn)
        if base is None or base in self._fenced or access != UC_MEM_WRITE_PROT:
            # a fenced region, or a read of PROT_NONE: unmap what is pending and retry
            self._restart = _nothing
            return False
        if self._ins_dummy():
            return False
        self._write_fault(address, size)
        return False

    def _write_fault(self, address: int, size: int) -> None:
        """A guest store to a RAM page the mirror maps read-only (a harvest, a CLEAR,
        logging turned on): kvmem's write fault, and the page remapped by `_restart`
        between two emu_starts, after which the instruction runs again. Not from the hook:
        the store that called it goes on with the TLB entry Unicorn read for it, which
        drops writes to a read-only page, whatever the page's protection is now. Remapped
        (writable, the slow path if the page must take it, unmapped if the spte stayed
        read-only), the page takes it again."""
        gfn = address >> PAGE_SHIFT
        spte = self._hook_fault(address, size, True)
        if self._fatal is not None:
            return
        if self._pending_covers(gfn):
            self._restart = _nothing
            return
        pages: Mapping[int, _PageMap | None] = {gfn: None}
        if spte is None:
            pages = {gfn: _SLOW_PAGE}
        elif spte.writable:
            pages = _spte_pages(spte)
        self._restart = lambda: self._remap(pages)

    # -- hooks: exits ---------------------------------------------------------------------------
    # An exit leaves emu_start: the hook posts it and stops Unicorn, which stops right after
    # the instruction (count mode). A write is done by then, as KVM's is (RIP past it). A
    # read cannot wait for its answer there, so the hook reads zeros, saves the context
    # from before the instruction, and `_run_guest` restores it after the stop: the vCPU
    # is at the instruction, as KVM's is, and runs it again with the answers queued by
    # `complete`. After a read has exited, the rest of its instruction is discarded.

    def _save(self) -> tuple[Any, int]:
        """The context, from a hook. Inside a run QEMU keeps DF and the arithmetic flags
        outside the EFLAGS its context holds (and recomputes DF from that EFLAGS when a run
        starts): EFLAGS is read (computed) with it and written back by `_restore`."""
        return self._uc.context_save(), self._reg(X.UC_X86_REG_EFLAGS)

    def _restore(self, saved: tuple[Any, int]) -> None:
        self._uc.context_restore(saved[0])
        self._uc.reg_write(X.UC_X86_REG_EFLAGS, saved[1])

    def _post(self, exit_: Exit) -> None:
        self._exit_pc = self._pc()
        self._exits.append(exit_)
        self._uc.emu_stop()

    def _post_read(self, exit_: Exit) -> None:
        if not self._exits:
            self._undo = self._save()
        self._post(exit_)

    def _replayed(self, *key: Any) -> bytes | None:
        """The answer for an access of the replayed instruction; answers left when another
        instruction reads are stale (the replay is over) and go."""
        if not self._answers:
            return None
        if self._reg(X.UC_X86_REG_RIP) != self._answer_rip:
            self._answers, self._used = {}, set()
            return None
        answer = self._answers.get(key)
        if answer is not None:
            self._used.add(key)
        return answer

    # -- exact steps ----------------------------------------------------------------------------
    # Unicorn hands a slow page's callbacks what its softmmu makes of an access, not the
    # access: an unaligned load as the two aligned words around it, an unaligned or
    # page-crossing store as single bytes. Only its memory hooks see each load and store
    # whole (gpa and size, once per access) — and while any is installed every access of
    # every block takes the slow path. So a slow page's callback outside an exact step does
    # nothing but ask for one (`_want_exact`): the run stops, the worker goes back to the
    # context from before the instruction and runs just it again with the hooks on
    # (`_exact_hooks`). They do each access as KVM's emulator does — page by page, RAM
    # read or written, a part without memory an MMIO exit (a read: stop, answer, replay; a
    # write: queued, the instruction finishes), a tracked part one tracked write — and the
    # callbacks then serve the step's reads from `_exact_bytes` and drop its writes.

    def _want_exact(self) -> None:
        if self._exact is None:
            # nothing of the instruction done yet. Block-wise, EIP inside a hook is stale,
            # but Unicorn stops right after this access with EIP at the instruction: the
            # worker takes the state there (_AT_STOP); in a one-instruction run the context
            # saved here is the instruction's
            self._exact = self._save() if self._stepping else _AT_STOP
            self._uc.emu_stop()

    def _read_parts_slow(self, pc: int) -> None:
        """Before the exact step of a replay: map each page of a RAM part its first run read
        (`_on_read`) as a slow page, so that its load takes those bytes from the step's
        hooks, as KVM's emulator completes the load with what it read before the exit —
        a page Unicorn maps as RAM would be read again, as the host left it meanwhile
        (a discard, a `vm.write`). Not the instruction's own code page(s)."""
        if not self._answers or self._reg(X.UC_X86_REG_RIP) != self._answer_rip:
            return
        code = {pc >> PAGE_SHIFT, (pc + 14) >> PAGE_SHIFT}
        for key in self._answers:
            if key[0] is not ExitKind.MMIO:
                continue
            gfn = key[1] >> PAGE_SHIFT
            base = self._base_of(gfn)
            if base is not None and self._regions[base][1] == _RAM and gfn not in code:
                self._remap({gfn: _SLOW_PAGE})
                self._parts_slowed.append(gfn)

    def _read_parts_fast(self) -> None:
        """After the step: those pages fault in as RAM again."""
        slowed, self._parts_slowed = self._parts_slowed, []
        gone = {g: None for g in slowed
                if (b := self._base_of(g)) is not None and self._regions[b][1] == _SLOW}
        if gone:
            self._remap(gone)

    def _exact_hooks(self, rip: int) -> bool:
        self._uc.ctl_remove_cache(rip, rip + 1)  # translate it again, with the hooks
        self._mem_hooks.add()
        return True

    def _on_read(self, uc: Uc, access: int, gpa: int, size: int, value: int,
                 data: Any) -> None:
        if self._undo is not None:
            return
        # KVM's emulator reads every RAM part, then exits for the first part without
        # memory: the replay takes the RAM parts as read then, not as they are after it
        exited = False
        ram: list[tuple[int, bytes]] = []
        for part, n in _page_parts(gpa, size):
            got = self._replayed(ExitKind.MMIO, part)
            if got is None:
                got = self._guest_read_part(part, n)
                if got is None:
                    if self._fatal is not None:
                        return
                    if not exited:
                        self._post_read(Exit(ExitKind.MMIO, part, n, False))
                        exited = True
                    continue
                ram.append((part, got))
            for i, b in enumerate(got):
                self._exact_bytes[part + i] = b
        if exited:
            for part, got in ram:
                self._answers[(ExitKind.MMIO, part)] = got

    def _on_write(self, uc: Uc, access: int, gpa: int, size: int, value: int,
                  data: Any) -> None:
        if self._undo is not None:
            return
        if not self._exact_in and self._ins_prefixes() is not None:
            return  # QEMU's INS stores a zero before its IN (to fault early): not the guest's
        payload = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        pos = 0
        for part, n in _page_parts(gpa, size):
            chunk, pos = payload[pos:pos + n], pos + n
            if (part, chunk) in self._exact_done:
                continue  # done before Unicorn restarted the instruction
            self._exact_done.add((part, chunk))
            if self._tracked(part):
                # on KVM a tracked write is an MMIO exit the engine takes itself: it drops
                # what a string IN read ahead, comes after an MMIO exit made before it, and
                # writes RFLAGS back (RF as at a write exit: see _report_rf)
                self._drop_answers = bool(self._answers)
                self._rf_mark = self._run_start()
                if self._exits:
                    self._after_exits.append((part, chunk))
                    continue
            self._guest_write_part(part, chunk)

    def _tracked(self, gpa: int) -> bool:
        """Whether the page of `gpa` is write-tracked: a count under the MMU lock, which a
        zapper may hold while it waits for the guest to stop — so a hook asks out of the
        guest (`_leave`/`_enter`; a stop requested meanwhile takes effect as at any hook)."""
        if not self._inside:
            return self._engine.vm.page_track.is_tracked(gpa >> PAGE_SHIFT, self._vcpu.as_id)
        self._leave()
        try:
            return self._engine.vm.page_track.is_tracked(gpa >> PAGE_SHIFT, self._vcpu.as_id)
        finally:
            self._enter()

    def _guest_read_part(self, gpa: int, n: int) -> bytes | None:
        """Read `n` bytes within one page through kvmem's vCPU path, as a hook: None where
        there is no memory (or with `_fatal` set)."""
        self._leave()
        try:
            return self._vcpu.guest_read(gpa, n)
        except MmioExit:
            return None
        except MemoryFault as e:
            self._fatal = Exit(ExitKind.INTERNAL_ERROR, gpa, n, False, detail=str(e))
            self._uc.emu_stop()
            return None
        finally:
            self._enter()

    def _guest_write_part(self, gpa: int, data: bytes) -> None:
        """Write `data` within one page through kvmem's vCPU path, as a hook; where there is
        no memory, an MMIO write exit (queued: the instruction finishes, as on KVM)."""
        self._leave()
        try:
            self._vcpu.guest_write(gpa, data)
        except MmioExit:
            self._exit_pc = self._pc()
            self._exits.append(Exit(ExitKind.MMIO, gpa, len(data), True, data))
        except MemoryFault as e:
            self._fatal = Exit(ExitKind.INTERNAL_ERROR, gpa, len(data), True, detail=str(e))
            self._uc.emu_stop()
        finally:
            self._enter()

    def _slow_read(self, gpa: int, size: int) -> int:
        self._engine.stats["slow_accesses"] += 1
        if self._undo is not None or self._exact is not None or self._inert:
            return 0
        if not self._exact_step:
            self._want_exact()
            return 0
        got = self._exact_bytes
        if all(gpa + i in got for i in range(size)):
            return sum(got[gpa + i] << (8 * i) for i in range(size))
        if any(gpa + i in got for i in range(size)):
            # an aligned piece of an unaligned load: the bytes outside it are shifted out
            return sum(got.get(gpa + i, 0) << (8 * i) for i in range(size))
        # not the instruction's load (a page walk through a tracked table): plain memory
        self._leave()
        try:
            return int.from_bytes(self._vcpu.guest_read(gpa, size), "little")
        except (MmioExit, MemoryFault):
            return 0
        finally:
            self._enter()

    def _slow_write(self, gpa: int, size: int, value: int) -> None:
        self._engine.stats["slow_accesses"] += 1
        if self._undo is None and not self._exact_step and not self._inert:
            self._want_exact()
        # in an exact step the write hook did it

    def _ins_prefixes(self) -> bytes | None:
        """The prefixes of the instruction at RIP if it is an INS, else None."""
        uc = self._uc
        rip = self._reg(X.UC_X86_REG_RIP)
        try:
            code = bytes(uc.mem_read(rip, min(15, PAGE_SIZE - rip % PAGE_SIZE)))
        except UcError:
            return None
        i = 0
        while i < len(code) and code[i] in _PREFIXES:
            i += 1
        return code[:i] if i < len(code) and code[i] in (0x6C, 0x6D) else None

    def _string_in_count(self, size: int) -> int:
        """How many elements KVM's emulator reads ahead for the IN at RIP (pio_in_emulated):
        1 for IN; for INS, ECX (if REP) capped by the bytes left in EDI's page — bytes, not
        elements, as KVM compares them — and by its 1 KiB buffer."""
        prefixes = self._ins_prefixes()
        if prefixes is None:
            return 1
        count = 1
        if 0xF3 in prefixes or 0xF2 in prefixes:
            count = self._reg(X.UC_X86_REG_RCX)
            count &= 0xFFFF if 0x67 in prefixes else 0xFFFF_FFFF
        edi = self._reg(X.UC_X86_REG_RDI)
        down = self._reg(X.UC_X86_REG_RFLAGS) & 0x400
        in_page = edi % PAGE_SIZE if down else PAGE_SIZE - edi % PAGE_SIZE
        return max(1, min(in_page, _PIO_READ_AHEAD // size, count))

    def _on_in(self, uc: Uc, port: int, size: int, data: Any) -> int:
        if (self._undo is not None or self._exact is not None or self._inert
                or not self._port_exact()):
            return 0
        rdi = self._reg(X.UC_X86_REG_RDI) & 0xFFFF_FFFF
        self._exact_in = self._exact_step
        answer = self._replayed(ExitKind.IO, port, rdi)
        if answer is not None:
            return int.from_bytes(answer, "little")
        self._read_rdi = rdi
        self._post_read(Exit(ExitKind.IO, port, size, False,
                             count=self._string_in_count(size)))
        return 0

    def _on_out(self, uc: Uc, port: int, size: int, value: int, data: Any) -> None:
        if (self._undo is not None or self._exact is not None or self._inert
                or not self._port_exact()):
            return  # (OUTS from a slow page: the exact step posts it, with the right data)
        payload = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._post(Exit(ExitKind.IO, port, size, True, payload))


def _perms(writable: bool) -> int:
    return UC_PROT_ALL if writable else UC_PROT_READ | UC_PROT_EXEC


def _spte_pages(spte: Spte) -> dict[int, _PageMap]:
    """The pages `spte` maps, as the mirror maps them."""
    hva = spte.frame.hva
    return {spte.gfn + i: (_RAM, hva + (i << PAGE_SHIFT), spte.writable)
            for i in range(spte.npages)}


def _runs(changes: Mapping[int, _PageMap | None]
          ) -> dict[int, list[tuple[int, int, _PageMap | None]]]:
    """`changes` as runs (start, end, how the first page is mapped) by chunk: consecutive
    gfns unmapped alike, or mapped as RAM alike over consecutive host pages."""
    chunks: dict[int, list[tuple[int, int, _PageMap | None]]] = {}
    start = end = -1
    first: _PageMap | None = None
    for g in sorted(changes):
        page = changes[g]
        if g == end and g % _CHUNK and (
                (page is None and first is None)
                or (page is not None and first is not None and page[0] == first[0] == _RAM
                    and page[2] == first[2]
                    and page[1] == first[1] + ((g - start) << PAGE_SHIFT))):
            end += 1
            continue
        if end > start:
            chunks.setdefault(start // _CHUNK, []).append((start, end, first))
        start, end, first = g, g + 1, page
    if end > start:
        chunks.setdefault(start // _CHUNK, []).append((start, end, first))
    return chunks


_TlbFill = Callable[[Uc, int, int, Any, Any], bool]
_uc_reg_read = _ucb.uclib.uc_reg_read
_uc_reg_write = _ucb.uclib.uc_reg_write
_TLB_FILL_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64,
                                   ctypes.c_int, ctypes.POINTER(_ucb.uc_tlb_entry),
                                   ctypes.c_void_p)


def _raw_tlb_fill_hook(uc: Uc, fill: _TlbFill) -> Any:
    """UC_HOOK_TLB_FILL on `uc` calling `fill(uc, vaddr, access, entry, None)`, registered
    through Unicorn's C API, not its Python binding: a fill happens at every TLB miss (the
    walker benchmark sweeps 1,024 pages a pass through a 256-entry TLB), and the binding's
    wrapper cost several times the fill itself. An exception in `fill` refuses the fill,
    after stopping the guest with it as the vCPU's error. Returns what keeps it alive."""
    def call(_uch: Any, vaddr: int, access: int, entry: Any, _data: Any) -> bool:
        try:
            return fill(uc, vaddr, access, entry[0], None)
        except BaseException as e:  # nowhere to raise in C: stop, and report it
            uc.emu_stop()
            raise_later.append(e)
            return False

    raise_later: list[BaseException] = []
    callback = _TLB_FILL_CFUNC(call)
    return callback, _c_hook_add(uc, UC_HOOK_TLB_FILL, callback), raise_later


def _c_hook_add(uc: Uc, kind: int, callback: Any) -> ctypes.c_size_t:
    """`uc_hook_add` of a ctypes callback on every address, through Unicorn's C API: the
    hook's handle."""
    handle = ctypes.c_size_t()
    err = _ucb.uclib.uc_hook_add(uc._uch, ctypes.byref(handle), kind,
                                 ctypes.cast(callback, ctypes.c_void_p), None,
                                 ctypes.c_uint64(1), ctypes.c_uint64(0))
    if err:
        raise UcError(err)
    return handle


class _FastRegs:
    """Scalar registers of a Uc (at most 64 bits), read and written through Unicorn's C
    API: the binding's `reg_read` costs ~4.5 µs here, this ~1.4 µs, and one MMIO exit reads
    some twenty. EFER is read through Unicorn's MSR access."""

    __slots__ = ("_buf", "_msr", "_msr_ref", "_ref", "_uch")

    def __init__(self, uc: Uc) -> None:
        self._uch = uc._uch
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        self._msr = _UcMsr(_MSR_EFER, 0)
        self._msr_ref = ctypes.byref(self._msr)

    def __call__(self, reg: int) -> int:
        self._buf.value = 0  # narrower registers (EFLAGS, CS) write their own width only
        err = _uc_reg_read(self._uch, reg, self._ref)
        if err:
            raise UcError(err)
        return int(self._buf.value)

    def write(self, reg: int, value: int) -> None:
        self._buf.value = value
        err = _uc_reg_write(self._uch, reg, self._ref)
        if err:
            raise UcError(err)

    def efer(self) -> int:
        err = _uc_reg_read(self._uch, X.UC_X86_REG_MSR, self._msr_ref)
        if err:
            raise UcError(err)
        return int(self._msr.val)


class _UcMsr(ctypes.Structure):
    _fields_ = (("rid", ctypes.c_uint32), ("val", ctypes.c_uint64))


_MemHook = Callable[[int, int, int, int], None]
_MEM_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64,
                              ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)


class _RawMemHooks:
    """UC_HOOK_MEM_READ and UC_HOOK_MEM_WRITE for an exact step, added and deleted through
    Unicorn's C API with callbacks made once: the binding's `hook_add` wraps and thunks its
    callback anew at every call (~50 µs here, for each of the two hooks of every exact
    step). `on_read` / `on_write` get (access, address, size, value); an exception in one
    stops the guest and is appended to `raise_later` (the vCPU's error, as the TLB fill
    hook's)."""

    def __init__(self, uc: Uc, on_read: _MemHook, on_write: _MemHook,
                 raise_later: list[BaseException]) -> None:
        self._uc = uc
        self._handles: list[ctypes.c_size_t] = []

        def guard(hook: _MemHook) -> Any:
            def call(_uch: Any, access: int, address: int, size: int, value: int,
                     _data: Any) -> None:
                try:
                    hook(access, address, size, value)
                except BaseException as e:  # nowhere to raise in C: stop, and report it
                    uc.emu_stop()
                    raise_later.append(e)
            return _MEM_CFUNC(call)

        self._callbacks = [(UC_HOOK_MEM_READ, guard(on_read)),
                           (UC_HOOK_MEM_WRITE, guard(on_write))]

    def add(self) -> None:
        self._handles = [_c_hook_add(self._uc, kind, callback)
                         for kind, callback in self._callbacks]

    def delete(self) -> None:
        for handle in self._handles:
            err = _ucb.uclib.uc_hook_del(self._uc._uch, handle)
            if err:
                raise UcError(err)
        self._handles = []


def _prefix_length(code: bytes) -> int:
    """How many bytes of legacy and REX prefixes `code` starts with."""
    i = 0
    while i < len(code) and (code[i] in _PREFIXES or code[i] in _REX):
        i += 1
    return i


def _page_parts(gpa: int, size: int) -> list[tuple[int, int]]:
    """[gpa, gpa + size) cut at page boundaries, as KVM's emulator cuts an access."""
    first = min(size, PAGE_SIZE - (gpa & (PAGE_SIZE - 1)))
    return [(gpa, first)] + ([(gpa + first, size - first)] if first < size else [])


def _nothing() -> None:
    """A restart that only needs the pending unmaps, which every restart applies."""


def _nothing_at(uc: Uc, address: int, size: int, data: Any) -> None:
    """A learned port site's code hook: being there makes Unicorn check for a stop."""
