"""The shared-memory transport's segments: grown by generation, read in place by peers,
removed by their creator (or by the driver after a killed worker)."""

import os
import uuid

import torch

from fxdisagg.runtime.shm import SharedMemoryTransport, remove_segments, segment_path


def test_segments_grow_by_generation_and_are_removed():
    tag = uuid.uuid4().hex[:8]
    t = SharedMemoryTransport(0, 1, tag=tag)
    gen0, seg0 = t._segment("dispatch", 100)
    seg0[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    peer = SharedMemoryTransport(1, 1, tag=tag)
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
    t = SharedMemoryTransport(3, 4, tag=tag)
    t._segment("return", 10)
    path = segment_path(tag, 3, "return", 0)
    assert os.path.exists(path)
    remove_segments(tag)
    assert not os.path.exists(path)
