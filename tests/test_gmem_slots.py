"""guest_memfd slots on a `kvmem.Vm` (kvm-semantics §1.3, §8.2, §8.3, §8.8): what a VMM relies on
when it calls `vm.create_guest_memfd` and `vm.set_memory_region2` (or records REGION2 requests in a
transaction).

- The file belongs to the VM (its owner; the VM's MMU hears its invalidations); KVM's checks.
- REGION2's rules in KVM's order with KVM's errno: GUEST_MEMFD with LOG_DIRTY or READONLY; the V1
  call refusing the flag; offset alignment and wrap (also on a delete); an existing slot never
  takes the flag (identical, MOVE, flags-only) and never loses it — delete only; the gpa overlap
  (EEXIST) before anything about the file; then the file (EBADF for none or a closed one, EINVAL
  for host memory that is no guest_memfd, another VM's file, an offset negative as signed, a
  range past the end, pages already bound); x86 `prepare` (max gfn) after the file.
- Bindings: made with the change, dropped when the slot goes (a V1 delete too), never left behind
  by a refusal; pages keep their data across unbind/rebind; a released file leaves its slots
  installed and deletable. Without the flag, the file and offset of REGION2 are ignored.
- Transactions see the bindings their earlier changes leave (a range a deleted slot had may be
  bound again in the same batch, not before it is deleted); split and merge keep a slot's pages
  (pieces bound at shifted offsets); resize and read-only toggles go through the same checks; a
  refused batch binds and unbinds nothing.
The kernel's answers to the same calls are compared in test_gmem_differential.py.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from kvmem import HostMemory, KvmError, Transaction, TransactionError, Vm
from kvmem.gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd, SlotRef
from kvmem.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

PAGE = 4096
MiB = 1 << 20
GMEM, LOG, RO = KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
MMAP, SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
HVA = 1 << 40  # a valid user address nothing is mapped at: KVM checks only access_ok
GPA = 1 << 30


@pytest.fixture
def vm() -> Vm:
    return Vm()


@pytest.fixture
def files() -> Iterator[list[GuestMemfd]]:
    made: list[GuestMemfd] = []
    yield made
    for f in made:
        f.close()


@pytest.fixture
def gmem(vm: Vm, files: list[GuestMemfd]) -> Callable[..., GuestMemfd]:
    def make(size: int = MiB, flags: int = MMAP | SHARED, owner: Vm | None = None) -> GuestMemfd:
        f = (owner or vm).create_guest_memfd(size, flags)
        files.append(f)
        return f
    return make


def refused(err: int, fn: Callable[..., object], *args: object, **kw: object) -> KvmError:
    with pytest.raises(KvmError) as info:
        fn(*args, **kw)
    assert info.value.errno == err, str(info.value)
    return info.value


def bound(f: GuestMemfd) -> list[tuple[int, int, int, int]]:
    """(as_id, slot id, first page, pages) of every binding of `f`."""
    return [(b.slot.as_id, b.slot.id, b.pgoff, b.npages) for b in f.bindings]


def layout(vm: Vm, as_id: int = 0) -> list[tuple[int, int, int, int, int | None]]:
    """(id, base gfn, pages, flags, guest_memfd offset) of every slot."""
    return [(s.id, s.base_gfn, s.npages, s.flags, s.gmem.offset if s.gmem else None)
            for s in vm.slots(as_id)]


# -- KVM_CREATE_GUEST_MEMFD ----------------------------------------------------------------------
@pytest.mark.parametrize("flags", [0, MMAP, SHARED, MMAP | SHARED])
def test_create_guest_memfd_belongs_to_the_vm(vm: Vm, gmem: Callable[..., GuestMemfd],
                                              flags: int) -> None:
    f = gmem(8 * PAGE, flags)
    assert (f.size, f.flags, f.owner, f.invalidator) == (8 * PAGE, flags, vm, vm.mmu)


@pytest.mark.parametrize(("size", "flags"), [(0, 0), (PAGE + 1, 0), (-PAGE, 0), (PAGE, 4),
                                             (PAGE, 1 << 63)])
def test_create_guest_memfd_refuses_as_kvm(vm: Vm, size: int, flags: int) -> None:
    refused(errno.EINVAL, vm.create_guest_memfd, size, flags)


def test_an_engine_without_guest_memfd_makes_the_vm_refuse_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that does not mirror guest_memfd slots (its capabilities say so): the VM
    answers as a kernel without guest_memfd would (ENOTTY to create, EINVAL for the flag).
    The bundled engines mirror them (tests/test_gmem_engines.py)."""
    from kvmem import vm as vm_module
    from kvmem.contract import EngineCapabilities

    class Plain:
        name = "plain"
        capabilities = EngineCapabilities("plain", 2, 32764, True, True, True)

        def attach(self, vm: Vm) -> None:
            pass

    monkeypatch.setattr(vm_module, "_engine_opener", lambda name: Plain())
    vm = Vm(engine="plain")
    refused(errno.ENOTTY, vm.create_guest_memfd, MiB, 0)
    other = Vm().create_guest_memfd(MiB, 0)
    refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, GPA, PAGE, HVA, other, 0)
    other.close()


# -- REGION2: the checks before the slot set --------------------------------------------------
def test_gmem_slot_is_created_and_bound(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(3, GMEM, GPA, 16 * PAGE, HVA, f, 4 * PAGE)
    (s,) = vm.slots()
    assert (s.id, s.base_gfn, s.npages, s.flags, s.hva) == (3, GPA >> 12, 16, GMEM, HVA)
    assert s.gmem is not None and s.gmem.file is f and s.gmem.offset == 4 * PAGE
    assert s.gmem_only  # an MMAP file: guest code runs on its pages
    assert bound(f) == [(0, 3, 4, 16)]
    assert f.bindings[0].slot is s


def test_a_file_without_mmap_gives_a_slot_that_is_not_gmem_only(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem(MiB, SHARED)
    vm.set_memory_region2(1, GMEM, GPA, PAGE, HVA, f, 0)
    (s,) = vm.slots()
    assert s.gmem is not None and not s.gmem_only


@pytest.mark.parametrize("flags", [GMEM | LOG, GMEM | RO, GMEM | LOG | RO, GMEM | 8, 8])
def test_guest_memfd_slots_neither_log_nor_are_read_only(
        vm: Vm, gmem: Callable[..., GuestMemfd], flags: int) -> None:
    f = gmem()
    e = refused(errno.EINVAL, vm.set_memory_region2, 1, flags, GPA, PAGE, HVA, f, 0)
    assert "not supported" in e.message
    assert vm.slots() == [] and f.bindings == ()


def test_read_only_and_logging_stay_valid_without_the_flag(vm: Vm) -> None:
    vm.set_memory_region2(1, LOG | RO, GPA, PAGE, HVA)
    assert layout(vm) == [(1, GPA >> 12, 1, LOG | RO, None)]


def test_the_v1_call_refuses_the_flag_first(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    gmem()
    e = refused(errno.EINVAL, vm.set_memory_region, 1, GMEM, GPA, PAGE, HVA)
    assert "REGION2" in e.message
    # before the slot id check, which would also refuse
    e = refused(errno.EINVAL, vm.set_memory_region, 40000, GMEM, GPA, PAGE, HVA)
    assert "REGION2" in e.message


@pytest.mark.parametrize(("gpa", "size", "hva"), [(GPA + 1, PAGE, HVA), (GPA, PAGE + 1, HVA),
                                                  (GPA, PAGE, HVA + 8), (GPA, PAGE, 1 << 63)])
def test_size_gpa_and_hva_are_checked_for_gmem_slots_too(
        vm: Vm, gmem: Callable[..., GuestMemfd], gpa: int, size: int, hva: int) -> None:
    refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, gpa, size, hva, gmem(), 0)


@pytest.mark.parametrize(("offset", "why"), [(1, "page-aligned"), (PAGE - 1, "page-aligned"),
                                             ((1 << 64) - PAGE, "wraps")])
def test_offset_alignment_and_wrap(vm: Vm, gmem: Callable[..., GuestMemfd], offset: int,
                                   why: str) -> None:
    f = gmem()
    e = refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, GPA, 2 * PAGE, HVA, f, offset)
    assert why in e.message
    # checked before the address space (which is also wrong here)
    e = refused(errno.EINVAL, vm.set_memory_region2, 7 << 16 | 1, GMEM, GPA, 2 * PAGE, HVA, f,
                offset)
    assert why in e.message


def test_offset_rules_apply_to_a_delete_with_the_flag(vm: Vm,
                                                      gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, PAGE, HVA, f, 0)
    refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, 0, 0, 0, f, 8)
    assert len(vm.slots()) == 1
    # the file is not looked at by a delete: none, or a closed one, will do
    vm.set_memory_region2(1, GMEM, 0, 0, 0, None, 0)
    assert vm.slots() == [] and f.bindings == ()


def test_region2_without_the_flag_ignores_file_and_offset(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    f.close()
    vm.set_memory_region2(1, 0, GPA, PAGE, HVA, f, 12345)
    vm.set_memory_region2(2, LOG, GPA + PAGE, PAGE, HVA, HostMemory.anonymous(PAGE), 1)
    assert [s.gmem for s in vm.slots()] == [None, None]
    vm.set_memory_region2(1, 0, GPA, PAGE, HVA, None, 7)  # identical: a no-op
    assert len(vm.slots()) == 2


def test_the_file_argument_must_be_a_file(vm: Vm) -> None:
    with pytest.raises(TypeError, match="guest_memfd"):
        vm.set_memory_region2(1, GMEM, GPA, PAGE, HVA, 3, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="guest_memfd"):
        vm.transaction().set_memory_region2(1, GMEM, GPA, PAGE, HVA, "f", 0)  # type: ignore[arg-type]


# -- REGION2: an existing slot ----------------------------------------------------------------
def test_a_gmem_slot_is_immutable_delete_only(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
    before = (layout(vm), bound(f), vm.generation())
    for args in [
        (1, GMEM, GPA, 4 * PAGE, HVA, f, 0),           # identical
        (1, GMEM, GPA + MiB, 4 * PAGE, HVA, f, 0),     # MOVE
        (1, GMEM, GPA, 4 * PAGE, HVA, f, 8 * PAGE),    # another offset
        (1, 0, GPA, 4 * PAGE, HVA, None, 0),           # dropping the flag
        (1, LOG, GPA, 4 * PAGE, HVA, None, 0),         # flags-only, dropping the flag
        (1, 0, GPA + MiB, 4 * PAGE, HVA, None, 0),     # MOVE, dropping the flag
    ]:
        e = refused(errno.EINVAL, vm.set_memory_region2, *args)
        assert "guest_memfd" in e.message
    refused(errno.EINVAL, vm.set_memory_region, 1, 0, GPA, 4 * PAGE, HVA)
    refused(errno.EINVAL, vm.set_memory_region, 1, LOG, GPA, 4 * PAGE, HVA)
    assert (layout(vm), bound(f), vm.generation()) == before
    vm.set_memory_region(1, 0, 0, 0, 0)  # delete through V1 works, and unbinds
    assert vm.slots() == [] and f.bindings == ()


def test_an_existing_plain_slot_never_takes_the_flag(vm: Vm,
                                                     gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region(1, 0, GPA, PAGE, HVA)
    e = refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, GPA, PAGE, HVA, f, 0)
    assert "only be created" in e.message
    assert f.bindings == () and layout(vm) == [(1, GPA >> 12, 1, 0, None)]


# -- REGION2: the overlap, then the file, then x86 prepare -----------------------------------
def test_gpa_overlap_is_eexist_before_the_file_is_looked_at(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    other = Vm().create_guest_memfd(MiB, 0)
    vm.set_memory_region(1, 0, GPA, 4 * PAGE, HVA)
    closed = gmem()
    closed.close()
    for file, offset in [(f, 0), (closed, 0), (other, 0), (None, 0), (f, 1 << 63), (f, MiB)]:
        refused(errno.EEXIST, vm.set_memory_region2, 2, GMEM, GPA + PAGE, PAGE, HVA, file,
                offset)
    other.close()
    assert f.bindings == ()


def test_the_file_is_judged_as_kvm_judges_the_fd(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem(16 * PAGE)
    closed = gmem()
    closed.close()
    keep = gmem(MiB, MMAP | SHARED)
    mapping = keep.mmap()
    keep.close()  # the file lives on in its mapping, but its fd is gone
    host_memfd = HostMemory.memfd(MiB)
    gone_memfd = HostMemory.memfd(MiB)
    gone_memfd.close()
    foreign_vm = Vm()
    foreign = foreign_vm.create_guest_memfd(MiB, 0)
    cases: list[tuple[object, int, int, int, str]] = [
        (None, 0, 1, errno.EBADF, "no open"),
        (closed, 0, 1, errno.EBADF, "closed"),
        (keep, 0, 1, errno.EBADF, "closed"),
        (gone_memfd, 0, 1, errno.EBADF, "no open"),
        (host_memfd, 0, 1, errno.EINVAL, "not a guest_memfd"),
        (mapping, 0, 1, errno.EINVAL, "not a guest_memfd"),
        (foreign, 0, 1, errno.EINVAL, "another VM"),
        (f, 1 << 63, 1, errno.EINVAL, "negative"),
        (f, (1 << 64) - 2 * PAGE, 1, errno.EINVAL, "negative"),
        (f, 16 * PAGE, 1, errno.EINVAL, "end of the file"),   # offset == size
        (f, 15 * PAGE, 2, errno.EINVAL, "end of the file"),
        (f, 0, 17, errno.EINVAL, "end of the file"),
    ]
    for file, offset, npages, err, why in cases:
        e = refused(err, vm.set_memory_region2, 1, GMEM, GPA, npages * PAGE, HVA, file, offset)
        assert why in e.message, (file, e.message)
    assert vm.slots() == [] and f.bindings == ()
    vm.set_memory_region2(1, GMEM, GPA, 16 * PAGE, HVA, f, 0)  # the whole file: fine
    for m in (mapping, host_memfd):
        m.close()
    foreign.close()


def test_pages_bound_to_another_slot_are_einval_not_eexist(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem(8 * MiB)
    vm.set_memory_region2(10, GMEM, GPA, 4 * MiB, HVA, f, 0)
    vm.set_memory_region2(11, GMEM, 2 * GPA, 4 * MiB, HVA, f, 4 * MiB)
    e = refused(errno.EINVAL, vm.set_memory_region2, 12, GMEM, 4 * GPA, PAGE, HVA, f,
                4 * MiB - PAGE)
    assert "overlap" in e.message
    # disjoint pages of one file may back slots anywhere, in any order, in any address space
    vm.set_memory_region(10, 0, 0, 0, 0)
    vm.set_memory_region2(1 << 16 | 10, GMEM, 0, PAGE, HVA, f, 3 * MiB)
    vm.set_memory_region2(12, GMEM, 8 * GPA, 2 * PAGE, HVA, f, PAGE)
    assert bound(f) == [(0, 12, 1, 2), (1, 10, 768, 1), (0, 11, 1024, 1024)]


def test_selftest_recreate_next_to_a_bound_neighbour_is_eexist(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    """set_memory_region_test: slot10 [G, G+4M) at 0, slot11 [2G, 2G+4M) at 4M; delete slot10;
    recreating it 2 MiB below or above 2G (4 MiB at offset 0) is EEXIST — the gpa overlap with
    slot11 is found before the file's pages are looked at."""
    G = 1 << 30
    f = gmem(8 * MiB)
    vm.set_memory_region2(10, GMEM, G, 4 * MiB, HVA, f, 0)
    vm.set_memory_region2(11, GMEM, 2 * G, 4 * MiB, HVA, f, 4 * MiB)
    vm.set_memory_region2(10, GMEM, 0, 0, 0, f, 0)
    for gpa in (2 * G - 2 * MiB, 2 * G + 2 * MiB):
        refused(errno.EEXIST, vm.set_memory_region2, 10, GMEM, gpa, 4 * MiB, HVA, f, 0)


def test_the_file_is_judged_before_the_max_gfn(gmem: Callable[..., GuestMemfd]) -> None:
    vm = Vm(phys_bits=40)
    f = vm.create_guest_memfd(MiB, 0)
    top = 1 << 40
    refused(errno.EBADF, vm.set_memory_region2, 1, GMEM, top, PAGE, HVA, None, 0)
    refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, top, PAGE, HVA, f, MiB)  # past EOF
    e = refused(errno.EINVAL, vm.set_memory_region2, 1, GMEM, top, PAGE, HVA, f, 0)
    assert "maximum gfn" in e.message
    assert f.bindings == () and vm.slots() == []  # the refusal left no binding behind
    vm.set_memory_region2(1, GMEM, top - PAGE, PAGE, HVA, f, 0)
    f.close()


# -- bindings over the slot's life ---------------------------------------------------------------
def test_a_refusal_changes_nothing(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
    before = (layout(vm), bound(f), vm.generation(), vm.memslots.nr_pages)
    refused(errno.EINVAL, vm.set_memory_region2, 2, GMEM, 2 * GPA, 4 * PAGE, HVA, f, 2 * PAGE)
    refused(errno.EEXIST, vm.set_memory_region2, 2, GMEM, GPA, 4 * PAGE, HVA, f, 8 * PAGE)
    refused(errno.EINVAL, vm.set_memory_region2, 2, GMEM, 1 << 60, 4 * PAGE, HVA, f, 8 * PAGE)
    assert (layout(vm), bound(f), vm.generation(), vm.memslots.nr_pages) == before


def test_data_survive_unbinding_and_follow_the_offset(vm: Vm,
                                                      gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    f.page_view(5)[:4] = b"five"
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, HVA, f, 0)
    vcpu = vm.create_vcpu(0)
    assert vcpu.guest_read(GPA + 5 * PAGE, 4) == b"five"
    vm.set_memory_region2(1, GMEM, 0, 0, 0, None, 0)
    vm.set_memory_region2(2, GMEM, 2 * GPA, 2 * PAGE, HVA, f, 4 * PAGE)
    assert vcpu.guest_read(2 * GPA + PAGE, 4) == b"five"


def test_a_released_file_leaves_its_slots_installed_and_deletable(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
    f.close()
    assert f.released and f.bindings == ()
    assert layout(vm) == [(1, GPA >> 12, 4, GMEM, 0)]
    # a new slot cannot name the file any more; the old one goes as any slot does
    refused(errno.EBADF, vm.set_memory_region2, 2, GMEM, 2 * GPA, PAGE, HVA, f, 8 * PAGE)
    vm.set_memory_region(1, 0, 0, 0, 0)
    assert vm.slots() == []


def test_an_open_mapping_keeps_the_bindings_after_close(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
    m = f.mmap()
    f.close()
    assert bound(f) == [(0, 1, 0, 4)]
    m.close()
    assert f.released and f.bindings == ()


# -- transactions ------------------------------------------------------------------------------
def test_a_batch_may_rebind_what_it_deleted_before(vm: Vm,
                                                   gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, HVA, f, 0)
    with vm.transaction() as tx:
        tx.delete(1)
        tx.set_memory_region2(2, GMEM, 2 * GPA, 4 * PAGE, HVA, f, 4 * PAGE)
        tx.set_memory_region2(3, GMEM, 3 * GPA, 4 * PAGE, HVA, f, 0)
    assert bound(f) == [(0, 3, 0, 4), (0, 2, 4, 4)]
    assert [s.id for s in vm.slots()] == [2, 3]


def test_a_batch_may_not_bind_before_it_deletes(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, HVA, f, 0)
    before = (layout(vm), bound(f), vm.generation())
    tx = vm.transaction()
    tx.set_memory_region2(2, GMEM, 2 * GPA, 4 * PAGE, HVA, f, 4 * PAGE)
    tx.delete(1)
    with pytest.raises(TransactionError) as info:
        tx.commit()
    assert (info.value.index, info.value.errno) == (0, errno.EINVAL)
    assert (layout(vm), bound(f), vm.generation()) == before


def test_a_refused_batch_binds_and_unbinds_nothing(vm: Vm,
                                                   gmem: Callable[..., GuestMemfd]) -> None:
    f, g = gmem(), gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, HVA, f, 0)
    before = (layout(vm), bound(f), bound(g), vm.generation())
    tx = vm.transaction()
    tx.delete(1)
    tx.set_memory_region2(2, GMEM, 2 * GPA, 4 * PAGE, HVA, g, 0)
    tx.set_memory_region2(3, GMEM, 3 * GPA, 4 * PAGE, HVA, f, 0)
    tx.set_memory_region2(4, GMEM, 4 * GPA, 4 * PAGE, HVA, g, 2 * PAGE)  # overlaps slot 2
    with pytest.raises(TransactionError) as info:
        tx.commit()
    assert (info.value.index, info.value.errno) == (3, errno.EINVAL)
    assert (layout(vm), bound(f), bound(g), vm.generation()) == before


def test_created_then_deleted_in_one_batch_leaves_no_binding(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    with vm.transaction() as tx:
        tx.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
        tx.delete(1)
        tx.set_memory_region2(2, GMEM, 2 * GPA, 4 * PAGE, HVA, f, 0)
    assert bound(f) == [(0, 2, 0, 4)]


def test_split_keeps_each_piece_on_its_own_pages(vm: Vm,
                                                 gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 16 * PAGE, HVA, f, 8 * PAGE)
    vcpu = vm.create_vcpu(0)
    for i in range(16):
        vcpu.guest_write(GPA + i * PAGE, bytes([i + 1]))
    with vm.transaction() as tx:
        pieces = tx.split(1, [GPA + 4 * PAGE, GPA + 5 * PAGE], ids=[7, 9])
    assert pieces == [1, 7, 9]
    assert layout(vm) == [(1, GPA >> 12, 4, GMEM, 8 * PAGE),
                          (7, (GPA >> 12) + 4, 1, GMEM, 12 * PAGE),
                          (9, (GPA >> 12) + 5, 11, GMEM, 13 * PAGE)]
    assert bound(f) == [(0, 1, 8, 4), (0, 7, 12, 1), (0, 9, 13, 11)]
    assert [vcpu.guest_read(GPA + i * PAGE, 1)[0] for i in range(16)] == list(range(1, 17))
    assert [s.hva for s in vm.slots()] == [HVA, HVA + 4 * PAGE, HVA + 5 * PAGE]


def test_merge_needs_contiguous_pages_of_one_file(vm: Vm,
                                                  gmem: Callable[..., GuestMemfd]) -> None:
    f, g = gmem(), gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
    vm.set_memory_region2(2, GMEM, GPA + 4 * PAGE, 4 * PAGE, HVA + 4 * PAGE, f, 4 * PAGE)
    vm.set_memory_region2(3, GMEM, GPA + 8 * PAGE, 4 * PAGE, HVA + 8 * PAGE, f, 12 * PAGE)
    vm.set_memory_region2(4, GMEM, GPA + 12 * PAGE, 4 * PAGE, HVA + 12 * PAGE, g, 16 * PAGE)
    vm.set_memory_region(5, 0, GPA + 16 * PAGE, 4 * PAGE, HVA + 16 * PAGE)
    for parts in ([2, 3], [3, 4]):  # a gap in the file; two files
        e = refused(errno.EINVAL, vm.transaction().merge, parts)
        assert "guest_memfd" in e.message
    refused(errno.EINVAL, vm.transaction().merge, [4, 5])  # a plain slot: other flags
    with vm.transaction() as tx:
        assert tx.merge([2, 1]) == 1
    assert layout(vm)[0] == (1, GPA >> 12, 8, GMEM, 0)
    assert bound(f) == [(0, 1, 0, 8), (0, 3, 12, 4)]


def test_split_then_merge_in_one_batch_is_the_slot_again(
        vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 8 * PAGE, HVA, f, 4 * PAGE)
    with vm.transaction() as tx:
        pieces = tx.split(1, [GPA + 2 * PAGE])
        tx.merge(pieces)
    assert layout(vm) == [(1, GPA >> 12, 8, GMEM, 4 * PAGE)]
    assert bound(f) == [(0, 1, 4, 8)]


def test_resize_and_read_only_go_through_the_rules(vm: Vm,
                                                   gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem(16 * PAGE)
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 8 * PAGE)
    with vm.transaction() as tx:
        tx.resize(1, 8 * PAGE)
    assert bound(f) == [(0, 1, 8, 8)]
    changes: list[Callable[[Transaction], object]] = [
        lambda tx: tx.resize(1, 9 * PAGE),       # past the end of the file
        lambda tx: tx.set_readonly(1, True),     # GUEST_MEMFD | READONLY
    ]
    for change in changes:
        tx = vm.transaction()
        change(tx)
        with pytest.raises(TransactionError) as info:
            tx.commit()
        assert (info.value.index, info.value.errno) == (1, errno.EINVAL)
    assert bound(f) == [(0, 1, 8, 8)] and layout(vm) == [(1, GPA >> 12, 8, GMEM, 8 * PAGE)]


def test_replace_layout_drops_gmem_slots(vm: Vm, gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem()
    vm.set_memory_region2(1, GMEM, GPA, 4 * PAGE, HVA, f, 0)
    with vm.transaction() as tx:
        tx.replace_layout(0, [(2, 0, GPA, 4 * PAGE, HVA)])
    assert layout(vm) == [(2, GPA >> 12, 4, 0, None)] and f.bindings == ()


# -- the file's side of the update path ------------------------------------------------------
def test_check_bind_sees_the_batch_and_rebind_swaps_in_one_step(
        gmem: Callable[..., GuestMemfd]) -> None:
    f = gmem(16 * PAGE)
    vm = f.owner
    a, b, c = SlotRef(0, 1, 0, 8), SlotRef(0, 2, 100, 4), SlotRef(0, 3, 200, 8)
    f.bind(a, 0, owner=vm)
    refused(errno.EINVAL, f.check_bind, b, 4 * PAGE, owner=vm)
    f.check_bind(b, 4 * PAGE, owner=vm, leaving=[a])
    e = refused(errno.EINVAL, f.check_bind, c, 0, owner=vm, leaving=[a], coming=[(b, 4 * PAGE)])
    assert "slot 0:2" in e.message
    assert bound(f) == [(0, 1, 0, 8)]  # checks change nothing
    f.rebind([a], [(b, 4 * PAGE), (c, 8 * PAGE)])
    assert bound(f) == [(0, 2, 4, 4), (0, 3, 8, 8)]
    with pytest.raises(KvmError):  # a clash is refused whole: nothing of it is made
        f.rebind([b], [(a, 0), (SlotRef(0, 4, 300, 2), 9 * PAGE)])
    assert bound(f) == [(0, 2, 4, 4), (0, 3, 8, 8)]


def test_rebind_on_a_released_file_does_nothing(gmem: Callable[..., GuestMemfd]) -> None:
    """A file released between a request's checks and its commit (its fd closed by another
    thread): the binding is not made — release would have dropped it, as it drops KVM's when
    the fd is closed after fget — and its slot's faults fail."""
    f = gmem()
    f.close()
    f.rebind([], [(SlotRef(0, 1, 0, 1), 0)])
    assert f.bindings == ()
