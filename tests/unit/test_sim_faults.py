"""The sim's hang fault ends when the faults change, even when they changed before the request began to wait
(the race that made test_hang_ends_when_the_client_leaves_or_faults_clear fail on a loaded machine)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.sim.faults import Faults, FaultState

pytestmark = pytest.mark.anyio


async def test_faults_cleared_before_the_wait_release_a_hung_request_at_once() -> None:
    state = FaultState(Faults(hang=True))
    taken = state.take()
    assert taken.hang
    state.set(Faults())  # the client clears the faults before the request's task reaches its wait
    await asyncio.wait_for(state.changed_since(taken.generation), timeout=5)


async def test_a_hung_request_waits_until_the_faults_change() -> None:
    state = FaultState(Faults(hang=True))
    taken = state.take()
    waiter = asyncio.ensure_future(state.changed_since(taken.generation))
    await asyncio.sleep(0)
    assert not waiter.done()  # nothing changed: still hung
    state.set(Faults())
    await asyncio.wait_for(waiter, timeout=5)


async def test_a_single_hang_still_hangs_once_its_times_ran_out() -> None:
    """`times=1`: the fault clears itself as the request takes it, and that request still hangs."""
    state = FaultState(Faults(hang=True, times=1))
    taken = state.take()
    assert taken.hang and not state.current.hang
    waiter = asyncio.ensure_future(state.changed_since(taken.generation))
    await asyncio.sleep(0)
    assert not waiter.done()
    state.set(Faults())
    await asyncio.wait_for(waiter, timeout=5)
