"""Every lock, counter, shared cell and grace period of kvmem — and nothing else.

Rules of this room:
- kvmem code never touches `threading` directly for shared state: it uses the types here.
  The concurrency checker replaces this module's classes with scheduler-aware twins, so
  every operation below is a place where another thread may run.
- The normal implementations are thin wrappers over `threading` and must stay cheap:
  an SRCU read section is one list append and one pop, `Atomic.load` is one attribute read.
  `benchmarks/bench_sync.py` measures each against the raw `threading` object or plain
  attribute access it stands for.
- A hot path may read `Atomic.value` directly (a plain attribute: no call). It means
  exactly `load()`, and the checker's twin makes it a scheduling point too, so nothing is
  lost by it; writes always go through `store`/`add`.
- `read()`/`write()`/`with` need no generator: they return small guard objects.

Theory of operation of `Srcu` (sleepable RCU, Linux's srcu_struct in miniature): a reader
registers in the list `current` — one entry per open section — *before* it loads any
published pointer, and takes its entry out of the same list when it leaves (the list is its
token). `synchronize` replaces `current` with a fresh list, then waits until the old one is
empty. A reader that registered in the old list before that check is waited for; one that
registered in it only after the check loaded its pointer after the swap, hence after the
new value was published — so once `synchronize` returns, nobody uses the old value.
Sections nest (each has its own entry). `list.append`, `list.pop` and the emptiness test
are single atomic steps under CPython's GIL, which this module relies on; no integer is
allocated on the read side, which is why this is cheaper than a pair of counters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

_get_ident = threading.get_ident

__all__ = [
    "Atomic",
    "Condition",
    "LockNotHeld",
    "Mutex",
    "RwLock",
    "Srcu",
]

T = TypeVar("T")


class LockNotHeld(AssertionError):
    """A function that requires a lock was entered without it (lockdep_assert_held)."""


class Mutex:
    """A non-recursive lock that knows its owner, so callees can assert it is held."""

    __slots__ = ("_lock", "_owner", "name")

    def __init__(self, name: str = "mutex") -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self.name = name

    def acquire(self) -> None:
        self._lock.acquire()
        self._owner = _get_ident()

    def release(self) -> None:
        self._owner = None
        self._lock.release()

    def __enter__(self) -> Mutex:
        self._lock.acquire()  # acquire(), inlined: `with` is the common use
        self._owner = _get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()

    def held(self) -> bool:
        return self._owner == _get_ident()

    def assert_held(self) -> None:
        if self._owner != _get_ident():
            raise LockNotHeld(f"{self.name} must be held here")


class _Guard:
    """A reusable, stateless context manager: `enter()` on entry, `exit()` on exit (what
    `RwLock.read()` returns; cheaper than a generator-based one)."""

    __slots__ = ("_enter", "_exit")

    def __init__(self, enter: Callable[[], None], exit: Callable[[], None]) -> None:
        self._enter = enter
        self._exit = exit

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc: object) -> None:
        self._exit()


class RwLock:
    """Many readers or one writer; writers are not starved (new readers wait for a
    waiting writer).

    The read side takes no lock while no writer holds or waits: a reader registers in the
    list `readers` (one entry per hold) and then looks at `busy` (a writer holds or waits);
    a writer sets `busy` and then waits until `readers` is empty. Under the GIL each of
    these steps is atomic and they are seen in program order, so either the reader sees
    `busy` (and steps back: `read_contended`) or the writer sees the reader (and waits for
    it). A hot path may inline the read side — `r = rw.readers; r.append(None)`, then
    `if rw.busy: rw.read_contended()` … `r.pop()`, then `if rw.busy: rw.wake_writer()` —
    which is exactly what `acquire_read` / `release_read` do; the concurrency checker's
    twin honours the same protocol."""

    __slots__ = ("_cond", "_lock", "_read", "_sleepers", "_write", "_writer",
                 "_writers_waiting", "busy", "name", "readers")

    def __init__(self, name: str = "rwlock") -> None:
        self._lock = threading.Lock()  # guards the writer fields; readers take it only
        self._cond = threading.Condition(self._lock)  # when a writer holds or waits
        self.readers: list[None] = []
        self._writer: int | None = None
        self._writers_waiting = 0
        self.busy = False  # a writer holds or waits (changed under _lock)
        self._sleepers = 0  # threads in _cond.wait(): notify only if there are any
        self.name = name
        self._read = _Guard(self.acquire_read, self.release_read)
        self._write = _Guard(self.acquire_write, self.release_write)

    def _sleep(self) -> None:
        self._sleepers += 1
        try:
            self._cond.wait()
        finally:
            self._sleepers -= 1

    def acquire_read(self) -> None:
        self.readers.append(None)
        if self.busy:
            self.read_contended()

    def read_contended(self) -> None:
        """The reader's entry met a writer: take it back (waking the writer if it waits
        for it), wait until no writer holds or waits, and register again."""
        self.readers.pop()
        with self._lock:
            if self._sleepers:
                self._cond.notify_all()
            while self.busy:
                self._sleep()
            self.readers.append(None)  # under the lock: a writer sees it when it checks

    def release_read(self) -> None:
        self.readers.pop()
        if self.busy:
            self.wake_writer()

    def wake_writer(self) -> None:
        """A reader left while a writer holds or waits: wake it if it sleeps."""
        with self._lock:
            if self._sleepers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._lock:
            self._writers_waiting += 1
            self.busy = True  # before looking at `readers`: see the class notes
            try:
                while self._writer is not None or self.readers:
                    self._sleep()
            except BaseException:  # interrupted while waiting: leave no trace
                self._writers_waiting -= 1
                self.busy = self._writer is not None or self._writers_waiting > 0
                if self._sleepers:
                    self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = _get_ident()

    def release_write(self) -> None:
        with self._lock:
            self._writer = None
            self.busy = self._writers_waiting > 0
            if self._sleepers:
                self._cond.notify_all()

    def read(self) -> AbstractContextManager[None]:
        """`with rwlock.read():` — held for read inside."""
        return self._read

    def write(self) -> AbstractContextManager[None]:
        """`with rwlock.write():` — held for write inside."""
        return self._write

    def write_held(self) -> bool:
        return self._writer == _get_ident()

    def assert_write_held(self) -> None:
        if self._writer != _get_ident():
            raise LockNotHeld(f"{self.name} must be held for write here")


class Atomic(Generic[T]):
    """A shared cell read without a lock (a published pointer, a counter, a flag).
    `load`/`store` are single reference operations; `add` is a locked read-modify-write.
    Hot paths may read `.value` instead of calling `load()` (same meaning, no call)."""

    __slots__ = ("_lock", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self._lock = threading.Lock()

    def load(self) -> T:
        return self.value

    def store(self, value: T) -> None:
        self.value = value

    def add(self, delta: int) -> int:
        with self._lock:
            new: int = self.value + delta  # type: ignore[operator]
            self.value = new  # type: ignore[assignment]
            return new


class Condition:
    """Wait for a predicate over shared state guarded by `mutex` (KVM's rcuwait / waitqueue)."""

    __slots__ = ("_cond", "_waiting", "mutex")

    def __init__(self, mutex: Mutex) -> None:
        self.mutex = mutex
        self._cond = threading.Condition(mutex._lock)
        self._waiting = 0  # threads inside wait(): changed and read with `mutex` held

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Called with `mutex` held; returns with it held once `predicate()` is true."""
        self.mutex.assert_held()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.mutex._owner = None
            self._waiting += 1
            try:
                self._cond.wait(remaining)
            finally:
                self._waiting -= 1
                self.mutex._owner = _get_ident()
        return True

    def notify_all(self) -> None:
        self.mutex.assert_held()
        if self._waiting:  # threading's notify_all costs a microsecond even with no one
            self._cond.notify_all()


class _Section:
    """`with srcu.read():` — one read section, holding its token."""

    __slots__ = ("_srcu", "_token")

    def __init__(self, srcu: Srcu) -> None:
        self._srcu = srcu
        self._token: list[None] = []

    def __enter__(self) -> None:
        self._token = self._srcu.read_lock()

    def __exit__(self, *exc: object) -> None:
        self._srcu.read_unlock(self._token)


class Srcu:
    """Sleepable RCU: cheap read sections, `synchronize` waits for readers of old data.

    `token = srcu.read_lock()` … `srcu.read_unlock(token)`, or `with srcu.read():`. A hot
    path may inline the two steps — `r = srcu.current; r.append(None)` … then `r.pop()` —
    which is exactly what the methods do; the concurrency checker's twin honours the same
    protocol (and makes both steps scheduling points)."""

    def __init__(self, name: str = "srcu") -> None:
        self.name = name
        # the readers of the current phase: one entry per open section
        self.current: list[None] = []
        self._gp_lock = threading.Lock()  # one grace period at a time
        self.grace_periods = 0

    def read_lock(self) -> list[None]:
        r = self.current
        r.append(None)  # before the caller loads any published pointer
        return r

    def read_unlock(self, token: list[None]) -> None:
        token.pop()

    def read(self) -> AbstractContextManager[None]:
        """`with srcu.read():` — a read section."""
        return _Section(self)

    def synchronize(self) -> None:
        """Return once every read section that began before this call has ended. Never
        call it inside a read section of the same Srcu: it would wait for itself."""
        with self._gp_lock:
            old = self.current
            self.current = []
            delay = 0.0
            while old:
                time.sleep(delay)
                delay = min(0.001, delay + 0.00005)
            self.grace_periods += 1


def pause() -> None:
    """Let other threads run (a retry loop's back-off; a scheduling point under the
    checker)."""
    time.sleep(0)
