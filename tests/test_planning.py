"""Keyset ranges never split an earlier provider request (pure function, no I/O)."""

from __future__ import annotations

from activities.planning import cut_into_batches


def spans(ranges) -> list[tuple[int, int]]:
    return [(r.after_id, r.last_id) for r in ranges]


def test_fresh_rows_are_cut_every_batch_size() -> None:
    rows = [(i, None) for i in range(1, 11)]
    assert spans(cut_into_batches(rows, 0, 4, last_page=True)) == [(0, 4), (4, 8), (8, 10)]


def test_a_request_with_unkeyed_rows_between_its_members_is_not_split() -> None:
    # Request "a" is recipients 2, 4 and 6; 3 and 5 were suppressed or sent before.
    rows = [(1, None), (2, "a"), (3, None), (4, "a"), (5, None), (6, "a"), (7, None), (8, "b")]
    ranges = cut_into_batches(rows, 0, 2, last_page=True)
    assert spans(ranges) == [(0, 6), (6, 8)]
    for after, last in spans(ranges):
        members = {rid for rid, key in rows if key == "a" and after < rid <= last}
        assert members in (set(), {2, 4, 6})


def test_on_a_page_that_is_not_the_last_the_open_request_waits_for_the_next_page() -> None:
    rows = [(1, "a"), (2, "a"), (3, "b"), (4, None), (5, "b")]
    assert spans(cut_into_batches(rows, 0, 2, last_page=False)) == [(0, 2)]
    assert spans(cut_into_batches(rows, 0, 2, last_page=True)) == [(0, 2), (2, 5)]
