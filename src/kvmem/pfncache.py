"""gfn-to-pfn caches (kvm-semantics §4, KVM's `virt/kvm/pfncache.c`) and the lock API.

A pfn cache remembers the host page behind one guest page (GPA-based: through the slots
of address space 0) or behind one host address (HVA-based), so a hot path — a Xen
shared_info page, a kvmclock page, a device's ring — can use it without a slot lookup.

Rules of this room:
- `rwlock` guards the cache's fields. Readers (`check`, the body of `lock()`) hold it for
  read while they use the page; `refresh` and invalidations take it for write. So a host
  change that reaches a valid cache waits until nobody is using its page.
- `refresh_lock` serialises activate / refresh / deactivate (one refresher at a time).
- Host invalidations reach a cache through `Mmu.gpc_list` *before* the MMU raises
  `in_progress`, and without filtering by slots (an HVA cache may map memory no slot
  does). Slot changes are not pushed to caches: `check` notices a generation change.

Theory of refresh (`hva_to_pfn_retry`): mark the cache invalid; under the lock set
`_untouched` and note whether an invalidation covering the cached hva is in flight; drop
the lock, resolve the page, retake the lock; start again if such an invalidation was in
flight, or one began while the lock was dropped (it cleared `_untouched`). Only then is
the cache valid — or, if the page could not be had, EFAULT. An invalidation that begins
after that finds the cache valid and invalidates it, as in KVM.

Deliberate differences from KVM:
- The retry rule. KVM retries while *any* invalidation is in flight
  (`mn_active_invalidate_count`) or the MMU sequence moved. That livelocks a refresh under
  back-to-back unrelated invalidations (D. Woodhouse's 2024 RFC, not merged), and it is
  not even enough: `seq` moves only when an invalidation hits a slot, so an HVA cache over
  memory no slot maps could keep a page replaced while the lock was dropped. kvmem waits
  only for invalidations whose hva range covers the cache (`Memslots.mn_ranges`), and the
  flag
  catches those that begin while the lock is dropped. A failed resolve during such an
  invalidation is retried, not EFAULT: it may be the transient hole of a remap.
- `activate` refuses a page-crossing length before it activates anything (KVM leaves the
  cache active with EINVAL); kvmem's rule is that a refused call changes nothing.
- `acquire()` / `release()` (and their `with` form, `lock()`) are the lock/unlock API
  proposed for KVM in 2022 and never merged.
"""

from __future__ import annotations

import errno
from contextlib import suppress
from types import TracebackType

from . import host, sync
from .access import MarkDirty
from .args import as_bool, as_int, as_u64
from .errors import KvmError
from .host import Frame
from .memslots import Memslots
from .mmu import Mmu
from .slots import MemorySlot
from .uapi import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, U64_MAX

__all__ = ["PfnCache"]


def _check_length(offset: int, length: object) -> int:
    length = as_u64("length", length)  # an unsigned long in KVM
    if (offset & PAGE_MASK) + length > PAGE_SIZE:
        raise KvmError(errno.EINVAL, f"{length} bytes at page offset {offset & PAGE_MASK:#x} "
                                     f"cross a page: a pfn cache holds one page")
    return length


class PfnCache:
    """One cached gpa (or hva) → host page translation; see the module notes.

    Typical use::

        gpc = vm.pfn_cache()
        gpc.activate(gpa, 8)
        with gpc.lock(8, dirty=True) as view:   # checks, refreshes if needed, retries
            view[0:8] = value.to_bytes(8, "little")
        gpc.deactivate()
    """

    def __init__(self, memslots: Memslots, mmu: Mmu, mark: MarkDirty) -> None:
        self._memslots = memslots
        self._mmu = mmu
        self._mark = mark
        self.rwlock = sync.RwLock("gpc.lock")
        self.refresh_lock = sync.Mutex("gpc.refresh_lock")
        self.gpa: int | None = None  # None: HVA-based (KVM's INVALID_GPA)
        self.uhva: int | None = None  # with the page offset; None: an error hva
        self.generation = -1
        self.memslot: MemorySlot | None = None
        self.frame: Frame | None = None  # the pfn; None: an error pfn
        self._page: memoryview | None = None  # a view of the frame's page, while valid
        # what `acquire` hands out (KVM's khva): length → a view of [uhva, uhva + length)
        # on `_page`, and the last one used as (view, length, generation or None for an
        # HVA-based cache). Dropped — the views released — with the page or on refresh.
        self._views: dict[int, memoryview] = {}
        self._hot: tuple[memoryview, int, int | None] | None = None
        self.active = False
        self.valid = False
        # set before refresh drops the lock; an invalidation covering uhva clears it
        self._untouched = False
        self.stats = {"refreshes": 0, "retries": 0, "invalidations": 0}

    # -- state --------------------------------------------------------------------------------
    @property
    def is_gpa_active(self) -> bool:
        return self.active and self.gpa is not None

    @property
    def is_hva_active(self) -> bool:
        return self.active and self.gpa is None

    # -- activate / deactivate ------------------------------------------------------------------
    def activate(self, gpa: int, length: int) -> None:
        """kvm_gpc_activate: cache the page of `gpa` (address space 0) for accesses of
        `length` bytes. EINVAL if they cross a page; EFAULT if no writable slot maps the
        gpa now (the cache stays active and a later `refresh` may succeed)."""
        gpa = as_u64("gpa", gpa)
        self._activate(gpa, None, _check_length(gpa, length))

    def activate_hva(self, hva: int, length: int) -> None:
        """kvm_gpc_activate_hva: cache the host page of `hva` (no slot, no generation)."""
        hva = as_u64("hva", hva)
        self._activate(None, hva, _check_length(hva, length))

    def _activate(self, gpa: int | None, uhva: int | None, length: int) -> None:
        self._memslots.check_process()
        with self.refresh_lock:
            if not self.active:
                if self.valid:
                    raise KvmError(errno.EIO, "an inactive pfn cache is valid (kvmem bug)")
                with self._mmu.gpc_lock:
                    self._mmu.gpc_list.store((*self._mmu.gpc_list.load(), self))
                # active only once invalidations can reach it: a refresh running after
                # this point cannot map a page that an invalidation then misses
                with self.rwlock.write():
                    self.active = True
            self._refresh(gpa, uhva, length)

    def deactivate(self) -> None:
        """kvm_gpc_deactivate: forget the page; gpa, hva and generation are kept."""
        with self.refresh_lock:
            if not self.active:
                return
            with self.rwlock.write():
                self.active = False
                self._forget_page()
            with self._mmu.gpc_lock:
                self._mmu.gpc_list.store(
                    tuple(c for c in self._mmu.gpc_list.load() if c is not self))

    # -- check / refresh --------------------------------------------------------------------------
    def check(self, length: int) -> bool:
        """kvm_gpc_check: the cached page may be used for `length` bytes. Call with
        `rwlock` held for read and keep it while using the page."""
        if length.__class__ is not int or not 0 <= length <= U64_MAX:
            _check_length(0, length)  # raises: TypeError or EINVAL
        if not self.active or self.uhva is None or not self.valid:
            return False
        if self.gpa is not None and \
                self.generation != self._memslots.active.value[0].generation:
            return False
        return (self.uhva & PAGE_MASK) + length <= PAGE_SIZE

    def refresh(self, length: int) -> None:
        """kvm_gpc_refresh: re-resolve the cached gpa (or hva). Raises `KvmError`: EINVAL
        (inactive, or `length` crosses a page), EFAULT (no writable slot or host page)."""
        length = as_int("length", length)
        with self.refresh_lock:
            self._refresh(self.gpa, None if self.gpa is not None else self.uhva, length)

    def _refresh(self, gpa: int | None, uhva: int | None, length: int) -> None:
        self.refresh_lock.assert_held()
        addr = gpa if gpa is not None else uhva
        if addr is None:
            raise KvmError(errno.EINVAL, "pfn cache has neither a gpa nor an hva")
        _check_length(addr, length)
        offset = addr & PAGE_MASK
        with self.rwlock.write():
            if not self.active:
                raise KvmError(errno.EINVAL, "pfn cache is not active")
            self.stats["refreshes"] += 1
            self._drop_views()  # the offset may move, and a length may stop fitting
            old_page = None if self.uhva is None else self.uhva & ~PAGE_MASK
            try:
                if gpa is None:
                    assert uhva is not None
                    self.gpa, self.memslot, self.uhva = None, None, uhva
                else:
                    self._translate(gpa)
                assert self.uhva is not None
                self.uhva = (self.uhva & ~PAGE_MASK) + offset
                if not self.valid or self.uhva & ~PAGE_MASK != old_page:
                    self._hva_to_pfn_retry()
            except BaseException:
                # the named safe state: not valid, no page; gpa/uhva/generation as set
                self._forget_page()
                raise

    def _translate(self, gpa: int) -> None:
        """The GPA-based half of refresh: new gpa, new generation or an error hva means a
        fresh slot lookup; otherwise the page is the one already cached."""
        ms = self._memslots
        token = ms.srcu.read_lock()
        try:
            slots = ms.active.load()[0]
            if gpa == self.gpa and slots.generation == self.generation and \
                    self.uhva is not None:
                return
            gfn = gpa >> PAGE_SHIFT
            self.gpa = gpa
            self.generation = slots.generation
            slot = slots.search(gfn)
            self.memslot = slot
            if slot is None or slot.invalid or slot.readonly:
                self.uhva = None
                why = "no slot" if slot is None else \
                    "its slot is being deleted or moved" if slot.invalid else \
                    "its slot is read-only"
                raise KvmError(errno.EFAULT, f"gpa {gpa:#x} cannot be cached for writing: {why}")
            self.uhva = slot.hva_of(gfn)
        finally:
            ms.srcu.read_unlock(token)

    def _hva_to_pfn_retry(self) -> None:
        self.rwlock.assert_write_held()
        ms = self._memslots
        uhva = self.uhva
        assert uhva is not None
        self._forget_page()
        while True:
            # snapshot under the lock: an invalidation of uhva that starts after this
            # clears `_untouched` (the cache is on the list); one that started before is
            # still in flight, or its host change is done and the resolve below sees it
            self._untouched = True
            quiet = not ms.invalidating(uhva)
            self.rwlock.release_write()
            try:
                frame = host.resolve(uhva, write=True)  # always a writable page, as in KVM
            finally:
                self.rwlock.acquire_write()
            # one that begins after this point finds the cache valid and invalidates it
            if quiet and self._untouched:
                if frame is None:
                    raise KvmError(errno.EFAULT, f"host page at hva {uhva:#x} is unmapped "
                                                 f"or not writable")
                break
            # the answer may predate a host change (or be a transient failure during one)
            self.stats["retries"] += 1
            self.rwlock.release_write()
            sync.pause()
            self.rwlock.acquire_write()
        self.frame = frame
        self._page = frame.view()
        self.valid = True

    # -- invalidation (called by Mmu.invalidate_range_start, before in_progress rises) -------
    def invalidate_start(self, start: int, end: int) -> None:
        with self.rwlock.read():
            uhva = self.uhva
            hit = uhva is not None and start <= uhva < end and (self.valid or self._untouched)
        if not hit:
            return
        with self.rwlock.write():  # re-check: a refresh may have moved the cache meanwhile
            uhva = self.uhva
            if uhva is not None and start <= uhva < end:
                if self.valid:
                    self.stats["invalidations"] += 1
                self._forget_page()
                self._untouched = False

    def _forget_page(self) -> None:
        """Not valid, no page, no views (rwlock held for write)."""
        self.valid = False
        self.frame = None
        self._page = None
        self._drop_views()

    def _drop_views(self) -> None:
        """Forget the views `acquire` handed out, releasing them (rwlock held for write,
        so no holder is using one): a view kept past its `release` raises ValueError from
        now on instead of reaching a page the cache no longer holds. A view something
        else exports (numpy, say) cannot be released; it is only forgotten."""
        self._hot = None
        views, self._views = self._views, {}
        for view in views.values():
            with suppress(BufferError):
                view.release()

    # -- use ------------------------------------------------------------------------------
    def mark_dirty(self) -> None:
        """kvm_gpc_mark_dirty_in_slot: mark the cached page dirty in its slot's log (GPA-based
        caches of logging slots; nothing otherwise). Call while holding the cache (between
        `acquire` and `release`, or inside `lock()`)."""
        slot, gpa = self.memslot, self.gpa
        if slot is not None and gpa is not None and slot.dirty_logging:
            self._mark(slot, (gpa >> PAGE_SHIFT) - slot.base_gfn, 1)

    def acquire(self, length: int) -> memoryview:
        """Hold the cache valid for `length` bytes and return a live, writable view of them
        (KVM's `read_lock(&gpc->lock)` + the `kvm_gpc_check` / `kvm_gpc_refresh` loop;
        the view is KVM's khva): the read lock is held on return, and a failed refresh
        raises with nothing held. End the hold with `release`; call `mark_dirty` before it
        if you wrote. Use the view only while holding: it stays the cache's until the page
        goes (an invalidation, a refresh, `deactivate`), and from then on it raises
        ValueError. Keep the hold short, as in KVM where it cannot sleep: a host change to
        this page waits for it, and a slot update waits for that host change — so do not
        change host memory or slots while holding it. `with gpc.lock(length):` is the
        same pair with a view of the block's own."""
        rwlock = self.rwlock
        r = rwlock.readers  # rwlock.acquire_read(), inlined (see RwLock)
        r.append(None)
        if rwlock.busy:
            rwlock.read_contended()
        # kvm_gpc_check, inline, on the last view handed out: valid (a view), the same
        # length, the same slot generation (GPA-based)
        hot = self._hot
        if hot is not None and length.__class__ is int and hot[1] == length and (
                hot[2] is None or hot[2] == self._memslots.active.value[0].generation):
            return hot[0]
        return self._acquire_slow(length)

    def _acquire_slow(self, length: object) -> memoryview:
        """`acquire` past its fast check (rwlock held for read; released on error)."""
        rwlock = self.rwlock
        try:
            n = as_u64("length", length)
            # kvm_gpc_check: valid (a page), same slot generation (GPA-based), in the page
            page, uhva = self._page, self.uhva
            while page is None or uhva is None or (uhva & 4095) + n > 4096 or (
                    self.gpa is not None and
                    self.generation != self._memslots.active.value[0].generation):
                rwlock.release_read()
                try:
                    self.refresh(n)
                finally:
                    rwlock.acquire_read()
                page, uhva = self._page, self.uhva
            view = self._views.get(n)
            if view is None:
                off = uhva & 4095
                view = self._views.setdefault(n, page[off:off + n])
            self._hot = (view, n, None if self.gpa is None else self.generation)
            return view
        except BaseException:
            rwlock.release_read()
            raise

    def release(self) -> None:
        """End a hold that `acquire` began (the read lock)."""
        rwlock = self.rwlock
        rwlock.readers.pop()  # rwlock.release_read(), inlined (see RwLock)
        if rwlock.busy:
            rwlock.wake_writer()

    def lock(self, length: int, *, dirty: bool = False) -> _Locked:
        """`with gpc.lock(length, dirty=False) as view:` — `acquire` on entry, `release`
        on exit; with `dirty=True` the page is marked dirty when the block ends."""
        if length.__class__ is not int or not 0 <= length <= U64_MAX:
            length = as_u64("length", length)
        if dirty.__class__ is not bool:
            dirty = as_bool("dirty", dirty)
        return _Locked(self, length, dirty)

    def __repr__(self) -> str:
        where = f"gpa={self.gpa:#x}" if self.gpa is not None else \
            f"hva={self.uhva:#x}" if self.uhva is not None else "unset"
        return f"PfnCache({where}, active={self.active}, valid={self.valid})"


class _Locked:
    """What `PfnCache.lock` returns: `acquire` on entry, `release` on exit, and a view of
    the block's own in between (released on exit: using it afterwards raises)."""

    __slots__ = ("_dirty", "_gpc", "_length", "_view")

    def __init__(self, gpc: PfnCache, length: int, dirty: bool) -> None:
        self._gpc = gpc
        self._length = length
        self._dirty = dirty
        self._view: memoryview | None = None

    def __enter__(self) -> memoryview:
        view = self._view = self._gpc.acquire(self._length)[:]
        return view

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        view, self._view = self._view, None
        assert view is not None
        view.release()
        if self._dirty:
            self._gpc.mark_dirty()
        self._gpc.release()
