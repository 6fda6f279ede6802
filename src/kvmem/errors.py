"""kvmem's exceptions: every refusal carries the errno KVM returns for the same call.

Defines:
- `KvmError` — an `OSError` whose `errno` is KVM's answer and whose message names the rule.
- `GuestAccessError` — an accessor stopped at a gpa it could not reach; carries the gpa and
  how many bytes were done before it (what rust-vmm calls a partial access).
- `TransactionError` — a batched update was refused; carries the index of the change that
  broke a rule. Nothing of the batch was applied.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["GuestAccessError", "KvmError", "TransactionError"]


class KvmError(OSError):
    """A refusal with the errno KVM returns for the same request."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"[{name}] {self.message}"

    def __reduce__(self) -> tuple[type[KvmError], tuple[int, str]]:
        return (type(self), (self.errno or 0, self.message))


class GuestAccessError(KvmError):
    """An access reached a gpa that is not backed (no slot, invalid, read-only for a write,
    or host memory unreachable). `gpa` is the first byte that failed, `done` the bytes
    transferred before it — earlier pages stay written, as in KVM."""

    def __init__(self, err: int, message: str, gpa: int, done: int) -> None:
        super().__init__(err, message)
        self.gpa = gpa
        self.done = done
        self.partial: bytes = b""  # for reads: the bytes read before the failure

    def __reduce__(self) -> tuple[type[GuestAccessError], tuple[int, str, int, int]]:  # type: ignore[override]
        return (type(self), (self.errno or 0, self.message, self.gpa, self.done))


class TransactionError(KvmError):
    """A change of a transaction was refused; `index` is its position in the batch and
    `cause` the refusal it got. The batch was not applied."""

    def __init__(self, index: int, cause: KvmError) -> None:
        super().__init__(cause.errno or _errno.EINVAL, f"change #{index}: {cause.message}")
        self.index = index
        self.cause = cause

    def __reduce__(self) -> tuple[type[TransactionError], tuple[int, KvmError]]:  # type: ignore[override]
        return (type(self), (self.index, self.cause))
