"""The one argument checker of kvmem's public entry points.

Rules of this room:
- Every public method checks its arguments here, *before* it takes a lock or changes
  anything, so a refused call leaves every piece of state exactly as it was.
- An integer is an `int` and not a `bool` (`True` is not slot 1); a boolean is a `bool`
  (not any truthy object); bytes are anything that exports a buffer.
- A value that would travel in a fixed-width ioctl field (KVM's u16 / u32 / u64) and does
  not fit it is refused with `KvmError(EINVAL)`, as a C caller could never have sent it;
  the message names the argument and its value. A wrong type is a `TypeError` naming the
  argument and the type it got.

Nothing here knows about slots, VMs or memory: only Python values.
"""

from __future__ import annotations

import errno

from .errors import KvmError
from .uapi import U64_MAX

__all__ = ["as_bool", "as_bytes", "as_int", "as_u", "as_u16", "as_u32", "as_u64", "check_range",
           "check_span", "positive"]


def as_int(name: str, v: object) -> int:
    """`v` if it is an int (and not a bool), else TypeError naming `name`."""
    if type(v) is int:
        return v
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__} ({v!r:.40})")
    return int(v)


def as_u(name: str, v: object, bits: int) -> int:
    """An int that fits an unsigned field of `bits` bits."""
    if type(v) is not int:
        v = as_int(name, v)
    if v < 0 or v >> bits:
        raise KvmError(errno.EINVAL, f"{name} {v:#x} does not fit the ioctl's "
                                     f"{bits}-bit field")
    return v


def as_u16(name: str, v: object) -> int:
    return as_u(name, v, 16)


def as_u32(name: str, v: object) -> int:
    return as_u(name, v, 32)


def as_u64(name: str, v: object) -> int:
    return as_u(name, v, 64)


def positive(name: str, v: object, bits: int = 64) -> int:
    """A u`bits` that is not zero (a size that must hold something)."""
    v = as_u(name, v, bits)
    if v == 0:
        raise KvmError(errno.EINVAL, f"{name} must not be 0")
    return v


def as_bool(name: str, v: object) -> bool:
    """`v` if it is a bool; truthiness is not accepted (None or "yes" is not a flag)."""
    if type(v) is not bool:
        raise TypeError(f"{name} must be a bool, not {type(v).__name__} ({v!r:.40})")
    return v


def as_bytes(name: str, data: object) -> memoryview:
    """Any bytes-like object as a flat, C-contiguous memoryview of bytes."""
    if data.__class__ is bytes or data.__class__ is bytearray:  # the common case, first
        return memoryview(data)
    if not isinstance(data, memoryview):
        try:
            data = memoryview(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be bytes-like, not {type(data).__name__}") from None
    if not data.c_contiguous:
        return memoryview(data.tobytes())
    return data if data.format == "B" and data.ndim == 1 else data.cast("B")


def check_range(gpa: object, n: object, name: str = "length") -> tuple[int, int]:
    """A (gpa, length) pair: ints, the gpa a 64-bit guest physical address, the length an
    unsigned long (KVM's accessors take one). The range may run past 2^64: an access stops
    with EFAULT where the address space ends, as at any other hole."""
    gpa, n = as_int("gpa", gpa), as_int(name, n)
    if gpa < 0 or gpa > U64_MAX:
        raise KvmError(errno.EINVAL, f"gpa {gpa:#x} is not a 64-bit guest physical address")
    if n < 0 or n > U64_MAX:
        raise KvmError(errno.EINVAL, f"{name} {n:#x} does not fit an unsigned long")
    return gpa, n


def check_span(gpa: object, n: object, name: str = "length") -> tuple[int, int]:
    """`check_range`, and the range must end by 2^64: for a call that would otherwise change
    memory up to the top of the address space before it noticed (`clear`)."""
    gpa, n = check_range(gpa, n, name)
    if gpa + n > U64_MAX + 1:
        raise KvmError(errno.EINVAL, f"{name} {n:#x} at gpa {gpa:#x} runs past the end of "
                                     "the 64-bit guest physical address space")
    return gpa, n
