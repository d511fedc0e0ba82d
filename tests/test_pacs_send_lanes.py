"""The outbox sender's lanes (destination.associations): objects go over several associations at
once, each object exactly once, and a lane that finds the destination down loses nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_pacs import write_node_config

from medxray.errors import ConfigError
from medxray.pacs.sender import REFUSED, SENT, DestinationDown, OutboxSender
from medxray.pacs.spool import Spool


class SlowPacs:
    """A destination that takes ``delay`` s to store each object (as a PACS that syncs its disk)
    and records how many objects were in flight at once; ``down_after``: the lane that has sent
    that many objects loses its connection."""

    def __init__(self, lanes: int, delay: float = 0.05, down_after: int | None = None, refuse: str = "") -> None:
        self.lanes, self.delay, self.down_after, self.refuse = lanes, delay, down_after, refuse
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.stored: list[str] = []

    def describe(self) -> str:
        return "slow-pacs"

    def send(self, paths: list[Path]):
        for k, p in enumerate(paths):
            if self.down_after is not None and k == self.down_after:
                raise DestinationDown("connection lost")
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            time.sleep(self.delay)
            with self.lock:
                self.in_flight -= 1
                if p.stem != self.refuse:
                    self.stored.append(p.stem)
            yield (p, REFUSED, "status 0xA900") if p.stem == self.refuse else (p, SENT, "status 0x0000")


def _outbox(tmp_path: Path, n: int) -> Spool:
    spool = Spool(tmp_path / "work")
    for i in range(n):
        tmp = tmp_path / f"obj{i}.dcm"
        tmp.write_bytes(b"DICM" + bytes([i]))
        spool.put_outbox(f"1.2.3.{i}", tmp)
    return spool


@pytest.mark.parametrize("lanes", [1, 2, 4])
def test_every_object_goes_once_over_the_lanes_at_once(tmp_path, lanes):
    spool = _outbox(tmp_path, 12)
    pacs = SlowPacs(lanes, refuse="1.2.3.5")
    sender = OutboxSender(spool, pacs)
    t0 = time.perf_counter()
    assert sender.drain(30)
    elapsed = time.perf_counter() - t0
    assert sorted(pacs.stored) == sorted(f"1.2.3.{i}" for i in range(12) if i != 5)
    assert sender.sent_count == 11 and len(spool.sent.items) == 11
    assert [p.name for p in (spool.outbox / "failed").iterdir()] == ["1.2.3.5.dcm"]  # refused: set aside
    assert pacs.most_in_flight == lanes  # the lanes really overlap
    assert elapsed < 12 * 0.05 / lanes + 0.5  # and the wall time shrinks with them


def test_a_lane_that_finds_the_destination_down_loses_nothing(tmp_path):
    spool = _outbox(tmp_path, 8)
    sender = OutboxSender(spool, SlowPacs(2, delay=0.01, down_after=2))
    with pytest.raises(DestinationDown):
        sender.send_once()  # each lane sent 2 objects, then lost its connection
    assert sender.sent_count == 4 and len(spool.sent.items) == 4
    left = spool.outbox_files()
    assert len(left) == 4 and not {p.stem for p in left} & spool.sent.items  # the rest waits, nothing twice
    # the node's step(): back-off, then the rest goes when the destination is back
    sender.dest = SlowPacs(2, delay=0.01)
    sender.next_try = 0.0
    assert sender.drain(30) and len(spool.sent.items) == 8


def test_associations_is_a_bounded_count(tmp_path, scoring_checkpoint):
    from medxray.pacs import load_node_config

    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    write_node_config(tmp_path / "ok.yaml", tmp_path / "work", scoring_checkpoint, 11112, 4242)
    assert load_node_config(tmp_path / "ok.yaml").destination.associations == 2  # the default
    write_node_config(
        tmp_path / "four.yaml",
        tmp_path / "work",
        scoring_checkpoint,
        11112,
        4242,
        destination={**dest, "associations": 4},
    )
    assert load_node_config(tmp_path / "four.yaml").destination.associations == 4
    for bad in (0, 9, "two", 1.5, True):
        write_node_config(
            tmp_path / "bad.yaml",
            tmp_path / "work",
            scoring_checkpoint,
            11112,
            4242,
            destination={**dest, "associations": bad},
        )
        with pytest.raises(ConfigError, match="destination.associations"):
            load_node_config(tmp_path / "bad.yaml")
