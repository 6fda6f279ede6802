"""kvmem.sync in normal runs (real threads): the semantics the rest of kvmem relies on."""

from __future__ import annotations

import threading
import time

import pytest

from kvmem import sync


def test_mutex_knows_its_owner() -> None:
    m = sync.Mutex("m")
    with pytest.raises(sync.LockNotHeld, match="m must be held"):
        m.assert_held()
    with m:
        m.assert_held()
        assert m.held()
        seen: list[bool] = []
        t = threading.Thread(target=lambda: seen.append(m.held()))
        t.start()
        t.join()
        assert seen == [False]
    assert not m.held()
    m.acquire()
    m.assert_held()
    m.release()


def test_rwlock_readers_share_writers_exclude() -> None:
    rw = sync.RwLock("rw")
    inside = sync.Atomic(0)
    most = [0]
    writer_saw: list[int] = []
    barrier = threading.Barrier(3)

    def reader() -> None:
        barrier.wait()
        for _ in range(200):
            with rw.read():
                n = inside.add(1)
                most[0] = max(most[0], n)
                time.sleep(0)
                inside.add(-1)

    def writer() -> None:
        barrier.wait()
        for _ in range(200):
            with rw.write():
                rw.assert_write_held()
                writer_saw.append(inside.load())

    threads = [threading.Thread(target=reader), threading.Thread(target=reader),
               threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert set(writer_saw) == {0}, "a writer ran while readers were inside"
    assert not rw.write_held()


def test_rwlock_waiting_writer_is_not_starved() -> None:
    rw = sync.RwLock("rw")
    rw.acquire_read()
    got = threading.Event()

    def writer() -> None:
        with rw.write():
            got.set()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)  # the writer is waiting now
    late: list[bool] = []

    def late_reader() -> None:
        with rw.read():
            late.append(got.is_set())

    r = threading.Thread(target=late_reader)
    r.start()
    time.sleep(0.05)
    assert not got.is_set() and not late  # the new reader queues behind the writer
    rw.release_read()
    t.join(10)
    r.join(10)
    assert got.is_set() and late == [True]


def test_srcu_synchronize_waits_for_older_readers_only() -> None:
    srcu = sync.Srcu("s")
    entered, leave = threading.Event(), threading.Event()

    def reader() -> None:
        with srcu.read():
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    entered.wait(10)
    done = threading.Event()

    def synchronize() -> None:
        srcu.synchronize()
        done.set()

    s = threading.Thread(target=synchronize)
    s.start()
    time.sleep(0.05)
    assert not done.is_set(), "synchronize returned while a reader from before it was inside"
    with srcu.read():  # a reader that starts now does not hold it up (nor is it blocked)
        pass
    leave.set()
    s.join(10)
    t.join(10)
    assert done.is_set() and srcu.grace_periods == 1


def test_srcu_sections_nest_and_a_section_begun_after_synchronize_does_not_hold_it() -> None:
    srcu = sync.Srcu("s")
    outer = srcu.read_lock()
    inner = srcu.read_lock()
    done = threading.Event()

    def synchronize() -> None:
        srcu.synchronize()
        done.set()

    s = threading.Thread(target=synchronize)
    s.start()
    time.sleep(0.05)
    srcu.read_unlock(inner)
    time.sleep(0.05)
    assert not done.is_set(), "synchronize returned with the outer section still open"
    late = srcu.read_lock()  # begun after the flip: synchronize does not wait for it
    srcu.read_unlock(outer)
    s.join(10)
    assert done.is_set()
    srcu.read_unlock(late)
    srcu.synchronize()  # and nothing is left inside


def test_condition_wait_until_and_timeout() -> None:
    m = sync.Mutex("m")
    cond = sync.Condition(m)
    state = {"ready": False}

    def setter() -> None:
        time.sleep(0.02)
        with m:
            state["ready"] = True
            cond.notify_all()

    t = threading.Thread(target=setter)
    t.start()
    with m:
        assert cond.wait_until(lambda: state["ready"], timeout=10)
        m.assert_held()
        assert not cond.wait_until(lambda: False, timeout=0.01)
        m.assert_held()
    t.join()


def test_atomic_value_is_load_and_add_is_atomic() -> None:
    a = sync.Atomic(0)
    a.store(5)
    assert a.load() == a.value == 5

    def bump() -> None:
        for _ in range(2000):
            a.add(1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.load() == 5 + 8000
