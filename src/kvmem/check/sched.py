"""The deterministic scheduler and the scheduler-aware twins of `kvmem.sync`.

Rules of this room:
- A scenario's threads are real OS threads (pooled), but only one runs at a time: each
  waits on its own gate (a lock used as a binary semaphore), and the running thread hands
  the baton on at a *scheduling point* — the start of every operation of a twin
  (`Mutex.acquire`, `Atomic.load`, `Srcu.read_lock`, reading `Atomic.value`, `pause` ...)
  and a `world_event` (the host replacing pages). Code between two points runs
  atomically, so an execution is a function of the choices made at the points.
- A thread never blocks for real on a twin: it declares what it waits for (a predicate
  over twin state) and the scheduler does not pick it until the predicate holds. If no
  thread can be picked and some have not finished, that is a deadlock.
- A thread that calls `pause` (a retry loop's back-off) yields and is not picked again
  until another thread has done something that may change shared state (anything but a
  load) — or, once per pause, when nobody else can run. So busy waits end, and a thread
  that pauses twice with nothing changed in between is reported (a livelock).
- Outside an execution (a scenario's set-up and final check) one thread runs alone and the
  twins act directly, never blocking.

`Execution` runs one schedule: it follows a given list of choices (a replay or the prefix
of a depth-first search) and then a default policy — keep running the current thread while
it can run, else the lowest-numbered one that can — and records every choice point it
passes, so `explore` can come back and choose differently.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from .. import sync

__all__ = [
    "Atomic",
    "ChoicePoint",
    "Condition",
    "Execution",
    "Mutex",
    "RwLock",
    "Srcu",
    "Step",
    "pause",
]

T = TypeVar("T")
_MAIN = -1  # the owner id of the single thread outside an execution


class _Abort(BaseException):
    """Unwinds a scenario thread when its execution stops (failure found, deadlock)."""


@dataclass(frozen=True, slots=True)
class ChoicePoint:
    """A point where more than one thread could run: who could, who was running (None if
    it could not go on: blocked, paused or finished), and preemptions spent before it."""

    enabled: tuple[int, ...]
    current: int | None
    preemptions: int

    def cost(self, choice: int) -> int:
        """Preemptions spent after choosing `choice` here."""
        return self.preemptions + (self.current is not None and choice != self.current)


@dataclass(frozen=True, slots=True)
class Step:
    """One entry of an execution's trace: `thread` went on to do `op`."""

    thread: int
    op: str
    preempted: bool  # another thread could have gone on but was switched away from


class _Thread:
    __slots__ = ("done", "fn", "forced_at", "gate", "idx", "name", "op", "own", "paused_at",
                 "timed_out", "waiting", "waiting_timeout", "worker")

    def __init__(self, idx: int, name: str, fn: Callable[[], None]) -> None:
        self.idx = idx
        self.name = name
        self.fn = fn
        self.worker = _Worker.take()
        self.gate = self.worker.gate  # locked: the thread may not run
        self.done = False
        self.waiting: Callable[[], bool] | None = None
        self.waiting_timeout = False  # the wait may end by a timeout
        self.timed_out = False
        # a pause: the progress of *other* threads when it paused; it may run again once
        # that moved, or — once per pause — when nobody else can run
        self.paused_at: int | None = None
        self.forced_at: int | None = None
        self.own = 0  # state-changing operations this thread did
        self.op = "start"

    def grant(self) -> None:
        with suppress(RuntimeError):  # already granted (an abort wakes everyone)
            self.gate.release()


class _Worker:
    """A pooled OS thread that runs one scenario thread per execution: starting threads
    costs more than running a short schedule."""

    _idle: ClassVar[list[_Worker]] = []
    _pool_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.task: tuple[Execution, _Thread] | None = None
        threading.Thread(target=self._loop, name="kvmem-check", daemon=True).start()

    @classmethod
    def take(cls) -> _Worker:
        with cls._pool_lock:
            return cls._idle.pop() if cls._idle else cls()

    def give_back(self) -> None:
        with self._pool_lock:
            self._idle.append(self)

    def _loop(self) -> None:
        while True:
            self.gate.acquire()  # the first grant of the next task
            if self.task is None:
                continue
            ex, t = self.task
            self.task = None
            ex._body(t)


_tls = threading.local()


def _current() -> tuple[Execution, _Thread] | None:
    return getattr(_tls, "ctx", None)


def _me() -> int:
    ctx = _current()
    return _MAIN if ctx is None else ctx[1].idx


class Execution:
    """One run of threads under the scheduler. `run()` returns the failure message or None.

    `choices` are followed at the first choice points (a replay, or the prefix of the
    search); `points` lists every choice point passed, `decisions` what was chosen there.
    """

    def __init__(self, threads: Sequence[tuple[str, Callable[[], None]]],
                 choices: Sequence[int] = (), *, max_steps: int = 50_000,
                 hang_timeout: float = 30.0) -> None:
        self.threads = [_Thread(i, name, fn) for i, (name, fn) in enumerate(threads)]
        self.choices = list(choices)
        self.decisions: list[int] = []
        self.points: list[ChoicePoint] = []
        self.trace: list[Step] = []
        self.preemptions = 0
        self.progress = 0  # state-changing operations done so far
        self.failure: str | None = None
        self.diverged = False  # a replayed choice was not possible
        self.max_steps = max_steps
        self.hang_timeout = hang_timeout
        self._aborting = False
        self._live = len(self.threads)
        self._live_lock = threading.Lock()
        self._finished = threading.Event()

    # -- running ------------------------------------------------------------------------
    def run(self) -> str | None:
        for t in self.threads:
            t.worker.task = (self, t)
        with suppress(_Abort):
            self._decide(None, "start")
        if not self._finished.wait(self.hang_timeout):
            self._fail("hang: a thread blocked outside kvmem.sync (an object built before "
                       "the checker's twins were installed?)")
            self._abort()  # its workers are lost: they are not given back
            return self.failure
        for t in self.threads:
            t.worker.give_back()
        return self.failure

    def _body(self, t: _Thread) -> None:
        _tls.ctx = (self, t)
        try:
            if not self._aborting:
                t.fn()
        except _Abort:
            pass
        except BaseException as e:  # the scenario's own verdict, or a crash in kvmem
            frames = traceback.extract_tb(e.__traceback__)[1:][-4:]
            where = "".join(f"\n  at {Path(f.filename).name}:{f.lineno} in {f.name}"
                            for f in frames)
            self._fail(f"{t.name}: {type(e).__name__}: {e}{where}")
            t.done = True
            self._abort()
        finally:
            t.done = True
            if not self._aborting:
                with suppress(_Abort):
                    self._decide(t, "end")
            _tls.ctx = None
            with self._live_lock:
                self._live -= 1
                if self._live == 0:
                    self._finished.set()

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message

    def _abort(self) -> None:
        """Stop: wake every other unfinished thread so that it unwinds (`_Abort`)."""
        self._aborting = True
        ctx = _current()
        me = ctx[1] if ctx is not None and ctx[0] is self else None
        for t in self.threads:
            if not t.done and t is not me:
                t.grant()

    # -- the scheduler ------------------------------------------------------------------
    def _enabled(self, t: _Thread) -> bool:
        if t.done:
            return False
        if t.paused_at is not None and self.progress - t.own <= t.paused_at:
            return False
        return t.waiting is None or t.waiting()

    def _decide(self, cur: _Thread | None, op: str) -> None:
        """Called by the thread holding the baton (`cur`, None at the start) at a scheduling
        point; returns when `cur` may go on with `op`."""
        if self._aborting:
            raise _Abort
        if cur is not None:
            cur.op = op
        enabled = [t.idx for t in self.threads if self._enabled(t)]
        if not enabled:
            if all(t.done for t in self.threads):
                return
            # nothing else can happen: a paused thread retries (once per pause: a second
            # pause with nothing changed meanwhile is a livelock), or a timed wait times out
            retry = [t.idx for t in self.threads if not t.done and t.paused_at is not None
                     and t.forced_at != t.paused_at and (t.waiting is None or t.waiting())]
            timed = [t for t in self.threads if not t.done and t.waiting_timeout]
            if retry:
                enabled = retry
            elif timed:
                enabled = [timed[0].idx]
                timed[0].timed_out = True
            else:
                self._fail(self._deadlock())
                self._abort()
                raise _Abort
        if len(self.trace) >= self.max_steps:
            self._fail(f"livelock: no end after {self.max_steps} steps")
            self._abort()
            raise _Abort
        # a thread that pauses yields: switching away from it is not a preemption
        running = cur is not None and cur.paused_at is None and cur.idx in enabled
        if len(enabled) == 1:
            choice = enabled[0]
        else:
            depth = len(self.decisions)
            point = ChoicePoint(tuple(enabled), cur.idx if running and cur else None,
                                self.preemptions)
            if depth < len(self.choices):
                choice = self.choices[depth]
                if choice not in enabled:
                    self.diverged = True
                    self._fail(f"replay diverged at choice point {depth}: thread {choice} "
                               f"cannot run (runnable: {list(enabled)})")
                    self._abort()
                    raise _Abort
            else:
                choice = cur.idx if running and cur else enabled[0]
            self.points.append(point)
            self.decisions.append(choice)
        preempted = running and cur is not None and choice != cur.idx
        if preempted:
            self.preemptions += 1
        nxt = self.threads[choice]
        if nxt.paused_at is not None:
            nxt.forced_at = nxt.paused_at if self.progress - nxt.own <= nxt.paused_at \
                else None
            nxt.paused_at = None
        self.trace.append(Step(choice, nxt.op, preempted))
        if nxt is cur:
            return
        nxt.grant()
        if cur is not None and not cur.done:
            cur.gate.acquire()
            if self._aborting:
                raise _Abort

    def _deadlock(self) -> str:
        lines = ["deadlock: no thread can go on"]
        for t in self.threads:
            if t.done:
                continue
            why = "paused, nobody else can change anything" if t.paused_at is not None \
                else "blocked"
            lines.append(f"  {t.name} {why} at {t.op}")
        return "\n".join(lines)

    # -- what the twins call ------------------------------------------------------------
    def point(self, t: _Thread, op: str, writes: bool) -> None:
        self._decide(t, op)
        if writes:
            self.progress += 1
            t.own += 1

    def block(self, t: _Thread, op: str, until: Callable[[], bool],
              timeout: bool = False) -> bool:
        """Wait until `until()` holds; False if the wait timed out (only with `timeout`)."""
        if until():
            return True
        t.waiting, t.waiting_timeout, t.timed_out = until, timeout, False
        try:
            self._decide(t, op)
        finally:
            t.waiting, t.waiting_timeout = None, False
        self.progress += 1
        t.own += 1
        return not t.timed_out

    def pause(self, t: _Thread) -> None:
        t.paused_at = self.progress - t.own
        self._decide(t, "pause")


def _point(op: str, obj_name: str, writes: bool = True) -> None:
    ctx = _current()
    if ctx is not None:
        ctx[0].point(ctx[1], f"{op} {obj_name}", writes)


# ---------------------------------------------------------------------------------------
# the twins: same API as kvmem.sync, every operation a scheduling point


class Mutex:
    __slots__ = ("_owner", "name")

    def __init__(self, name: str = "mutex") -> None:
        self._owner: int | None = None
        self.name = name

    def acquire(self) -> None:
        ctx = _current()
        if ctx is None:  # alone: nobody else can hold it (or its holder was unwound)
            self._owner = _MAIN
            return
        ex, t = ctx
        ex.point(t, f"lock {self.name}", True)
        if self._owner == t.idx:
            raise RuntimeError(f"{self.name}: acquired twice by {t.name} (self-deadlock)")
        ex.block(t, f"lock {self.name} (wait)", lambda: self._owner is None)
        self._owner = t.idx

    def release(self) -> None:
        _point("unlock", self.name)
        if self._owner != _me():
            raise sync.LockNotHeld(f"{self.name} released by a thread that does not hold it")
        self._owner = None

    def __enter__(self) -> Mutex:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held(self) -> bool:
        return self._owner == _me()

    def assert_held(self) -> None:
        if self._owner != _me():
            raise sync.LockNotHeld(f"{self.name} must be held here")


class _ReadHolds:
    """What a twin RwLock's `readers` gives: `append` and `pop` are the two steps of the
    inlined read side (`r = rw.readers; r.append(None)` … `r.pop()`); the twin's `busy`
    is never true, since `append` itself waits for writers."""

    __slots__ = ("_rw",)

    def __init__(self, rw: RwLock) -> None:
        self._rw = rw

    def append(self, _entry: None) -> None:
        self._rw.acquire_read()

    def pop(self) -> None:
        self._rw.release_read()


class RwLock:
    __slots__ = ("_readers", "_writer", "_writers_waiting", "name")

    busy = False  # the inlined read side never takes the real lock's slow path here

    def __init__(self, name: str = "rwlock") -> None:
        self._readers: list[int] = []
        self._writer: int | None = None
        self._writers_waiting = 0
        self.name = name

    @property
    def readers(self) -> _ReadHolds:
        return _ReadHolds(self)

    def read_contended(self) -> None:
        raise AssertionError("the twin's busy is never true")

    def wake_writer(self) -> None:
        raise AssertionError("the twin's busy is never true")

    def acquire_read(self) -> None:
        ctx = _current()
        if ctx is not None:
            ex, t = ctx
            ex.point(t, f"read_lock {self.name}", True)
            ex.block(t, f"read_lock {self.name} (wait)",
                     lambda: self._writer is None and not self._writers_waiting)
        self._readers.append(_me())

    def release_read(self) -> None:
        _point("read_unlock", self.name)
        self._readers.remove(_me())

    def acquire_write(self) -> None:
        ctx = _current()
        if ctx is not None:
            ex, t = ctx
            ex.point(t, f"write_lock {self.name}", True)
            self._writers_waiting += 1
            try:
                ex.block(t, f"write_lock {self.name} (wait)",
                         lambda: self._writer is None and not self._readers)
            finally:
                self._writers_waiting -= 1
        self._writer = _me()

    def release_write(self) -> None:
        _point("write_unlock", self.name)
        if self._writer != _me():
            raise sync.LockNotHeld(f"{self.name} write-released by a thread not holding it")
        self._writer = None

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    def write_held(self) -> bool:
        return self._writer == _me()

    def assert_write_held(self) -> None:
        if self._writer != _me():
            raise sync.LockNotHeld(f"{self.name} must be held for write here")


class Atomic(Generic[T]):
    """`load`, `store`, `add` and reading or assigning `value` are scheduling points."""

    __slots__ = ("_v", "name")

    def __init__(self, value: T, name: str = "atomic") -> None:
        self._v = value
        self.name = name

    def load(self) -> T:
        _point("load", self.name, False)
        return self._v

    def store(self, value: T) -> None:
        _point("store", self.name)
        self._v = value

    def add(self, delta: int) -> int:
        _point("add", self.name)
        new: int = self._v + delta  # type: ignore[operator]
        self._v = new  # type: ignore[assignment]
        return new

    @property
    def value(self) -> T:
        _point("load", self.name, False)
        return self._v

    @value.setter
    def value(self, v: T) -> None:
        self.store(v)


class Condition:
    """Faithful to a condition variable: a waiter sleeps until `notify_all` (a missing
    notify is a lost wake-up, reported as a deadlock), then re-takes the mutex."""

    __slots__ = ("_waiters", "mutex")

    def __init__(self, mutex: Mutex) -> None:
        self.mutex = mutex
        self._waiters: set[int] = set()

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        self.mutex.assert_held()
        ctx = _current()
        if ctx is None:
            if not predicate():
                raise RuntimeError(f"{self.mutex.name}: a wait outside an execution would "
                                   "never end")
            return True
        ex, t = ctx
        while not predicate():
            self._waiters.add(t.idx)
            self.mutex._owner = None
            ok = ex.block(t, f"wait {self.mutex.name}", lambda: t.idx not in self._waiters,
                          timeout=timeout is not None)
            self._waiters.discard(t.idx)
            ex.block(t, f"relock {self.mutex.name}", lambda: self.mutex._owner is None)
            self.mutex._owner = t.idx
            if not ok:
                return predicate()
        return True

    def notify_all(self) -> None:
        self.mutex.assert_held()
        _point("notify_all", self.mutex.name)
        self._waiters.clear()


@dataclass(slots=True)
class _Record:
    nesting: int = 0
    phase: int = 0


class _Readers:
    """What a twin Srcu's `current` gives: `append` and `pop` are the two steps of the
    inlined read-side protocol (`r = srcu.current; r.append(None)` … `r.pop()`)."""

    __slots__ = ("_srcu",)

    def __init__(self, srcu: Srcu) -> None:
        self._srcu = srcu

    def append(self, _entry: None) -> None:
        self._srcu._enter()

    def pop(self) -> None:
        _point("read_unlock", self._srcu.name)
        self._srcu._exit()


@dataclass
class Srcu:
    """Read sections and grace periods as in `kvmem.sync.Srcu`; `synchronize` waits (as a
    blocked thread, not by polling) until every section that began before it has ended."""

    name: str = "srcu"
    grace_periods: int = 0
    _phase: int = 1
    _records: dict[int, _Record] = field(default_factory=dict)

    def _rec(self) -> _Record:
        me = _me()
        rec = self._records.get(me)
        if rec is None:
            rec = self._records[me] = _Record()
        return rec

    def read_lock(self) -> _Readers:
        _point("read_lock", self.name)
        self._enter()
        return _Readers(self)  # a token, as the real one returns (unused here)

    def read_unlock(self, token: object) -> None:
        _point("read_unlock", self.name)
        self._exit()

    def _enter(self) -> None:
        rec = self._rec()
        if rec.nesting == 0:
            rec.phase = self._phase
        rec.nesting += 1

    def _exit(self) -> None:
        rec = self._rec()
        if rec.nesting <= 0:
            raise RuntimeError(f"{self.name}: read_unlock without read_lock")
        rec.nesting -= 1

    # the inlined read side of `kvmem.sync.Srcu`: `r = srcu.current; r.append(None)` …
    # `r.pop()`, with the same scheduling points as the two methods
    @property
    def current(self) -> _Readers:
        _point("read_lock", self.name)
        return _Readers(self)

    @contextmanager
    def read(self) -> Iterator[None]:
        token = self.read_lock()
        try:
            yield
        finally:
            self.read_unlock(token)

    def in_read_section(self) -> bool:
        rec = self._records.get(_me())
        return rec is not None and rec.nesting > 0

    def synchronize(self) -> None:
        ctx = _current()
        _point("synchronize", self.name)
        if self.in_read_section():
            raise RuntimeError(f"{self.name}: synchronize inside a read section would deadlock")
        self._phase += 1
        new = self._phase
        old = [r for r in self._records.values() if r.nesting > 0 and r.phase < new]
        if ctx is not None:
            ex, t = ctx
            ex.block(t, f"synchronize {self.name} (wait)",
                     lambda: all(r.nesting == 0 or r.phase >= new for r in old))
        self.grace_periods += 1


def world_event(what: str) -> None:
    """A scheduling point for a change outside kvmem (host page tables)."""
    _point(what, "(host)")


def pause() -> None:
    ctx = _current()
    if ctx is not None:
        ctx[0].pause(ctx[1])


TWINS: dict[str, object] = {
    "Mutex": Mutex,
    "RwLock": RwLock,
    "Atomic": Atomic,
    "Condition": Condition,
    "Srcu": Srcu,
    "pause": pause,
}
