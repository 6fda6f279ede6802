"""The persistent indexes under slot sets agree with a plain model, and old versions stay
intact after changes (readers of an old set are never disturbed)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from kvmem import _pindex
from kvmem._pindex import IdTable, SortedIndex

ops = st.lists(st.tuples(st.sampled_from(["ins", "del", "rep"]), st.integers(0, 3000),
                         st.integers(1, 40), st.integers(0, 3000)), max_size=300)


@settings(max_examples=150, deadline=None)
@given(ops, st.lists(st.integers(-5, 3100), max_size=30))
def test_sorted_index_matches_model(operations: list[tuple[str, int, int, int]],
                                    probes: list[int]) -> None:
    old_chunk = _pindex.CHUNK
    _pindex.CHUNK = 4  # force many chunks, splits and empty chunks
    try:
        idx: SortedIndex[tuple[int, int]] = SortedIndex(lambda v: v[1])
        model: dict[int, tuple[int, int]] = {}
        versions = []
        for op, key, length, key2 in operations:
            if op == "ins" and key not in model:
                idx = idx.insert(key, (key, key + length))
                model[key] = (key, key + length)
            elif op == "del" and key in model:
                idx = idx.remove(key)
                del model[key]
            elif op == "rep" and key in model and (key2 == key or key2 not in model):
                idx = idx.replace(key, key2, (key2, key2 + length))
                del model[key]
                model[key2] = (key2, key2 + length)
            versions.append((idx, dict(model)))
        for version, snapshot in versions:  # every old version still reads as it was
            assert list(version) == [snapshot[k] for k in sorted(snapshot)]
            assert len(version) == len(snapshot)
        keys = sorted(model)
        for p in probes:
            below = [k for k in keys if k <= p]
            assert idx.floor(p) == (model[below[-1]] if below else None)
            assert idx.get(p) == model.get(p)
            start = below[-1] if below else (keys[0] if keys else 0)
            assert list(idx.from_key(p)) == [model[k] for k in keys if k >= start]
            lo, hi = p, p + 50
            assert list(idx.overlapping(lo, hi)) == [
                model[k] for k in keys if k < hi and model[k][1] > lo]
    finally:
        _pindex.CHUNK = old_chunk


@given(st.lists(st.tuples(st.integers(0, 32766), st.one_of(st.none(), st.integers())),
                max_size=100))
def test_id_table_matches_model(sets: list[tuple[int, int | None]]) -> None:
    table: IdTable[int] = IdTable()
    model: dict[int, int | None] = {}
    first = table
    for i, v in sets:
        table = table.set(i, v)
        model[i] = v
    for i, v in model.items():
        assert table.get(i) == v
    assert all(first.get(i) is None for i in model)
