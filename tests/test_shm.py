"""The shared-memory transport: segments grown by generation, read in place by peers,
removed by their creator (or by the driver after a killed worker); doorbells between the
ranks of different roles only; a silent peer or a gone driver raises instead of hanging;
compute slots held while a worker runs and given back while it waits."""

import multiprocessing as mp
import os
import threading
import uuid

import pytest
import torch

from fxdisagg.runtime.layout import RankLayout
from fxdisagg.runtime.shm import SharedMemoryTransport, doorbells, remove_segments, segment_path
from fxdisagg.runtime.slots import CoreSlots, compute_slots, host_cpus

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
    with pytest.raises(TimeoutError, match="rank 1: waited 0.2 s for rank 0 to start layer 2 return"):
        t._hear({0: t.bells[1][0]}, "layer 2 return")
    t = _transport(1, tag, alive=lambda: False)
    with pytest.raises(RuntimeError, match="the driver is gone"):
        t._hear({0: t.bells[1][0]}, "layer 2 return")
    remove_segments(tag)


def test_compute_slots_are_shared_by_a_role_with_as_many_workers_as_cores_or_more():
    ctx = mp.get_context("spawn")
    slots = compute_slots(ctx, RankLayout(2, 2), cpus=[0, 1])     # 2 CompNodes, 4 AttnNodes
    assert slots[0] is slots[1] and slots[0] is not None
    assert all(s is slots[2] for s in slots[2:]) and slots[2] is not slots[0]
    assert compute_slots(ctx, RankLayout(2, 2), cpus=[0, 1, 2, 3, 4]) == [None] * 6
    assert compute_slots(ctx, RankLayout(1, 2), cpus=[0, 1])[0] is None  # one CompNode: 2 threads
    tp = compute_slots(ctx, RankLayout(2, 1, tp=2), cpus=[0, 1])  # 4 tensor-parallel CompNodes
    assert tp[0] is not None and all(s is tp[0] for s in tp[:4]) and tp[4] is None


def _slots(n: int = 1) -> CoreSlots:
    return CoreSlots(mp.get_context("spawn"), CPUS[:n])


CPUS = host_cpus()


@pytest.fixture(autouse=True)
def _affinity_restored():
    """A slot taken here pins the test's own thread to a core: give every core back."""
    yield
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, CPUS)


def test_a_worker_holds_its_slot_while_it_runs_and_not_while_it_waits():
    tag = uuid.uuid4().hex[:8]
    slots = _slots()
    comp, attn = _transport(0, tag), _transport(1, tag, slots=slots)
    attn.begin(None)
    assert slots.free() == 0, "running: the slot is taken"
    comp.bells[1][0].release()                  # the CompNode already rang: no wait
    attn._hear({0: attn.bells[1][0]}, "layer 0 dispatch")
    assert slots.free() == 0, "a wait that does not block keeps the slot"
    seen = []
    ring = threading.Timer(0.2, lambda: (seen.append(slots.free()), comp.bells[1][0].release()))
    ring.start()
    attn._hear({0: attn.bells[1][0]}, "layer 0 return")
    assert seen == [1], "while it waited, the slot was free for another worker"
    assert slots.free() == 0, "heard: the slot is taken again"
    attn.end()
    assert slots.free() == 1
    remove_segments(tag)


@pytest.mark.skipif(len(CPUS) < 2 or not hasattr(os, "sched_setaffinity"),
                    reason="core affinity needs Linux and two cores")
def test_slot_holders_run_on_cores_of_their_own_and_waiters_anywhere():
    """Two workers holding slots never share a core (the scheduler, left alone, stacked
    them on one while the other idled); a worker takes its last core again when it is free."""
    import copy
    slots = _slots(2)
    first, second = slots, copy.copy(slots)        # two workers' copies of the shared slots

    def take(s):
        s.take(lambda sem, what: sem.acquire())
        return os.sched_getaffinity(0)
    mine = take(first)
    theirs = take(second)
    assert len(mine) == len(theirs) == 1 and mine != theirs and slots.free() == 0
    second.give()
    assert os.sched_getaffinity(0) == set(CPUS[:2])
    first.give()
    assert take(first) == mine, "back on the core whose cache it warmed"
    first.give()


def _schedule(n: int):
    from fxdisagg.pieces import KEY, QUERY, LayerPieces, PieceSpec
    from fxdisagg.plan import Plan
    from fxdisagg.schedule import Schedule
    q = PieceSpec("q", torch.float32, (1, 2, None, 64), QUERY, 0)
    k = PieceSpec("k", torch.float32, (1, 2, None, 64), KEY, 0)
    out = PieceSpec("out", torch.float32, (1, 2, None, 64), QUERY, 0)
    return Schedule.build(Plan.build(n, 1, 2), LAYOUT, [LayerPieces(0, (q,), (k,), (out,), 2)])


def test_a_landing_is_one_file_its_receiver_and_senders_share_by_size_class():
    """The sender and the receiver map the same file (whichever is first creates it); a
    longer call moves both to a larger class and the receiver removes the old file."""
    tag = uuid.uuid4().hex[:8]
    sender, receiver = _transport(0, tag), _transport(1, tag)
    for t in (sender, receiver):
        t.begin(_schedule(1000))
    written = sender._landing(1, "dispatch")
    written[:3] = torch.tensor([7, 8, 9], dtype=torch.uint8)
    assert receiver._landing(1, "dispatch")[:3].tolist() == [7, 8, 9]
    small = receiver._landing_path(1, "dispatch", written.numel())
    assert os.path.exists(small) and written.numel() == 1 << 20
    for t in (sender, receiver):
        t.begin(_schedule(4000))     # 2000 rows of a shard x 2 heads x 64 x 4 bytes x (q, k)
    bigger = receiver._landing(1, "dispatch")
    assert bigger.numel() == 1 << 21 and not os.path.exists(small)
    assert sender._landing(1, "dispatch").numel() == 1 << 21
    assert sender._landing(0, "dispatch").numel() == 0, "a CompNode receives no dispatch"
    receiver.close()
    sender.close()
    assert not os.path.exists(receiver._landing_path(1, "dispatch", 1 << 21))
    remove_segments(tag)


def test_a_sender_that_sat_out_a_call_does_not_write_into_a_removed_landing():
    """Call A maps the receiver's landing in the sender; call B, of another size class,
    writes nothing from this sender, but the receiver moves and removes the old file; call
    C is A's size again: the sender must write into the receiver's new file, not the old
    mapping."""
    tag = uuid.uuid4().hex[:8]
    sender, receiver = _transport(0, tag), _transport(1, tag)
    big, small = _schedule(6000), _schedule(100)
    for schedule, sender_writes in ((big, True), (small, False), (big, True)):
        for t in (sender, receiver):
            t.begin(schedule)
        mine = receiver._landing(1, "dispatch")
        if sender_writes:
            sender._landing(1, "dispatch")[:2] = torch.tensor([5, 6], dtype=torch.uint8)
            assert mine[:2].tolist() == [5, 6]
            mine[:2] = 0
    sender.close()
    receiver.close()
    remove_segments(tag)
