"""Pieces of the spawn runtime on their own: the pipe a worker and the driver talk over
(`Channel`, `_Answers`) and the per-call thread count of a CompNode (`CallThreads`)."""

import multiprocessing as mp
import queue

import pytest
import torch

from fxdisagg.runtime.spawn import CallThreads, Channel, _Answers


def test_channel_keeps_order_inlines_small_tensors_and_reports_a_closed_end():
    ours, theirs = mp.get_context("spawn").Pipe()
    driver, worker = Channel(ours, inline=False), Channel(theirs)
    for i in range(3):
        driver.put(("run", i))
    assert [worker.get(timeout=1.0)[1] for _ in range(3)] == [0, 1, 2]
    small = torch.arange(6.0).reshape(2, 3)
    worker.put(("done", 0, small))
    got = driver.get(timeout=1.0)[2]
    assert torch.equal(got, small) and got.data_ptr() != small.data_ptr()
    with pytest.raises(queue.Empty):
        driver.get(timeout=0.01)          # nothing sent: empty after the timeout
    worker.close()
    with pytest.raises(queue.Empty):
        driver.get(timeout=1.0)           # the other end is gone: empty, never a hang


def test_answers_come_from_every_worker_and_skip_a_gone_one():
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(3)]
    answers = _Answers([Channel(a, inline=False) for a, _ in pipes])
    for r, (_, b) in enumerate(pipes):
        if r != 1:
            Channel(b).put(("done", r))
    pipes[1][1].close()                   # worker 1 died without answering
    got, empties = set(), 0
    while len(got) < 2:
        try:
            got.add(answers.get(timeout=1.0)[1])
        except queue.Empty:
            empties += 1
            assert empties <= 2
    assert got == {0, 2}


def test_compnode_threads_follow_the_rows_of_a_call():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threads = CallThreads(2)
        threads(4)                        # a decode step of batch 4
        assert torch.get_num_threads() == 1
        threads(CallThreads.SMALL_ROWS)   # a prefill chunk
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
