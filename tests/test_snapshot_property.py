"""Nothing leaks through a reset (issue 11, point 6): random guest programs run from one
snapshot, host-side changes are mixed in, and after every `vm.restore(snap)` the memory,
the layout, the vCPU state and the dirty log are the snapshot's — hundreds of times, on
every engine.

The programs come from `program_ops`, a small generator of 32-bit flat-mode stores (single
stores of 1-4 bytes anywhere in two slots, page-crossing ones included, `rep stosb` runs
over several pages, register loads); it is the seam where the engine issue's generator
plugs in. On an engine they run as real guest code; on kvmem alone the same stores go
through `vcpu.guest_write`."""

from __future__ import annotations

import os
import random
import struct
import weakref
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmem
from kvmem.cpu.state import MSR_IA32_TSC, VcpuState
from kvmem.engines import ExitKind, Regs
from kvmem.uapi import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE

KiB = 1 << 10
CODE = 0x1000
SLOT0 = (0, 256 * KiB)  # gpa, size: code and data, logs dirty pages
SLOT1 = (0x100000, 128 * KiB)  # data
MOVED = 0x200000  # where a host change moves slot 1
EXAMPLES = int(os.environ.get("KVMEM_RESET_EXAMPLES", "200"))

Op = tuple[str, int, bytes]  # ("store", gpa, bytes) or ("reg", index, 4 bytes)


def program_ops(rng: random.Random, n: int) -> list[Op]:
    ops: list[Op] = []
    for _ in range(n):
        kind = rng.random()
        base, size = SLOT0 if rng.random() < 0.5 else SLOT1
        lo = base + (2 * PAGE_SIZE if base == 0 else 0)  # not the code pages
        if kind < 0.6:
            width = rng.choice((1, 2, 4))
            gpa = rng.randrange(lo, base + size - width + 1)
            if rng.random() < 0.2:  # across a page boundary
                gpa = min(base + size - width, (gpa | (PAGE_SIZE - 1)) - width // 2)
            ops.append(("store", gpa, rng.randbytes(width)))
        elif kind < 0.75:
            count = rng.randrange(1, 3 * PAGE_SIZE)
            gpa = rng.randrange(lo, base + size - count)
            ops.append(("store", gpa, bytes([rng.randrange(256)]) * count))
        else:
            ops.append(("reg", rng.randrange(8), rng.randbytes(4)))
    return ops


def assemble(ops: list[Op]) -> bytes:
    """32-bit flat-mode code for `ops`, ending in hlt."""
    out = bytearray()
    for kind, a, data in ops:
        if kind == "reg":
            if a == 4:  # not ESP
                continue
            out += bytes([0xB8 + a]) + data
        elif len(data) == 1:
            out += b"\xc6\x05" + struct.pack("<I", a) + data  # mov byte [a], imm8
        elif len(data) == 2:
            out += b"\x66\xc7\x05" + struct.pack("<I", a) + data  # mov word [a], imm16
        elif len(data) == 4:
            out += b"\xc7\x05" + struct.pack("<I", a) + data  # mov dword [a], imm32
        else:  # mov edi, a; mov ecx, n; mov al, v; cld; rep stosb
            out += (b"\xbf" + struct.pack("<I", a) + b"\xb9" + struct.pack("<I", len(data))
                    + b"\xb0" + data[:1] + b"\xfc\xf3\xaa")
    return bytes(out + b"\xf4")


def _no_clock(state: VcpuState) -> VcpuState:
    """The state without its clock (the TSC moves between two reads)."""
    return state.with_msrs({MSR_IA32_TSC: 0})


def _image(vm: kvmem.Vm) -> tuple[object, ...]:
    layout = tuple((s.id, s.flags, s.gpa, s.size, s.hva) for s in vm.slots())
    memory = tuple(vm.read(s.gpa, s.size) for s in vm.slots())
    return layout, memory, vm.get_dirty_log(0)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), host=st.sets(st.sampled_from(
    ["write", "discard", "move", "log_off", "raw+mark"]), max_size=2))
def test_nothing_leaks_through_a_reset(make_vm: Callable[..., kvmem.Vm], seed: int,
                                       host: set[str]) -> None:
    vm, cpu, snap, want, mems = _setup(make_vm)
    rng = random.Random(seed)
    ops = program_ops(rng, rng.randrange(1, 24))
    if cpu is None:
        vcpu = vm.vcpus[0]
        for kind, gpa, data in ops:
            if kind == "store":
                vcpu.guest_write(gpa, data)
    else:
        vm.write(CODE, assemble(ops))
        exit_ = cpu.run()
        assert exit_.kind is ExitKind.HLT, exit_
    mem0, mem1 = mems
    if "write" in host:
        vm.write(SLOT1[0] + rng.randrange(SLOT1[1] - 8), b"kvmem!!!")
    if "discard" in host:
        mem0.discard(rng.randrange(2, SLOT0[1] // PAGE_SIZE) * PAGE_SIZE, PAGE_SIZE)
    if "raw+mark" in host:
        at = rng.randrange(SLOT1[1] - 4)
        mem1.view()[at:at + 4] = b"raw!"
        vm.mark_dirty(SLOT1[0] + at, 4)
    if "move" in host:
        vm.set_memory_region(1, 0, 0, 0, 0)
        vm.set_memory_region(1, 0, MOVED, SLOT1[1], mem1.hva)
        vm.write(MOVED, b"moved")
    if "log_off" in host:
        vm.set_memory_region(0, 0, SLOT0[0], SLOT0[1], mem0.hva)
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, SLOT0[0], SLOT0[1], mem0.hva)
    vm.restore(snap)
    assert _image(vm) == want
    if cpu is not None:
        state = snap.vcpu_state(0)
        assert state is not None
        assert _no_clock(cpu.get_state()) == _no_clock(state)


Setup = tuple[kvmem.Vm, Any, kvmem.Snapshot, object, tuple[kvmem.HostMemory, kvmem.HostMemory]]
# one VM per run of the test (per `make_vm`, which closes its engine at teardown)
_vms: weakref.WeakKeyDictionary[Callable[..., kvmem.Vm], Setup] = weakref.WeakKeyDictionary()


def _setup(make_vm: Callable[..., kvmem.Vm]) -> Setup:
    """The run's VM, its vCPU (None on kvmem alone), snapshot, image and host memory."""
    key = make_vm
    if key not in _vms:
        vm = make_vm(address_spaces=1)
        mem0, mem1 = (kvmem.HostMemory.anonymous(SLOT0[1]),
                      kvmem.HostMemory.anonymous(SLOT1[1]))
        vm.enable_manual_dirty_log_protect()
        vm.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, SLOT0[0], SLOT0[1], mem0.hva)
        vm.set_memory_region(1, 0, SLOT1[0], SLOT1[1], mem1.hva)
        rng = random.Random(0)
        vm.write(SLOT0[0] + 2 * PAGE_SIZE, rng.randbytes(SLOT0[1] - 2 * PAGE_SIZE))
        vm.write(SLOT1[0], rng.randbytes(SLOT1[1] // 2))
        cpu = None
        vcpu = vm.create_vcpu(0)
        if vm.engine is not None:
            cpu = vcpu
            cpu.start(CODE, Regs())
        vm.get_dirty_log(0)
        vm.write(SLOT0[0] + 3 * PAGE_SIZE, b"dirty before the snapshot")
        snap = vm.snapshot()
        _vms[key] = (vm, cpu, snap, _image(vm), (mem0, mem1))
    return _vms[key]
