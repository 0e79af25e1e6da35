"""Batcher: batches form when the model is free, so requests that arrive during a batch run together next."""

from __future__ import annotations

import asyncio

import pytest

from cl_service.serve.batcher import Batcher


def _model(delay: float, seen: list[list[int]]):
    async def fn(items: list[int]) -> list[int]:
        seen.append(list(items))
        await asyncio.sleep(delay)
        return [10 * x for x in items]
    return fn


def test_requests_arriving_while_busy_run_as_one_next_batch_and_each_caller_gets_its_own_answer():
    seen: list[list[int]] = []

    async def main():
        b = Batcher(_model(0.2, seen), max_batch_size=64, wait_s=0.0)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # the model is busy with [0]
        rest = []
        for i in range(1, 6):  # arrive one by one during the batch
            rest.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(0.01)
        return await first, await asyncio.gather(*rest), b.log

    first, rest, log = asyncio.run(main())
    assert seen == [[0], [1, 2, 3, 4, 5]]  # @serve.batch would run [1], [2], ... (each closed after wait_s)
    assert first == 0 and rest == [10, 20, 30, 40, 50]
    assert [n for _, _, n in log] == [1, 5] and all(t1 >= t0 for t0, t1, _ in log)


def test_max_batch_size_splits_a_backlog_in_arrival_order():
    seen: list[list[int]] = []

    async def main():
        b = Batcher(_model(0.05, seen), max_batch_size=4, wait_s=0.0)
        return await asyncio.gather(*(b.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [10 * i for i in range(10)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("wait_s, expected", [(0.3, [[0, 1]]), (0.0, [[0], [1]])])
def test_a_request_that_finds_the_model_free_waits_up_to_wait_s_for_company(wait_s, expected):
    seen: list[list[int]] = []

    async def main():
        b = Batcher(_model(0.0, seen), max_batch_size=8, wait_s=wait_s)
        a = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        return await asyncio.gather(a, b.submit(1))

    assert asyncio.run(main()) == [0, 10]
    assert seen == expected


def test_a_full_batch_runs_without_waiting_out_wait_s():
    seen: list[list[int]] = []

    async def main():
        b = Batcher(_model(0.0, seen), max_batch_size=3, wait_s=30.0)
        return await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(3))), 5)

    assert asyncio.run(main()) == [0, 10, 20] and seen == [[0, 1, 2]]


def test_an_error_fails_only_its_own_row():
    """A batch call that raises is retried row by row: the bad row gets the error, its batch mates answers."""
    seen: list[list[int]] = []

    async def fn(items: list[int]) -> list[int]:
        seen.append(list(items))
        await asyncio.sleep(0.05)
        if 13 in items:
            raise ValueError("corrupt item 13")
        return items

    async def main():
        b = Batcher(fn, max_batch_size=3, wait_s=0.0)
        first = asyncio.gather(b.submit(13), b.submit(1), b.submit(4), return_exceptions=True)
        good = asyncio.gather(b.submit(2), b.submit(3))
        return await first, await good

    first, good = asyncio.run(main())
    assert isinstance(first[0], ValueError) and "corrupt item 13" in str(first[0])
    assert first[1:] == [1, 4] and good == [2, 3]
    assert seen == [[13, 1, 4], [13], [1], [4], [2, 3]]


def test_an_exception_result_fails_only_its_row():
    async def fn(items: list[int]) -> list:
        return [KeyError(f"row {x} refused") if x < 0 else x for x in items]

    async def main():
        b = Batcher(fn, max_batch_size=4, wait_s=0.0)
        return await asyncio.gather(b.submit(-1), b.submit(5), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[0], KeyError) and "row -1 refused" in str(out[0]) and out[1] == 5


def test_a_function_that_loses_rows_is_an_error_not_a_misaligned_answer():
    async def fn(items):
        return items[:-1]

    async def main():
        b = Batcher(fn, max_batch_size=4, wait_s=0.0)
        return await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)

    out = asyncio.run(main())  # the batch lost a row, then each row alone lost its only row
    assert all(isinstance(e, RuntimeError) and "returned 0 results for 1 items" in str(e) for e in out)


def test_a_caller_that_gave_up_before_its_batch_is_not_computed():
    seen: list[list[int]] = []

    async def main():
        b = Batcher(_model(0.2, seen), max_batch_size=8, wait_s=0.0)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(b.submit(1))
        stays = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await stays

    assert asyncio.run(main()) == (0, 20)
    assert seen == [[0], [2]]


@pytest.mark.parametrize("kw", [{"max_batch_size": 0, "wait_s": 0.0}, {"max_batch_size": 4, "wait_s": -1.0}])
def test_bad_settings_are_refused(kw):
    async def fn(items):
        return items

    with pytest.raises(ValueError):
        Batcher(fn, **kw)
