"""The supervisor restarts a crashed group with backoff, gives up past its budget, and
shuts down upstream-first so every stage drains into the next."""

from __future__ import annotations

import asyncio

from worker.exit_codes import ExitCode
from worker.runtime.actor import Actor, MailboxActor
from worker.runtime.mailbox import Mailbox
from worker.runtime.supervisor import ActorGroup, RestartPolicy, Supervisor

from .helpers import background, wait_for


async def _true(value: bool) -> bool:
    return value


class Crasher(Actor):
    name = "crasher"

    def __init__(self, after: float) -> None:
        self.after = after

    async def run(self) -> None:
        await asyncio.sleep(self.after)
        raise RuntimeError("boom")


class Collector(MailboxActor[int]):
    name = "collector"

    def __init__(self, mailbox: Mailbox[int], log: list[str], seen: list[int]) -> None:
        super().__init__(mailbox)
        self.log = log
        self.seen = seen

    async def handle(self, items: list[int]) -> None:
        await asyncio.sleep(0.01)  # slow consumer: the mailbox holds work at stop time
        self.seen.extend(items)

    async def drained(self) -> None:
        self.log.append(f"drained:{len(self.seen)}")

    async def close(self) -> None:
        self.log.append("collector closed")


class Producer(Actor):
    name = "producer"

    def __init__(self, mailbox: Mailbox[int], log: list[str]) -> None:
        self.mailbox = mailbox
        self.log = log
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        for n in range(50):
            await self.mailbox.put(n)
        await self.stopped.wait()

    async def stop(self) -> None:
        self.log.append("producer stopped")
        self.stopped.set()

    async def close(self) -> None:
        self.log.append("producer closed")


async def test_crashes_restart_with_backoff_then_the_supervisor_gives_up() -> None:
    builds = 0

    async def build() -> ActorGroup:
        nonlocal builds
        builds += 1
        return ActorGroup([Crasher(after=0.01)])

    policy = RestartPolicy(limit=3, window_s=60, backoff_s=0.02, backoff_max_s=0.05)
    supervisor = Supervisor(build, policy)
    code = await asyncio.wait_for(supervisor.run(), 10)
    assert code == ExitCode.FAILURE
    assert builds == 4  # the first start and three restarts


async def test_a_crash_restarts_the_group_and_it_recovers() -> None:
    builds = 0
    log: list[str] = []
    seen: list[int] = []

    async def build() -> ActorGroup:
        nonlocal builds
        builds += 1
        if builds == 1:
            return ActorGroup([Crasher(after=0.01)])
        mailbox: Mailbox[int] = Mailbox(10)
        return ActorGroup([Producer(mailbox, log), Collector(mailbox, log, seen)])

    supervisor = Supervisor(build, RestartPolicy(limit=2, backoff_s=0.01))
    async with background(supervisor.run()) as task:
        await wait_for(lambda: _true(len(seen) == 50 or task.done()))  # the new group at work
        assert not task.done() and builds == 2 and supervisor.restarts_total == 1
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 10) == ExitCode.OK
    assert seen == list(range(50))
    assert log == ["producer stopped", "drained:50", "collector closed", "producer closed"]


async def test_graceful_stop_drains_upstream_first_and_closes_downstream_first() -> None:
    log: list[str] = []
    seen: list[int] = []
    mailbox: Mailbox[int] = Mailbox(100)
    group = ActorGroup([Producer(mailbox, log), Collector(mailbox, log, seen)])

    async def build() -> ActorGroup:
        return group

    supervisor = Supervisor(build, RestartPolicy())
    async with background(supervisor.run()) as task:
        # Stop while the mailbox holds work (the slow collector has barely begun).
        await wait_for(lambda: _true(mailbox.qsize() >= 40 or bool(seen) or task.done()), interval=0.001)
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 10) == ExitCode.OK
    assert seen == list(range(50))  # nothing left behind in the mailbox
    assert log == ["producer stopped", "drained:50", "collector closed", "producer closed"]


async def test_shutdown_past_its_timeout_exits_non_zero() -> None:
    running = asyncio.Event()

    class Stuck(Actor):
        name = "stuck"

        async def run(self) -> None:
            running.set()
            await asyncio.Event().wait()

        async def stop(self) -> None:
            await asyncio.Event().wait()

    async def build() -> ActorGroup:
        return ActorGroup([Stuck()])

    supervisor = Supervisor(build, RestartPolicy(shutdown_timeout_s=0.1))
    async with background(supervisor.run()) as task:
        await asyncio.wait_for(running.wait(), 10)  # a stop before the start would just return 0
        supervisor.request_stop()
        assert await asyncio.wait_for(task, 10) == ExitCode.FAILURE


async def test_mailbox_backpressure_blocks_the_producer() -> None:
    mailbox: Mailbox[int] = Mailbox(2)
    await mailbox.put(1)
    await mailbox.put(2)
    async with background(mailbox.put(3)) as blocked:
        await wait_for(lambda: _true(bool(mailbox._putters) or blocked.done()))
        for _ in range(10):  # however long it waits, a full mailbox keeps it waiting
            await asyncio.sleep(0)
        assert not blocked.done() and mailbox.qsize() == 2
        assert await mailbox.get_batch(10, timeout=0) == [1, 2]
        await asyncio.wait_for(blocked, 10)
    assert await mailbox.get_batch(10, timeout=0.1) == [3]
    assert await mailbox.get_batch(10, timeout=0.01) == []


async def test_mailbox_wait_times_out_empty_or_wakes_on_mail() -> None:
    mailbox: Mailbox[int] = Mailbox(4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await mailbox.get_batch(10, timeout=0.05) == []
    assert loop.time() - started >= 0.04  # it waited (a slow machine only waits longer)
    # An hour's timeout: only being woken by the mail can end this wait in time.
    async with background(mailbox.get_batch(10, timeout=3600)) as waiting:
        await wait_for(lambda: _true(bool(mailbox._getters) or waiting.done()))
        assert not waiting.done()
        await mailbox.put(7)
        assert await asyncio.wait_for(waiting, 20) == [7]


async def test_a_cancelled_putter_passes_its_slot_on() -> None:
    mailbox: Mailbox[int] = Mailbox(1)
    await mailbox.put(1)
    async with background(mailbox.put(2)) as first, background(mailbox.put(3)) as second:
        await wait_for(lambda: _true(len(mailbox._putters) == 2 or first.done() or second.done()))
        assert not first.done() and not second.done()  # both wait, `first` in front
        assert await mailbox.get_batch(1, timeout=0) == [1]  # frees one slot, wakes `first`
        first.cancel()
        await asyncio.wait_for(second, 20)  # without the hand-over it would wait forever
        assert first.cancelled()
    assert await mailbox.get_batch(5, timeout=0) == [3]


async def test_idle_waits_leave_nothing_behind() -> None:
    mailbox: Mailbox[int] = Mailbox(4)
    for _ in range(200):
        assert await mailbox.get_batch(10, timeout=0.0001) == []
    assert not mailbox._getters  # a quiet night must not grow the mailbox
    async with background(mailbox.get_batch(10, timeout=5)) as waiting:
        await wait_for(lambda: _true(bool(mailbox._getters) or waiting.done()))
        assert not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    assert not mailbox._getters
