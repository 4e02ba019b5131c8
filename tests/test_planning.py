"""Keyset ranges never split an earlier provider request (pure function, no I/O)."""

from __future__ import annotations

from activities.planning import cut_into_batches


def spans(ranges) -> list[tuple[int, int]]:
    return [(r.after_id, r.last_id) for r in ranges]


def test_fresh_rows_are_cut_every_batch_size() -> None:
    rows = [(i, None) for i in range(1, 11)]
    assert spans(cut_into_batches(rows, 0, 4, last_page=True)) == [(0, 4), (4, 8), (8, 10)]


def test_a_range_never_ends_inside_an_earlier_request() -> None:
    # Request A carried 2, 4 and 6 (it ends at 6); request B, inside A's span, carried
    # 5 only; 1, 3 and 7 are new rows.
    rows = [(1, None), (2, 6), (3, None), (4, 6), (5, 5), (6, 6), (7, None), (8, 8)]
    ranges = cut_into_batches(rows, 0, 2, last_page=True)
    assert spans(ranges) == [(0, 6), (6, 8)]


def test_on_a_page_that_is_not_the_last_an_open_request_waits_for_the_next_page() -> None:
    rows = [(1, 2), (2, 2), (3, 9), (4, None), (5, 9)]
    assert spans(cut_into_batches(rows, 0, 2, last_page=False)) == [(0, 2)]
    assert spans(cut_into_batches(rows, 0, 2, last_page=True)) == [(0, 2), (2, 5)]
