"""Every lock, counter, shared cell and grace period of kvmem — and nothing else.

Rules of this room:
- kvmem code never touches `threading` directly for shared state: it uses the types here.
  The concurrency checker replaces this module's classes with scheduler-aware twins, so
  every operation below is a place where another thread may run.
- The normal implementations are thin wrappers over `threading` and must stay cheap:
  the SRCU read side is two attribute stores, `Atomic.load` is one attribute read.
  `benchmarks/bench_sync.py` measures each against the raw `threading` object or plain
  attribute access it stands for.
- A hot path may read `Atomic.value` directly (a plain attribute: no call). It means
  exactly `load()`, and the checker's twin makes it a scheduling point too, so nothing is
  lost by it; writes always go through `store`/`add`.
- `read()`/`write()`/`with` need no generator: they return small guard objects.

Theory of operation of `Srcu` (sleepable RCU, user-space flavour):
each reader thread owns a record `(nesting, phase)`. `read_lock` stamps the record with the
current phase *before* the reader loads any published pointer; `synchronize` advances the
phase and waits until no record is inside a read section stamped with an older phase. A
reader that entered after the advance can only have loaded what was published before the
advance, i.e. the new value — so once `synchronize` returns, nobody uses the old one.
"""

from __future__ import annotations

import threading
import time
import weakref
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
    `RwLock.read()` and friends return; cheaper than a generator-based one)."""

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
    waiting writer)."""

    __slots__ = ("_cond", "_lock", "_read", "_readers", "_sleepers", "_write", "_writer",
                 "_writers_waiting", "name")

    def __init__(self, name: str = "rwlock") -> None:
        self._lock = threading.Lock()  # guards the counts; uncontended paths take only it
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer: int | None = None
        self._writers_waiting = 0
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
        with self._lock:
            while self._writer is not None or self._writers_waiting:
                self._sleep()
            self._readers += 1

    def release_read(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0 and self._sleepers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._lock:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._sleep()
            finally:
                self._writers_waiting -= 1
            self._writer = _get_ident()

    def release_write(self) -> None:
        with self._lock:
            self._writer = None
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

    __slots__ = ("_cond", "mutex")

    def __init__(self, mutex: Mutex) -> None:
        self.mutex = mutex
        self._cond = threading.Condition(mutex._lock)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Called with `mutex` held; returns with it held once `predicate()` is true."""
        self.mutex.assert_held()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.mutex._owner = None
            try:
                self._cond.wait(remaining)
            finally:
                self.mutex._owner = _get_ident()
        return True

    def notify_all(self) -> None:
        self.mutex.assert_held()
        self._cond.notify_all()


class _Reader:
    __slots__ = ("__weakref__", "nesting", "phase", "thread")

    def __init__(self) -> None:
        self.nesting = 0
        self.phase = 0
        self.thread = weakref.ref(threading.current_thread())


class Srcu:
    """Sleepable RCU: cheap read sections, `synchronize` waits for readers of old data."""

    def __init__(self, name: str = "srcu") -> None:
        self.name = name
        self._phase = 1
        self._local = threading.local()
        self._readers: list[_Reader] = []
        self._registry = threading.Lock()
        self._gp_lock = threading.Lock()  # one grace period at a time
        self._cond = threading.Condition(threading.Lock())
        self._waiting = False
        self.grace_periods = 0
        self._read = _Guard(self.read_lock, self.read_unlock)

    def _record(self) -> _Reader:
        rec = _Reader()
        self._local.rec = rec
        with self._registry:
            self._readers = [r for r in self._readers if _alive(r)] + [rec]
        return rec

    def read_lock(self) -> None:
        try:
            rec: _Reader = self._local.rec
        except AttributeError:
            rec = self._record()
        if rec.nesting == 0:
            # stamp the phase before the caller loads any published pointer
            rec.phase = self._phase
        rec.nesting += 1

    def read_unlock(self) -> None:
        rec: _Reader = self._local.rec
        rec.nesting -= 1
        if rec.nesting == 0 and self._waiting:
            with self._cond:
                self._cond.notify_all()

    def read(self) -> AbstractContextManager[None]:
        """`with srcu.read():` — a read section."""
        return self._read

    def in_read_section(self) -> bool:
        rec: _Reader | None = getattr(self._local, "rec", None)
        return rec is not None and rec.nesting > 0

    def synchronize(self) -> None:
        """Return once every read section that began before this call has ended."""
        if self.in_read_section():
            raise RuntimeError(f"{self.name}: synchronize inside a read section would deadlock")
        with self._gp_lock:
            self._phase += 1
            new_phase = self._phase
            with self._registry:
                readers = list(self._readers)
            self._waiting = True
            try:
                with self._cond:
                    for rec in readers:
                        while rec.nesting > 0 and rec.phase != new_phase and _alive(rec):
                            self._cond.wait(0.001)
            finally:
                self._waiting = False
            self.grace_periods += 1


def _alive(rec: _Reader) -> bool:
    thread = rec.thread()
    return thread is not None and thread.is_alive()


def pause() -> None:
    """Let other threads run (a retry loop's back-off; a scheduling point under the
    checker)."""
    time.sleep(0)
