"""Requests ready together are processed as one group, each with its own outcome."""

import asyncio

import pytest

from fraudflow.serve.coalesce import Coalescer


def test_concurrent_items_form_one_group_with_their_own_outcomes() -> None:
    groups: list[list[int]] = []

    async def process(items: list[int]) -> list[int | BaseException]:
        groups.append(items)
        await asyncio.sleep(0)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def main() -> list[object]:
        coalescer: Coalescer[int, int] = Coalescer(process)
        outcomes = await asyncio.gather(
            *(coalescer.submit(i) for i in (1, -2, 3)), return_exceptions=True
        )
        alone = await coalescer.submit(4)  # an idle service: a group of one, no wait
        return [*outcomes, alone]

    outcomes = asyncio.run(main())
    assert groups == [[1, -2, 3], [4]]
    assert outcomes[0] == 10 and outcomes[2] == 30 and outcomes[3] == 40
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad -2"


def test_a_failing_group_fails_each_item_and_groups_are_capped() -> None:
    sizes: list[int] = []

    async def process(items: list[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        raise RuntimeError("store down")

    async def main() -> list[object]:
        coalescer: Coalescer[int, int] = Coalescer(process, max_group=2)
        return await asyncio.gather(
            *(coalescer.submit(i) for i in range(5)), return_exceptions=True
        )

    outcomes = asyncio.run(main())
    assert sizes == [2, 2, 1]
    assert all(isinstance(o, RuntimeError) for o in outcomes)


def test_a_cancelled_request_does_not_break_its_group() -> None:
    async def process(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0.01)
        return items

    async def main() -> int:
        coalescer: Coalescer[int, int] = Coalescer(process)
        doomed = asyncio.ensure_future(coalescer.submit(1))
        kept = asyncio.ensure_future(coalescer.submit(2))
        await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await kept

    assert asyncio.run(main()) == 2


def test_items_arriving_while_a_group_is_in_flight_wait_and_go_as_one_group() -> None:
    groups: list[list[int]] = []
    release = asyncio.Event()

    async def process(items: list[int]) -> list[int | BaseException]:
        groups.append(items)
        if items == [1]:
            await release.wait()  # the first group awaits its commit
        return [i * 10 for i in items]

    async def main() -> list[int]:
        coalescer: Coalescer[int, int] = Coalescer(process)
        first = asyncio.ensure_future(coalescer.submit(1))
        await asyncio.sleep(0.01)  # group [1] is in flight
        later = [asyncio.ensure_future(coalescer.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        assert groups == [[1]]  # 2 and 3 wait for it, they do not start groups of their own
        release.set()
        return list(await asyncio.gather(first, *later))

    assert asyncio.run(main()) == [10, 20, 30]
    assert groups == [[1], [2, 3]]
