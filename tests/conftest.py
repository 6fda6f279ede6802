"""One behaviour suite on every engine (as vm-memory runs one suite on every backend).

A test that takes `make_vm` runs three times: on kvmem alone (`engine=None`), with the
Unicorn engine and with the KVM engine attached, so every slot change, access and dirty
log it checks also goes through the engine that mirrors it. What it asserts is the same on
all three: an engine must not change what a user of the Vm observes.

`make_vm(**kwargs)` is `kvmem.Vm(engine=<this run's engine>, **kwargs)`; the engines it
opened are closed at teardown. An engine offers what its host offers (the KVM engine here
may have 1 address space: no SMM), so a test that uses address space 1 asks for
`address_spaces=2`, and only such a test is skipped, with the engine's own words, where
the engine cannot offer it. The KVM runs are skipped, with the reason, where /dev/kvm is
missing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

import kvmem
import kvmem.engines  # registers the engine opener `Vm(engine=...)` uses
from kvmem.engines import ExitKind, Regs
from kvmem.guests import PORT_RESULT, program
from kvmem.kvmapi import kvm_available
from kvmem.uapi import PAGE_SIZE

KVM_REASON = kvm_available()
WALKER_CODE = 0x1000  # where `guest_writes` loads the walker (one page of code)

ENGINE_PARAMS = [
    pytest.param(None, id="none"),
    pytest.param("unicorn", id="unicorn"),
    pytest.param("kvm", id="kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(
        KVM_REASON is not None, reason=f"KVM engine: {KVM_REASON}")]),
]


@pytest.fixture(params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest) -> str | None:
    """The engine this run of the test attaches to its VMs: None, "unicorn" or "kvm"."""
    name: str | None = request.param
    return name


@pytest.fixture
def make_vm(engine: str | None) -> Iterator[Callable[..., kvmem.Vm]]:
    made: list[kvmem.Vm] = []

    def make(**kwargs: object) -> kvmem.Vm:
        try:
            vm = kvmem.Vm(engine=engine, **kwargs)  # type: ignore[arg-type]
        except kvmem.KvmError as e:
            # the Vm refuses more address spaces, or a wider guest physical address,
            # than its engine offers, naming both
            if engine is not None and e.errno == errno.EINVAL and "offers" in str(e):
                pytest.skip(f"{e.strerror}: this test needs them")
            raise
        made.append(vm)
        return vm

    yield make
    for vm in made:
        if vm.engine is not None:
            vm.engine.close()


GuestWrites = Callable[[kvmem.Vm, int, int], list[tuple[int, bytes]]]
WALKER_SEED = 0x5EED


@pytest.fixture
def guest_writes(engine: str | None) -> GuestWrites:
    """`guest_writes(vm, gpa, npages)`: the guest stores one word at the start of each of
    `npages` pages from `gpa`, and the list of those stores, [(gpa, data)], in order. With
    an engine the stores are a real guest's: the bundled walker (one pass, page stride),
    run to its halt; on kvmem alone they are the same stores through `vcpu.guest_write`.
    So a test asserts one set of observable results (memory, dirty bits, tracked writes)
    for both ways a guest writes. The walker's code is loaded first, by a host write, at
    `WALKER_CODE`, on every engine alike, so memory and dirty logs agree across engines."""
    def run(vm: kvmem.Vm, gpa: int, npages: int) -> list[tuple[int, bytes]]:
        stores = [(a, ((a ^ WALKER_SEED ^ 1) & 0xFFFF_FFFF).to_bytes(4, "little"))
                  for a in range(gpa, gpa + npages * PAGE_SIZE, PAGE_SIZE)]
        vm.write(WALKER_CODE, program("walker"))
        # the VM's vCPU 0 (the test's own, if it made one), run again and again
        cpu = next((v for v in vm.vcpus if v.id == 0), None) or vm.create_vcpu(0)
        if vm.engine is None:
            for a, data in stores:
                cpu.guest_write(a, data)
            return stores
        cpu.start(WALKER_CODE, Regs(esi=gpa, ecx=npages * PAGE_SIZE, edi=PAGE_SIZE,
                                    ebx=WALKER_SEED, ebp=1))
        exit_ = cpu.run()
        assert (exit_.kind, exit_.addr, exit_.is_write) == (ExitKind.IO, PORT_RESULT, True), \
            exit_
        exit_ = cpu.run()
        assert exit_.kind is ExitKind.HLT, exit_
        return stores

    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "engine_xfail(engine, reason): a known bug of that engine; the test's run "
                   "on it is a strict xfail, so it shows, and flips to a failure once fixed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "engine" not in callspec.params:
            continue
        for mark in item.iter_markers("engine_xfail"):
            name, reason = mark.args
            if name == callspec.params["engine"]:
                item.add_marker(pytest.mark.xfail(strict=True,
                                                  reason=f"{name} engine bug: {reason}"))


@pytest.fixture
def host() -> Iterator[Callable[[int], kvmem.HostMemory]]:
    """`host(npages)`: anonymous host memory of `npages` pages, closed at teardown."""
    made: list[kvmem.HostMemory] = []

    def make(npages: int) -> kvmem.HostMemory:
        m = kvmem.HostMemory.anonymous(npages * PAGE_SIZE)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
