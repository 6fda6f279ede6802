"""What the test files share: `refused(errno, fn, *args)` calls `fn`, expects a `KvmError`
with that errno and returns it; `GUEST_ENGINES` parametrizes a test over the engines that
run guest code (KVM skipped, with the reason, where /dev/kvm is missing; kvmem alone runs
no guest — a test that needs no guest takes conftest's `engine` fixture instead)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvmem import KvmError
from kvmem.kvmapi import kvm_available

KVM_REASON = kvm_available()
NEEDS_KVM = [pytest.mark.kvm, pytest.mark.skipif(KVM_REASON is not None,
                                                 reason=f"KVM engine: {KVM_REASON}")]
GUEST_ENGINES = [pytest.param("kvm", marks=NEEDS_KVM), "unicorn"]


def refused(err: int, fn: Callable[..., object], *args: object) -> KvmError:
    with pytest.raises(KvmError) as info:
        fn(*args)
    assert info.value.errno == err, str(info.value)
    return info.value
