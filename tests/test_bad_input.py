"""Bad input gets a clear KvmError/TypeError and leaves every slot, bitmap and generation
exactly as it was (property test)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import kvmem
from kvmem import KVM_MEM_LOG_DIRTY_PAGES as LOG

MiB = 1 << 20

_mem = kvmem.HostMemory.anonymous(8 * MiB)

bad_ints = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=1 << 64, max_value=1 << 80),
    st.just(-(1 << 70)),
)
bad_types = st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=3),
                      st.booleans(), st.lists(st.integers(), max_size=2), st.just(b"\0"))
bad = st.one_of(bad_ints, bad_types)
anything = st.one_of(bad, st.integers(min_value=0, max_value=(1 << 64) - 1))


def fresh_vm() -> kvmem.Vm:
    vm = kvmem.Vm()
    vm.enable_manual_dirty_log_protect(initially_set=True)
    vm.set_memory_region(0, LOG, 0, 2 * MiB, _mem.hva)
    vm.set_memory_region(1, 0, 4 * MiB, MiB, _mem.hva + 2 * MiB)
    vm.set_memory_region((1 << 16) | 3, LOG, 0, MiB, _mem.hva + 4 * MiB)
    vm.write(0x5000, b"dirty")
    return vm


def fingerprint(vm: kvmem.Vm) -> tuple[object, ...]:
    out = []
    for a in range(vm.address_spaces):
        slots = tuple(
            (s.id, s.base_gfn, s.npages, s.hva, s.flags,
             None if s.dirty_bitmap is None else s.dirty_bitmap.snapshot())
            for s in vm.slots(a)
        )
        out.append((vm.generation(a), slots))
    return (tuple(out), vm.manual_dirty_log_protect, vm.read(0, 2 * MiB))


CALLS = {
    "set_memory_region": 5,
    "read": 2,
    "clear": 2,
    "get_dirty_log": 1,
    "clear_dirty_log": 4,
    "hva_cache": 2,
    "enable_cap_manual_dirty_log_protect": 2,
    "create_vcpu": 1,
    "tx": 5,
}


@st.composite
def bad_call(draw: st.DrawFn) -> tuple[str, list[object]]:
    name = draw(st.sampled_from(sorted(CALLS)))
    n = CALLS[name]
    args = [draw(anything) for _ in range(n)]
    # at least one argument is certainly bad
    args[draw(st.integers(0, n - 1))] = draw(bad)
    return name, args


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(bad_call())
def test_bad_arguments_change_nothing(call: tuple[str, list[object]]) -> None:
    vm = fresh_vm()
    name, args = call
    before = fingerprint(vm)
    with pytest.raises((kvmem.KvmError, TypeError)) as info:
        if name == "tx":
            with vm.transaction() as tx:
                tx.set_memory_region(2, 0, 6 * MiB, MiB, _mem.hva)  # a good change first
                tx.set_memory_region(*args)
        elif name == "clear_dirty_log":
            vm.clear_dirty_log(args[0], args[1], args[2], args[3])  # type: ignore[arg-type]
        else:
            getattr(vm, name)(*args)
    assert str(info.value)  # says what was wrong
    if isinstance(info.value, kvmem.KvmError):
        assert info.value.errno
    assert fingerprint(vm) == before


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3),
                          st.integers(0, 16).map(lambda p: p * 0x80000),
                          st.integers(0, 8).map(lambda p: p * 0x80000),
                          st.integers(0, 3)), min_size=1, max_size=8))
def test_refused_transaction_changes_nothing(reqs: list[tuple[int, int, int, int, int]]) -> None:
    vm = fresh_vm()
    before = fingerprint(vm)
    try:
        with vm.transaction() as tx:
            for sid, flags, gpa, size, h in reqs:
                tx.set_memory_region(sid, flags, gpa, size, _mem.hva + h * MiB)
    except kvmem.TransactionError as e:
        assert 0 <= e.index < len(reqs)
        assert fingerprint(vm) == before


def test_bad_vm_arguments_open_no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmem import vm as vm_mod
    opened: list[str] = []
    monkeypatch.setattr(vm_mod, "_engine_opener", lambda name: opened.append(name))
    for kwargs in ({"max_slots": 0}, {"phys_bits": 99}, {"address_spaces": 3},
                   {"address_spaces": "2"}):
        with pytest.raises((kvmem.KvmError, TypeError)):
            kvmem.Vm(engine="unicorn", **kwargs)
    assert opened == []
