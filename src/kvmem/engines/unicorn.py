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
- Each vCPU owns one `Uc` and a worker thread that alone calls into it (map, unmap,
  protect, emu_start). `run` hands the worker a go and waits for the exit it posts. An
  exit that needs an answer (IN, MMIO read) blocks inside the hook until the next `run`.
- The MMU tells the engine of every spte it drops or write-protects (`stage2_unmapped`,
  under the MMU lock). The vCPU records the range as pending and, if its guest may be
  running (`_inside`), stops Unicorn and waits until the guest is out — so when the MMU's
  flush returns, no guest instruction uses the old mapping. Pending ranges are unmapped
  between two `emu_start`s; a hook that re-enters the guest while some are pending
  protects their regions PROT_NONE first (a fenced access restarts the instruction after
  the real unmap). A memory hook never unmaps or re-protects the page under the current
  access: Unicorn forbids the unmap, and a store finishes with the TLB entry it read
  before calling the hook — for a read-only page, one that drops the write. Such a hook
  returns False and leaves the change to `_restart`, run between two emu_starts; the
  instruction then runs again. Mapping an unmapped page from its hook is safe: Unicorn
  gives an unmapped page a TLB entry that never hits, so the access reads a fresh one.
- Hooks never hold `_inside` while they wait for a lock or for the VMM (`_leave`/`_enter`).
- A vCPU in SMM maps address space 1: switching drops every mapping.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from unicorn import x86_const as X
from unicorn.unicorn import Uc, UcError
from unicorn.unicorn_const import (
    UC_ARCH_X86,
    UC_ERR_EXCEPTION,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_MEM_PROT,
    UC_HOOK_MEM_UNMAPPED,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_32,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_NONE,
    UC_PROT_READ,
)

from .. import sync
from ..errors import KvmError
from ..mmu import MemoryFault, MmioExit, Spte, TrackedWrite
from ..uapi import KVM_USER_MEM_SLOTS, PAGE_SHIFT, PAGE_SIZE
from . import AttachedOnce, EngineCapabilities, EngineError, Exit, ExitKind, Regs

if TYPE_CHECKING:
    from ..slots import Change
    from ..vm import Vcpu, Vm

__all__ = ["UnicornEngine", "UnicornVcpu"]

_UNTIL = 1 << 32  # a 32-bit EIP never gets there: run until an exit
_REGS = (("eax", X.UC_X86_REG_EAX), ("ebx", X.UC_X86_REG_EBX), ("ecx", X.UC_X86_REG_ECX),
         ("edx", X.UC_X86_REG_EDX), ("esi", X.UC_X86_REG_ESI), ("edi", X.UC_X86_REG_EDI),
         ("esp", X.UC_X86_REG_ESP), ("ebp", X.UC_X86_REG_EBP), ("eip", X.UC_X86_REG_EIP),
         ("eflags", X.UC_X86_REG_EFLAGS))
_RAM, _SLOW = "ram", "slow"


class UnicornEngine(AttachedOnce):
    """kvmem on Unicorn. Create with `Vm(engine="unicorn")`; reach it as `vm.engine`."""

    name = "unicorn"

    def __init__(self) -> None:
        self._caps = EngineCapabilities(name=self.name, address_spaces=2,
                                        max_slots=KVM_USER_MEM_SLOTS, readonly_mem=True,
                                        dirty_log=True, write_tracking=True)
        self._vm: Vm | None = None
        self._vcpus: list[UnicornVcpu] = []
        self.stats = {"faults": 0, "maps": 0, "unmaps": 0, "slow_accesses": 0,
                      "stops": 0, "restarts": 0}

    def attach(self, vm: Vm) -> None:
        self._claim(vm)
        vm.mmu.add_mirror(self)
        vm.add_listener(self)

    def create_vcpu(self, vcpu_id: int) -> UnicornVcpu:
        cpu = UnicornVcpu(self, self.vm.create_vcpu(vcpu_id))
        self._vcpus.append(cpu)
        return cpu

    @property
    def vcpus(self) -> list[UnicornVcpu]:
        return list(self._vcpus)

    def close(self) -> None:
        vm, self._vm = self._vm, None
        for cpu in self._vcpus:
            cpu._close()
        if vm is not None:
            vm.mmu.remove_mirror(self)
            with contextlib.suppress(KvmError):
                vm.remove_listener(self)

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

    def track_changed(self, vm: Vm, as_id: int, gfn: int, tracked: bool) -> None:
        if not tracked:  # the slow page may become RAM again
            for cpu in self._vcpus:
                cpu._zap(as_id, gfn, gfn + 1)


class UnicornVcpu:
    """A Unicorn vCPU: a `Uc` driven by its own worker thread."""

    def __init__(self, engine: UnicornEngine, vcpu: Vcpu) -> None:
        self._engine = engine
        self._vcpu = vcpu
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self._uc = uc
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_PROT, self._on_prot)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        # mappings (worker-owned; read by zappers under _lock)
        self._lock = sync.Mutex("unicorn_vcpu.mappings")
        self._zcv = sync.Condition(self._lock)
        self._regions: dict[int, tuple[int, str, int]] = {}  # base gfn → npages, kind, hva
        self._page: dict[int, int] = {}  # gfn → base gfn of its region
        self._fenced: set[int] = set()
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
        self._in_exit = False
        self._resume = False
        self._answer: bytes | None = None
        self._reply = b""
        self._last: Exit | None = None

    @property
    def id(self) -> int:
        return self._vcpu.id

    @property
    def vcpu(self) -> Vcpu:
        return self._vcpu

    # -- registers ------------------------------------------------------------------------------
    def start(self, entry: int, regs: Regs | None = None) -> None:
        """Also forgets every translated block: code the host wrote into guest memory since
        (a new program at the same gpa) is what runs. Host writes to code while the guest
        runs are not seen until then — a CPU with a software TB cache is not coherent with
        a DMA-like writer, and kvmem's accessors do not tell engines about writes."""
        self._uc.ctl_flush_tb()  # type: ignore[attr-defined]  # defined, not annotated
        r = regs if regs is not None else Regs()
        self.set_regs(Regs(r.eax, r.ebx, r.ecx, r.edx, r.esi, r.edi, r.esp, r.ebp, entry, 0x2))

    def get_regs(self) -> Regs:
        return Regs(**{name: self._uc.reg_read(reg) for name, reg in _REGS})

    def set_regs(self, regs: Regs) -> None:
        if self._in_exit:
            raise EngineError(errno.EBUSY, "registers are not writable in the middle of an "
                                           "instruction that exited; run() first")
        for name, reg in _REGS:
            self._uc.reg_write(reg, getattr(regs, name))

    # -- run / complete / kick ------------------------------------------------------------------
    def complete(self, data: bytes) -> None:
        if self._last is None or not self._last.reads:
            raise EngineError(errno.EINVAL, "no read exit is waiting for data")
        self._answer = bytes(data)

    def run(self) -> Exit:
        with self._cv_lock:
            if self._closing:
                raise EngineError(errno.EIO, "vCPU closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._worker_main, daemon=True,
                                                name=f"kvmem-unicorn-vcpu{self.id}")
                self._worker.start()
            if self._in_exit:
                self._reply = self._answer or b""
                self._resume = True
            else:
                self._go = True
            self._answer = None
            self._cv.notify_all()
            self._cv.wait_until(lambda: self._posted is not None or self._error is not None)
            error, self._error = self._error, None
            exit_, self._posted = self._posted, None
        if error is not None:
            raise EngineError(errno.EIO, f"Unicorn vCPU {self.id} failed: {error!r}") from error
        assert exit_ is not None
        self._last = exit_
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

    def _close(self) -> None:
        self.kick()
        with self._cv_lock:
            self._closing = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # -- the worker -----------------------------------------------------------------------------
    def _worker_main(self) -> None:
        while True:
            with self._cv_lock:
                self._cv.wait_until(lambda: self._go or self._closing)
                if self._closing:
                    return
                self._go = False
            try:
                exit_ = self._run_guest()
            except BaseException as e:  # handed to run(), which raises it
                with self._cv_lock:
                    self._error = e
                    self._cv.notify_all()
                continue
            with self._cv_lock:
                self._posted = exit_
                self._cv.notify_all()

    def _run_guest(self) -> Exit:
        uc = self._uc
        while True:
            with self._lock:
                if self._kicked:
                    self._kicked = False
                    return Exit(ExitKind.KICKED)
            while True:
                with self._lock:
                    # a zap between the unmaps and this store would not wait for us
                    if not self._pending and self._vcpu.as_id == self._mapped_as:
                        self._inside = True
                        self._epoch += 1
                        self._stop_requested = False
                        break
                self._apply_pending()
            error: UcError | None = None
            try:
                uc.emu_start(uc.reg_read(X.UC_X86_REG_EIP), _UNTIL)
            except UcError as e:
                error = e
            finally:
                with self._lock:
                    self._inside = False
                    stopped, self._stop_requested = self._stop_requested, False
                    self._zcv.notify_all()
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
                                f"at {uc.reg_read(X.UC_X86_REG_EIP):#x}: {error}")
                if error.errno in (UC_ERR_INSN_INVALID, UC_ERR_EXCEPTION):
                    return Exit(ExitKind.SHUTDOWN, detail=str(error))
                return Exit(ExitKind.INTERNAL_ERROR, detail=str(error))
            if not stopped or self._halted():
                return Exit(ExitKind.HLT)
            with self._lock:
                if self._kicked:
                    self._kicked = False
                    return Exit(ExitKind.KICKED)
            # a zap's stop: unmap what is pending and go on

    def _halted(self) -> bool:
        """Unicorn returns after HLT as after a stop: look at the instruction before EIP
        (a stop landing right after an instruction ending in byte f4 reads as a halt)."""
        eip = self._uc.reg_read(X.UC_X86_REG_EIP)
        try:
            return bytes(self._uc.mem_read(eip - 1, 1)) == b"\xf4"
        except UcError:
            return False

    # -- mappings -------------------------------------------------------------------------------
    def _zap(self, as_id: int, start: int, end: int) -> None:
        """From any thread (the MMU lock held): drop [start, end) from this vCPU's mappings
        before returning, as far as a running guest is concerned."""
        with self._lock:
            if as_id != self._mapped_as or not self._overlaps(start, end):
                return
            self._pending.append((start, end))
            self._stop_guest()

    def _overlaps(self, start: int, end: int) -> bool:
        if end - start <= 64:
            return any(g in self._page for g in range(start, end))
        return any(b < end and b + n > start for b, (n, _, _) in self._regions.items())

    def _bases(self, start: int, end: int) -> list[int]:
        if end - start <= 64:
            return sorted({self._page[g] for g in range(start, end) if g in self._page})
        return [b for b, (n, _, _) in self._regions.items() if b < end and b + n > start]

    def _apply_pending(self) -> None:
        """Between two emu_starts: unmap pending ranges; follow an SMM switch. A page whose
        spte is still there, over the same host page, only changes permissions (a dirty-log
        write protection): cheaper than an unmap for Unicorn, which keeps regions in a
        list."""
        with self._lock:
            pending, self._pending = self._pending, []
            bases = sorted({b for s, e in pending for b in self._bases(s, e)})
            if self._vcpu.as_id != self._mapped_as:
                bases = list(self._regions)
                self._mapped_as = self._vcpu.as_id
                pending = []
        mmu = self._engine.vm.mmu
        for base in bases:
            npages, kind, hva = self._regions[base]
            spte = mmu.spte(self._mapped_as, base) if pending else None
            if (kind == _RAM and npages == 1 and spte is not None and spte.npages == 1
                    and spte.frame.hva == hva and spte.frame.current()):
                perms = UC_PROT_ALL if spte.writable else UC_PROT_READ | UC_PROT_EXEC
                self._uc.mem_protect(base << PAGE_SHIFT, PAGE_SIZE, perms)
                with self._lock:
                    self._fenced.discard(base)
                continue
            self._unmap_region(base)

    def _unmap_region(self, base: int) -> None:
        with self._lock:
            region = self._regions.pop(base, None)
            if region is None:
                return
            npages = region[0]
            for g in range(base, base + npages):
                self._page.pop(g, None)
            self._fenced.discard(base)
        self._uc.mem_unmap(base << PAGE_SHIFT, npages << PAGE_SHIFT)
        # a gpa mapped again may be other host memory: drop code translated from this one
        self._uc.ctl_remove_cache(base << PAGE_SHIFT, (base + npages) << PAGE_SHIFT)
        self._engine.stats["unmaps"] += 1

    def _record(self, base: int, npages: int, kind: str, hva: int = 0) -> None:
        with self._lock:
            self._regions[base] = (npages, kind, hva)
            for g in range(base, base + npages):
                self._page[g] = base
        self._engine.stats["maps"] += 1

    def _map_ram(self, gfn: int, spte: Spte) -> None:
        base, npages = spte.gfn, spte.npages
        if npages > 1 and any(g in self._page for g in range(base, base + npages)):
            base, npages = gfn, 1
        hva = spte.frame.hva + ((base - spte.gfn) << PAGE_SHIFT)
        perms = UC_PROT_ALL if spte.writable else UC_PROT_READ | UC_PROT_EXEC
        self._uc.mem_map_ptr(base << PAGE_SHIFT, npages << PAGE_SHIFT, perms, hva)
        self._record(base, npages, _RAM, hva)

    def _map_slow(self, gfn: int) -> None:
        """Map the page as Unicorn MMIO: every access takes kvmem's vCPU memory path."""
        base = self._page.get(gfn)
        if base is not None:
            self._unmap_region(base)
        page = gfn << PAGE_SHIFT

        def read(uc: Uc, offset: int, size: int, data: Any) -> int:
            return self._slow_read(page + offset, size)

        def write(uc: Uc, offset: int, size: int, value: int, data: Any) -> None:
            self._slow_write(page + offset, size, value)

        self._uc.mmio_map(page, PAGE_SIZE, read, None, write, None)
        self._record(gfn, 1, _SLOW)

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
            stop = bool(bases) or self._kicked
            if stop:
                self._stop_requested = True
        for b in fence:
            self._uc.mem_protect(b << PAGE_SHIFT, self._regions[b][0] << PAGE_SHIFT,
                                 UC_PROT_NONE)
        if stop:
            self._uc.emu_stop()
        return stop

    def _pending_covers(self, gfn: int) -> bool:
        with self._lock:
            return any(s <= gfn < e for s, e in self._pending)

    def _hook_fault(self, address: int, size: int, write: bool) -> Spte | None:
        """The fault path for a memory hook, outside the guest: the spte to map, None for
        the slow path (MMIO, read-only, tracked), or None with `_fatal` set."""
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
            self._enter()

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int,
                     data: Any) -> bool:
        gfn = address >> PAGE_SHIFT
        fetch = access == UC_MEM_FETCH_UNMAPPED
        write = access == UC_MEM_WRITE_UNMAPPED
        spte = self._hook_fault(address, size, write)
        if self._fatal is not None or (spte is None and fetch):
            return False
        if self._pending_covers(gfn):
            self._restart = _nothing  # zapped while we faulted: unmap, then try again
            return False
        if spte is None:
            self._map_slow(gfn)
        else:
            self._map_ram(gfn, spte)
        return True

    def _on_prot(self, uc: Uc, access: int, address: int, size: int, value: int,
                 data: Any) -> bool:
        gfn = address >> PAGE_SHIFT
        base = self._page.get(gfn)
        if base is None or base in self._fenced or access != UC_MEM_WRITE_PROT:
            # a fenced region, or a read of PROT_NONE: unmap what is pending and retry
            self._restart = _nothing
            return False
        spte = self._hook_fault(address, size, True)
        if self._fatal is not None:
            return False
        if self._pending_covers(gfn):
            self._restart = _nothing
            return False
        if spte is None:
            # the page must take the slow path; its mapping cannot change under this access
            self._restart = lambda: self._map_slow(gfn)
            return False
        if self._regions[base][0] != 1 or not spte.writable:
            self._restart = lambda: self._unmap_region(base)
            return False
        # Not from here: the store that called us goes on with the TLB entry Unicorn read
        # for it, which drops writes to a read-only page, whatever the page's protection
        # is now. Made writable between two emu_starts, the page takes the store again.
        self._restart = lambda: uc.mem_protect(base << PAGE_SHIFT, PAGE_SIZE, UC_PROT_ALL)
        return False

    # -- hooks: exits ---------------------------------------------------------------------------
    def _exit(self, exit_: Exit) -> bytes:
        """Post `exit_` to `run` and wait for the next `run` (with the answer of a read)."""
        with self._cv_lock:
            self._posted = exit_
            self._in_exit = True
            self._cv.notify_all()
            self._cv.wait_until(lambda: self._resume or self._closing)
            self._resume = False
            self._in_exit = False
            reply, self._reply = self._reply, b""
        return reply  # the caller's _enter stops the guest if a kick came meanwhile

    def _slow_read(self, gpa: int, size: int) -> int:
        self._engine.stats["slow_accesses"] += 1
        self._leave()
        try:
            try:
                data = self._vcpu.guest_read(gpa, size)
            except MmioExit:
                data = self._exit(Exit(ExitKind.MMIO, gpa, size, False))
            except MemoryFault as e:
                self._fatal = Exit(ExitKind.INTERNAL_ERROR, gpa, size, False, detail=str(e))
                data = b""
        finally:
            self._enter()
        if self._fatal is not None:
            self._uc.emu_stop()
        return int.from_bytes(data[:size].ljust(size, b"\0"), "little")

    def _slow_write(self, gpa: int, size: int, value: int) -> None:
        self._engine.stats["slow_accesses"] += 1
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._leave()
        try:
            try:
                self._vcpu.guest_write(gpa, data)
            except MmioExit:
                self._exit(Exit(ExitKind.MMIO, gpa, size, True, data))
            except MemoryFault as e:
                self._fatal = Exit(ExitKind.INTERNAL_ERROR, gpa, size, True, detail=str(e))
        finally:
            self._enter()
        if self._fatal is not None:
            self._uc.emu_stop()

    def _on_in(self, uc: Uc, port: int, size: int, data: Any) -> int:
        self._leave()
        try:
            reply = self._exit(Exit(ExitKind.IO, port, size, False))
        finally:
            self._enter()
        return int.from_bytes(reply[:size].ljust(size, b"\0"), "little")

    def _on_out(self, uc: Uc, port: int, size: int, value: int, data: Any) -> None:
        payload = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._leave()
        try:
            self._exit(Exit(ExitKind.IO, port, size, True, payload))
        finally:
            self._enter()


def _nothing() -> None:
    """A restart that only needs the pending unmaps, which every restart applies."""
