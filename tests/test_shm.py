"""The shared-memory transport: segments grown by generation, read in place by peers,
removed by their creator (or by the driver after a killed worker); doorbells between the
ranks of different roles only; a silent peer or a gone driver raises instead of hanging."""

import multiprocessing as mp
import os
import uuid

import pytest
import torch

from fxdisagg.runtime.layout import RankLayout
from fxdisagg.runtime.shm import SharedMemoryTransport, doorbells, remove_segments, segment_path

LAYOUT = RankLayout(1, 2)        # CompNode rank 0, AttnNodes ranks 1-4
BELLS = doorbells(mp.get_context("spawn"), LAYOUT)


def _transport(rank, tag, **kw):
    return SharedMemoryTransport(rank, LAYOUT.world, tag=tag, bells=BELLS, **kw)


def test_segments_grow_by_generation_and_are_removed():
    tag = uuid.uuid4().hex[:8]
    t = _transport(0, tag)
    gen0, seg0 = t._segment("dispatch", 100)
    seg0[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    peer = _transport(1, tag)
    assert peer._their_segment(0, "dispatch", gen0, 4)[:4].tolist() == [1, 2, 3, 4]
    again, same = t._segment("dispatch", 200)
    assert (again, same.data_ptr()) == (gen0, seg0.data_ptr()), "reused while it fits"
    gen1, seg1 = t._segment("dispatch", 5 << 20)
    assert gen1 == gen0 + 1 and seg1.numel() >= 5 << 20
    assert not os.path.exists(segment_path(tag, 0, "dispatch", gen0))
    assert os.path.exists(segment_path(tag, 0, "dispatch", gen1))
    assert peer._their_segment(0, "dispatch", gen0, 4)[:4].tolist() == [1, 2, 3, 4], \
        "a peer's mapping outlives the file"
    t.close()
    assert not os.path.exists(segment_path(tag, 0, "dispatch", gen1))


def test_the_driver_removes_what_a_killed_worker_left():
    tag = uuid.uuid4().hex[:8]
    t = _transport(3, tag)
    t._segment("return", 10)
    path = segment_path(tag, 3, "return", 0)
    assert os.path.exists(path)
    remove_segments(tag)
    assert not os.path.exists(path)


def test_doorbells_ring_between_roles_only():
    assert [r for r, b in enumerate(BELLS[0]) if b is not None] == [1, 2, 3, 4]
    assert [r for r, b in enumerate(BELLS[3]) if b is not None] == [0]


def test_a_silent_peer_times_out_and_a_gone_driver_is_noticed(monkeypatch):
    import fxdisagg.runtime.shm as shm
    monkeypatch.setattr(shm, "_POLL", 0.05)
    tag = uuid.uuid4().hex[:8]
    t = _transport(1, tag, timeout=0.2)
    with pytest.raises(TimeoutError, match="rank 0 did not start layer 2 return within 0.2 s"):
        t._hear(0, t.bells[1][0], "layer 2 return")
    t = _transport(1, tag, alive=lambda: False)
    with pytest.raises(RuntimeError, match="the driver is gone"):
        t._hear(0, t.bells[1][0], "layer 2 return")
    remove_segments(tag)
