"""Offsets the loop commits and rewinds to (pure: fake messages carry only positions)."""

from __future__ import annotations

from dataclasses import dataclass

from consumers.loop import OffsetGuard, first_offsets, next_offsets


@dataclass
class FakeMessage:
    t: str
    p: int
    o: int

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o


BATCH = [FakeMessage("e", 0, 5), FakeMessage("e", 1, 9), FakeMessage("e", 0, 7), FakeMessage("e", 1, 8)]


def test_commit_is_highest_offset_plus_one_per_partition() -> None:
    got = [(tp.topic, tp.partition, tp.offset) for tp in next_offsets(BATCH)]  # type: ignore[arg-type]
    assert got == [("e", 0, 8), ("e", 1, 10)]


def test_rewind_is_lowest_offset_per_partition() -> None:
    got = [(tp.topic, tp.partition, tp.offset) for tp in first_offsets(BATCH)]  # type: ignore[arg-type]
    assert got == [("e", 0, 5), ("e", 1, 8)]


def test_consumers_prefetch_a_bounded_amount_unless_told_otherwise() -> None:
    # librdkafka's defaults (64 MiB, 100,000 records) let ingest reach 260 MB RSS catching up
    # on a backlog of large records in `herald chaos`; 200 MB per process is the target.
    from config.settings import Settings
    from consumers.loop import consumer_config

    conf = consumer_config(Settings(batch_size=500), "g")
    assert conf["queued.max.messages.kbytes"] == 16_384
    assert conf["queued.min.messages"] == 2000
    custom = Settings(kafka={"queued.max.messages.kbytes": "4096"})  # HERALD_KAFKA__QUEUED_MAX_...
    assert str(consumer_config(custom, "g")["queued.max.messages.kbytes"]) == "4096"
    # The fetch that fills the queue lands whole: 256 KiB per partition, 1 MiB per response,
    # as fetched (test_loop_prefetch). librdkafka refuses a response bound under the largest
    # record the client allows, so a raised message.max.bytes raises it too.
    assert conf["max.partition.fetch.bytes"] == 256 * 1024
    assert conf["fetch.max.bytes"] == 1 << 20
    big = Settings(kafka={"message.max.bytes": "4000000"})
    assert consumer_config(big, "g")["fetch.max.bytes"] == 4_000_000
    bad = Settings(kafka={"message.max.bytes": "lots"})  # librdkafka names it, not a traceback here
    assert consumer_config(bad, "g")["fetch.max.bytes"] == 1 << 20
    custom = Settings(kafka={"max.partition.fetch.bytes": "1048576"})
    assert str(consumer_config(custom, "g")["max.partition.fetch.bytes"]) == "1048576"


def offsets(messages: list[FakeMessage]) -> list[tuple[int, int]]:
    return [(m.p, m.o) for m in messages]


def check(
    guard: OffsetGuard, batch: list[FakeMessage]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[str]]:
    kept, seeks, notes = guard.check(batch)  # type: ignore[arg-type]
    return offsets(kept), [(tp.partition, tp.offset) for tp in seeks], notes  # type: ignore[arg-type]


def run(p: int, first: int, last: int) -> list[FakeMessage]:
    return [FakeMessage("e", p, o) for o in range(first, last + 1)]


def test_offset_guard_takes_a_partition_that_runs_on() -> None:
    guard = OffsetGuard()
    assert check(guard, run(0, 10, 12) + run(1, 0, 1)) == (
        [(0, 10), (0, 11), (0, 12), (1, 0), (1, 1)],
        [],
        [],
    )
    assert check(guard, run(0, 13, 14)) == ([(0, 13), (0, 14)], [], [])


def test_offset_guard_reads_a_jump_again_and_takes_what_was_skipped() -> None:
    """The embedded broker's skipped batch: offsets 13-25 came after 26 became readable."""
    guard = OffsetGuard()
    check(guard, run(0, 10, 12))
    kept, seeks, notes = check(guard, run(1, 5, 5) + run(0, 26, 28) + run(1, 6, 6))
    assert kept == [(1, 5), (1, 6)], "the other partition flows on"
    assert seeks == [(0, 13)], "read again from the first offset missing"
    assert notes == []
    kept, seeks, notes = check(guard, run(0, 13, 28))
    assert kept == [(0, o) for o in range(13, 29)] and seeks == []
    assert len(notes) == 1 and "jumped from offset 13 to 26" in notes[0]


def test_offset_guard_takes_the_same_jump_twice_as_a_hole_in_the_log() -> None:
    """A transaction marker, aborted records, compaction or retention: read once more, then taken."""
    guard = OffsetGuard()
    check(guard, run(0, 0, 4))
    assert check(guard, run(0, 6, 7)) == ([], [(0, 5)], [])
    assert check(guard, run(0, 6, 9)) == ([(0, o) for o in range(6, 10)], [], [])
    # A later hole is read again too: taking one does not switch the guard off.
    assert check(guard, run(0, 11, 11)) == ([], [(0, 10)], [])
    assert check(guard, run(0, 11, 11)) == ([(0, 11)], [], [])


def test_offset_guard_follows_the_loop_back_and_starts_over_on_assignment() -> None:
    from confluent_kafka import TopicPartition

    guard = OffsetGuard()
    check(guard, run(0, 0, 9))
    assert check(guard, run(0, 3, 4)) == ([(0, 3), (0, 4)], [], []), "a rewind reads back: no jump"
    guard.forget([TopicPartition("e", 0)])
    assert check(guard, run(0, 500, 501)) == ([(0, 500), (0, 501)], [], []), (
        "after an assignment: the committed offset"
    )


def test_offset_guard_starts_an_assigned_partition_at_its_committed_offset() -> None:
    """A first fetch after an assignment can jump too (the committed offset is at the tail
    while producers write): the guard knows where it must begin."""
    from confluent_kafka import TopicPartition

    guard = OffsetGuard()
    guard.start([TopicPartition("e", 0, 100), TopicPartition("e", 1, -1001)])
    kept, seeks, _ = check(guard, run(0, 113, 115) + run(1, 40, 41))
    assert seeks == [(0, 100)], "the committed offset is 100: read again from there"
    assert kept == [(1, 40), (1, 41)], "no committed offset known: the first record sets it"
    assert check(guard, run(0, 100, 101))[0] == [(0, 100), (0, 101)]
