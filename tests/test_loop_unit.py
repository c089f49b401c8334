"""Offsets the loop commits and rewinds to (pure: fake messages carry only positions)."""

from __future__ import annotations

from dataclasses import dataclass

from consumers.loop import first_offsets, next_offsets


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
