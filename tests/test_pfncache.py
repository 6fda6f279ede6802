"""gfn-to-pfn caches (kvm-semantics §4): activate / check / refresh / deactivate, the
page-crossing rule and errno, invalidation from host events, lazy generation checks, and
the acquire() / release() pair and its `with` form, lock(), that hide the check/refresh
loop."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmem import KVM_MEM_READONLY as RO
from kvmem import host

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def mem() -> Iterator[kvmem.HostMemory]:
    m = kvmem.HostMemory.anonymous(4 * MiB)
    yield m
    m.close()


@pytest.fixture
def vm(mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm]) -> kvmem.Vm:
    v = make_vm()
    v.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)
    return v


def state(vm: kvmem.Vm, gpc: kvmem.PfnCache) -> tuple[object, ...]:
    return (gpc.active, gpc.valid, gpc.gpa, gpc.uhva, gpc.generation, gpc.frame,
            vm_list(vm, gpc))


def vm_list(vm: kvmem.Vm, gpc: kvmem.PfnCache) -> bool:
    """The cache is on the VM's list: host invalidations reach it."""
    return gpc in vm.mmu.gpc_list.load()


def test_lock_yields_a_live_view_of_guest_memory(vm: kvmem.Vm) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x3008, 8)
    with gpc.lock(8) as view:
        view[:] = b"12345678"
    assert vm.read(0x3008, 8) == b"12345678"
    vm.write(0x3008, b"abcdefgh")
    with gpc.lock(8) as view:
        assert bytes(view) == b"abcdefgh"
    with pytest.raises(ValueError):
        view[0]


def test_acquire_release_is_the_lock_round_trip_as_plain_calls(vm: kvmem.Vm,
        mem: kvmem.HostMemory) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x3008, 8)
    view = gpc.acquire(8)
    view[:] = b"12345678"
    gpc.release()
    assert vm.read(0x3008, 8) == b"12345678"
    again = gpc.acquire(8)  # the cache's own view (KVM's khva): the same one again
    assert again is view and bytes(again) == b"12345678"
    gpc.release()
    shorter = gpc.acquire(4)
    assert len(shorter) == 4 and bytes(shorter) == b"1234"
    gpc.release()
    # the page goes: the views handed out are revoked, a stale one raises
    mem.discard(0x3000, PAGE)
    assert not gpc.valid
    with pytest.raises(ValueError):
        view[0]
    with pytest.raises(ValueError):
        shorter[0]
    fresh = gpc.acquire(8)  # refreshed: a view of the new page
    assert fresh is not view and bytes(fresh) == bytes(8)
    gpc.release()


def test_acquire_holds_the_read_lock_until_release(vm: kvmem.Vm,
                                                   mem: kvmem.HostMemory) -> None:
    """A host change to the cached page waits for the holder (KVM: the invalidation takes
    gpc->lock for write), whether the hold was begun on the fast path or not."""
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    for _ in range(2):  # the first acquire takes the slow path, the second the fast one
        view = gpc.acquire(8)
        t = threading.Thread(target=mem.discard, args=(0x2000, PAGE))
        t.start()
        time.sleep(0.05)
        assert t.is_alive() and gpc.valid, "a host change went past a held pfn cache"
        view[:] = b"held-ok!"
        gpc.release()
        t.join(10)
        assert not t.is_alive() and not gpc.valid
        gpc.refresh(8)


def _acquire_error(gpc: kvmem.PfnCache, length: object) -> BaseException | None:
    """What `acquire(length)` raised; None (and the hold ended) if it succeeded."""
    try:
        gpc.acquire(length)  # type: ignore[arg-type]
    except (kvmem.KvmError, TypeError) as e:
        return e
    gpc.release()
    return None


def test_a_failed_acquire_holds_nothing(vm: kvmem.Vm) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    assert _acquire_error(gpc, 8) is None
    for bad in (-1, 4097, True, 8.0):
        e = _acquire_error(gpc, bad)
        assert isinstance(e, kvmem.KvmError if isinstance(bad, int) and
                          not isinstance(bad, bool) else TypeError), bad
    vm.set_memory_region(0, 0, 0, 0, 0)  # the slot goes: the fast check sees the generation
    e = _acquire_error(gpc, 8)
    assert isinstance(e, kvmem.KvmError) and e.errno == errno.EFAULT

    def writer_gets_in() -> None:
        with gpc.rwlock.write():
            pass

    writer = threading.Thread(target=writer_gets_in)
    writer.start()  # nothing is held: a writer gets in at once
    writer.join(5)
    assert not writer.is_alive()


def test_activate_crossing_a_page_is_einval_and_changes_nothing(vm: kvmem.Vm) -> None:
    gpc = vm.pfn_cache()
    before = state(vm, gpc)
    with pytest.raises(kvmem.KvmError) as e:
        gpc.activate(0x3ff8, 9)
    assert e.value.errno == errno.EINVAL
    assert state(vm, gpc) == before
    gpc.activate(0x3ff8, 8)  # exactly to the end of the page is fine
    assert gpc.valid
    before = state(vm, gpc)
    for bad in (9, 4096):
        with pytest.raises(kvmem.KvmError) as e:
            gpc.refresh(bad)
        assert e.value.errno == errno.EINVAL
        assert state(vm, gpc) == before
        assert not gpc.check(bad) and gpc.check(8)


def test_bad_arguments_are_typed_errors(vm: kvmem.Vm) -> None:
    gpc = vm.pfn_cache()
    with pytest.raises(TypeError):
        gpc.activate("0x1000", 8)  # type: ignore[arg-type]
    with pytest.raises(kvmem.KvmError) as e:
        gpc.activate(1 << 64, 8)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(kvmem.KvmError):
        gpc.activate(0x1000, -1)
    assert not gpc.active and not vm_list(vm, gpc)


def test_no_slot_is_efault_but_the_cache_stays_active(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    gpc = vm.pfn_cache()
    with pytest.raises(kvmem.KvmError) as e:
        gpc.activate(0x5000, 8)
    assert e.value.errno == errno.EFAULT
    assert gpc.is_gpa_active and not gpc.valid and gpc.gpa == 0x5000
    assert not gpc.check(8)
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)  # memory appears: refresh now works
    with gpc.lock(8) as view:
        view[:] = b"late-map"
    assert vm.read(0x5000, 8) == b"late-map"


def test_readonly_slot_is_efault(mem: kvmem.HostMemory, make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, RO, 0, 2 * MiB, mem.hva)
    gpc = vm.pfn_cache()
    with pytest.raises(kvmem.KvmError) as e:
        gpc.activate(0x1000, 8)
    assert e.value.errno == errno.EFAULT and "read-only" in str(e.value)


def test_slot_change_is_noticed_lazily_by_generation(vm: kvmem.Vm,
                                                      mem: kvmem.HostMemory) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    assert gpc.check(8)
    gen = gpc.generation
    # the same gpa now backed by the other half of the host memory
    vm.set_memory_region(0, 0, 0, 0, 0)
    assert gpc.valid and not gpc.check(8)  # nothing was pushed; check sees the generation
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva + 2 * MiB)
    mem.view()[2 * MiB + 0x2000:2 * MiB + 0x2008] = b"new-half"
    with gpc.lock(8) as view:
        assert bytes(view) == b"new-half"
    assert gpc.generation != gen and gpc.uhva == mem.hva + 2 * MiB + 0x2000


def test_deleted_slot_makes_lock_fail_with_efault(vm: kvmem.Vm) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    vm.set_memory_region(0, 0, 0, 0, 0)
    with pytest.raises(kvmem.KvmError) as e, gpc.lock(8):
        pass
    assert e.value.errno == errno.EFAULT
    assert gpc.active and not gpc.valid
    def writer_gets_in() -> None:
        with gpc.rwlock.write():
            pass

    writer = threading.Thread(target=writer_gets_in)
    writer.start()  # a failed lock() leaves nothing held: a writer gets in at once
    writer.join(5)
    assert not writer.is_alive()


def test_host_discard_invalidates_and_lock_refreshes(vm: kvmem.Vm,
                                                     mem: kvmem.HostMemory) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    with gpc.lock(8) as view:
        view[:] = b"01234567"
    old = gpc.frame
    mem.discard(0x2000, PAGE)
    assert not gpc.valid and gpc.stats["invalidations"] == 1
    with gpc.lock(8) as view:
        assert bytes(view) == bytes(8)
    assert gpc.frame != old and gpc.frame is not None and gpc.frame.current()
    mem.discard(0x3000, PAGE)  # another page: the cache is not touched
    assert gpc.valid and gpc.stats["invalidations"] == 1


def test_invalidation_reaches_caches_before_in_progress_rises(vm: kvmem.Vm,
                                                              mem: kvmem.HostMemory) -> None:
    seen: list[tuple[int, int]] = []
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    real = gpc.invalidate_start

    def spy(start: int, end: int) -> None:
        seen.append((vm.mmu.in_progress.load(), vm.memslots.mn_active.load()))
        real(start, end)

    gpc.invalidate_start = spy  # type: ignore[method-assign]
    mem.discard(0x2000, PAGE)
    assert seen == [(0, 1)]  # counted as in flight, MMU range not yet begun
    assert not gpc.valid


def test_hva_cache_ignores_slots_and_sees_host_changes(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()  # no slot at all: the hva is plain host memory
    gpc = vm.pfn_cache()
    gpc.activate_hva(mem.hva + 3 * MiB + 0x10, 16)
    assert gpc.is_hva_active and not gpc.is_gpa_active and gpc.gpa is None
    with gpc.lock(16) as view:
        view[:] = b"h" * 16
    assert bytes(mem.view()[3 * MiB + 0x10:3 * MiB + 0x20]) == b"h" * 16
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)  # a slot change: no effect on it
    assert gpc.check(16)
    mem.discard(3 * MiB, PAGE)
    assert not gpc.check(16)
    with gpc.lock(16) as view:
        assert bytes(view) == bytes(16)


def test_hva_cache_of_unmapped_memory_is_efault(make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    gpc = vm.pfn_cache()
    with pytest.raises(kvmem.KvmError) as e:
        gpc.activate_hva(0x1000, 8)
    assert e.value.errno == errno.EFAULT


def test_dirty_lock_marks_the_page_in_the_log(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, LOG, 0, 2 * MiB, mem.hva)
    gpc = vm.pfn_cache()
    gpc.activate(0x5000, 8)
    with gpc.lock(8) as view:
        view[:] = b"no-marks"
    assert not any(vm.get_dirty_log(0))
    with gpc.lock(8, dirty=True) as view:
        view[:] = b"marked!!"
    bitmap = vm.get_dirty_log(0)
    assert bitmap[0] == 0b100000 and not any(bitmap[1:])


def test_deactivate_forgets_the_page_keeps_the_address(vm: kvmem.Vm) -> None:
    gpc = vm.pfn_cache()
    gpc.activate(0x2000, 8)
    gpc.deactivate()
    assert not gpc.active and not gpc.valid and gpc.frame is None and not vm_list(vm, gpc)
    assert gpc.gpa == 0x2000
    with pytest.raises(kvmem.KvmError) as e, gpc.lock(8):
        pass
    assert e.value.errno == errno.EINVAL
    gpc.deactivate()  # twice is fine
    gpc.activate(0x2000, 8)
    assert gpc.check(8) and vm_list(vm, gpc)


def test_refresh_retries_when_invalidated_while_unlocked(vm: kvmem.Vm,
                                                         mem: kvmem.HostMemory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The page resolved with the lock dropped is replaced before the lock is retaken:
    the refresh must not finish with it."""
    gpc = vm.pfn_cache()
    real = host.resolve
    calls = [0]

    def racing_resolve(hva: int, write: bool) -> host.Frame | None:
        frame = real(hva, write)
        calls[0] += 1
        if calls[0] == 1:
            mem.discard(0x2000, PAGE)
        return frame

    monkeypatch.setattr(host, "resolve", racing_resolve)
    gpc.activate(0x2000, 8)
    assert calls[0] == 2 and gpc.stats["retries"] == 1
    assert gpc.frame is not None and gpc.frame.current()


def test_refresh_retries_for_memory_no_slot_maps(mem: kvmem.HostMemory,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 make_vm: Callable[..., kvmem.Vm]) -> None:
    """An invalidation of memory outside every slot does not move the MMU sequence; the
    cache's own flag still catches it (where KVM's seq check alone would not)."""
    vm = make_vm()
    gpc = vm.pfn_cache()
    real = host.resolve
    calls = [0]

    def racing_resolve(hva: int, write: bool) -> host.Frame | None:
        frame = real(hva, write)
        calls[0] += 1
        if calls[0] == 1:
            seq = vm.mmu.seq.load()
            mem.discard(0, PAGE)
            assert vm.mmu.seq.load() == seq and vm.memslots.mn_active.load() == 0
        return frame

    monkeypatch.setattr(host, "resolve", racing_resolve)
    gpc.activate_hva(mem.hva, 8)
    assert calls[0] == 2 and gpc.frame is not None and gpc.frame.current()


def test_refresh_waits_for_an_invalidation_of_its_page_in_flight(
        vm: kvmem.Vm, mem: kvmem.HostMemory) -> None:
    gpc = vm.pfn_cache()
    start, end = mem.hva + 0x2000, mem.hva + 0x3000  # the cache's page
    vm.mmu.invalidate_range_start(start, end)
    done = threading.Event()

    def refresher() -> None:
        gpc.activate(0x2000, 8)
        done.set()

    t = threading.Thread(target=refresher)
    t.start()
    time.sleep(0.05)
    assert not done.is_set()  # its page is changing: the refresh waits for the end
    vm.mmu.invalidate_range_end(start, end)
    t.join(5)
    assert done.is_set() and gpc.valid and gpc.stats["retries"] >= 1


def test_unrelated_invalidations_do_not_hold_a_refresh(vm: kvmem.Vm,
                                                       mem: kvmem.HostMemory) -> None:
    """KVM's refresh spins while any invalidation is in flight; under back-to-back host
    changes elsewhere it never finishes. kvmem's waits only for its own page."""
    start, end = mem.hva + 3 * MiB, mem.hva + 4 * MiB
    gpc = vm.pfn_cache()
    vm.mmu.invalidate_range_start(start, end)
    t = threading.Thread(target=gpc.activate, args=(0x2000, 8), daemon=True)
    try:
        t.start()
        t.join(5)
        assert not t.is_alive(), "the refresh waited for an unrelated invalidation"
        assert gpc.valid and gpc.stats["retries"] == 0
    finally:
        vm.mmu.invalidate_range_end(start, end)
        t.join(5)
    assert vm.memslots.mn_ranges.load() == () and vm.memslots.mn_active.load() == 0


def test_refresh_finishes_under_back_to_back_host_changes(vm: kvmem.Vm,
                                                          mem: kvmem.HostMemory) -> None:
    done = threading.Event()
    gpc = vm.pfn_cache()

    def refresher() -> None:
        for _ in range(200):
            gpc.activate_hva(mem.hva + 0x2000, 8)
            gpc.deactivate()
        gpc.activate(0x2000, 8)
        with gpc.lock(8) as view:
            view[:] = b"finished"
        done.set()

    t = threading.Thread(target=refresher, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    changes = 0
    while not done.is_set() and time.monotonic() < deadline:
        mem.discard(3 * MiB, PAGE)  # memory of no interest to the cache, back to back
        changes += 1
    assert done.is_set(), f"refresh starved by {changes} unrelated host changes"
    assert vm.read(0x2000, 8) == b"finished"


def test_lock_never_yields_a_stale_page_under_host_churn(mem: kvmem.HostMemory,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    vm = make_vm()
    vm.set_memory_region(0, 0, 0, 2 * MiB, mem.hva)
    gpcs = [vm.pfn_cache() for _ in range(2)]
    gpcs[0].activate(0x2000, 8)
    gpcs[1].activate_hva(mem.hva + 0x2000, 8)
    stop = threading.Event()
    uses = [0]
    errors: list[BaseException] = []

    def user(gpc: kvmem.PfnCache) -> None:
        try:
            while not stop.is_set():
                with gpc.lock(8) as view:
                    assert gpc.frame is not None and gpc.frame.current()
                    view[:] = b"written!"
                    uses[0] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(g,)) for g in gpcs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.0
    rounds = 0
    while time.monotonic() < deadline:
        (mem.discard if rounds % 2 else mem.remap)(0x2000, PAGE)
        rounds += 1
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert rounds > 50 and uses[0] > 50
    assert sum(g.stats["invalidations"] for g in gpcs) > 0


def test_refresh_distrusts_a_page_resolved_while_an_invalidation_was_in_flight(
        mem: kvmem.HostMemory, monkeypatch: pytest.MonkeyPatch,
        make_vm: Callable[..., kvmem.Vm]) -> None:
    """An invalidation began before the refresh took its snapshot, so it cannot clear the
    cache's flag; it replaces the page after the resolve and ends before the lock is
    retaken. Only "was one in flight at the snapshot?" catches it."""
    vm = make_vm()
    gpc = vm.pfn_cache()
    start, end = mem.hva, mem.hva + PAGE
    vm.mmu.invalidate_range_start(start, end)
    real = host.resolve
    calls = [0]

    def racing_resolve(hva: int, write: bool) -> host.Frame | None:
        frame = real(hva, write)
        calls[0] += 1
        if calls[0] == 1:
            mem._new_frames(0, PAGE)  # the in-flight invalidation's host change...
            vm.mmu.invalidate_range_end(start, end)  # ...and its end
        return frame

    monkeypatch.setattr(host, "resolve", racing_resolve)
    gpc.activate_hva(mem.hva, 8)
    assert calls[0] == 2 and gpc.frame is not None and gpc.frame.current()
