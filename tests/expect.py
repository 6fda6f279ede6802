"""What a refused call must look like, shared by the test files: `refused(errno, fn, *args)`
calls `fn`, expects a `KvmError` with that errno and returns it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvmem import KvmError


def refused(err: int, fn: Callable[..., object], *args: object) -> KvmError:
    with pytest.raises(KvmError) as info:
        fn(*args)
    assert info.value.errno == err, str(info.value)
    return info.value
