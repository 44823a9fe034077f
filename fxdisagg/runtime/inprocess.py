"""launch="inprocess": every worker is a thread of the caller's process.

The same `Worker` loop and role programs as the spawn and torchrun runtimes; only the
transport differs (`QueueTransport`: mailboxes, no process boundary). It exists to prove
programs and schedules exact without processes, and to debug them in one debugger.
Threads persist across calls, like processes do.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref

from fxdisagg.runtime.driver import Driver
from fxdisagg.runtime.transport import Mailboxes, QueueTransport
from fxdisagg.runtime.worker import Worker, serve


class InProcessRuntime(Driver):
    def __init__(self, config):
        super().__init__(config)
        world = self.layout.world
        self.mail = Mailboxes(world, self.timeout)
        self.inboxes = [queue.Queue() for _ in range(world)]
        self.outbox: queue.Queue = queue.Queue()
        self.workers = []
        for r in range(world):
            transport = QueueTransport(r, world, self.mail)
            transport.progress = self.progress
            w = Worker(r, self.layout, transport, strategy=config.sharding,
                       cache_size=config.cache_size)
            self.workers.append(w)
        self.threads = [threading.Thread(target=serve, args=(w, self.inboxes[w.rank], self.outbox),
                                         name=f"fxdisagg-{self.layout.describe(w.rank)}", daemon=True)
                        for w in self.workers]
        for t in self.threads:
            t.start()
        self._finalizer = weakref.finalize(self, _stop, self.mail, self.inboxes, self.threads)

    def _post(self, rank, msg):
        self.inboxes[rank].put(msg)

    def _answers(self):
        return self.outbox

    def _dead(self):
        return None          # a thread reports its own failure before it ends (`serve`)

    def _stop(self):
        self._finalizer()


def _stop(mail: Mailboxes, inboxes, threads, grace: float = 10.0) -> None:
    """Abort exchanges in flight, end every worker thread's loop and wait for it (at most
    ``grace`` seconds in all). Safe to call twice; also runs at interpreter exit.

    The wait matters at exit: a daemon thread still inside a torch op when the interpreter
    finalises is ended by ``pthread_exit`` unwinding through C++ frames, which aborts the
    whole process ("terminate called without an active exception").
    """
    mail.abort.set()
    for q in inboxes:
        q.put(("close",))
    deadline = time.monotonic() + grace
    for t in threads:
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
