"""The one thread that runs the model: it takes requests from the HTTP side, steps the batched generator
and hands each finished request (or each streamed token) back to the asyncio loop that awaits it.

Only this thread touches the model during generation; adapter registration takes the registry's lock,
which the thread holds during every step, so a forward never sees half an adapter.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from train.serving.engine import BatchedGenerator, GenerationRequest

LOG = logging.getLogger("mmtune.serve")


@dataclass
class Ticket:
    """A request on its way: the asyncio loop that waits, the future it waits on, an optional token queue."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    tokens: asyncio.Queue | None = None


class GenerationWorker:
    def __init__(self, generator: BatchedGenerator, lock: threading.Lock) -> None:
        self.generator, self.lock = generator, lock
        self.inbox: queue.Queue[Ticket] = queue.Queue()
        self.tickets: dict[int, Ticket] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mmtune-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def submit(self, ticket: Ticket) -> None:
        if ticket.tokens is not None:
            ticket.request.on_token = lambda token: ticket.loop.call_soon_threadsafe(ticket.tokens.put_nowait, token)
        self.inbox.put(ticket)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self._take_new(block=not self.generator.busy())
            if not self.generator.busy():
                continue
            try:
                with self.lock:
                    finished = self.generator.step()
            except Exception as err:  # a bug in one batch must not stop the server: fail that batch only
                LOG.exception("generation step failed")
                self._fail_all(err)
                continue
            for request in finished:
                self._settle(self.tickets.pop(request.request_id), None)

    def _take_new(self, block: bool) -> None:
        try:
            ticket = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self.generator.submit(ticket.request)
            self.tickets[ticket.request.request_id] = ticket
            try:
                ticket = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self, err: Exception) -> None:
        for ticket in self.tickets.values():
            self._settle(ticket, err)
        self.tickets.clear()
        generator = self.generator
        generator.waiting, generator.running = [], []
        generator.cache = generator.mask = generator.positions = generator.last = None

    @staticmethod
    def _settle(ticket: Ticket, err: Exception | None) -> None:
        def finish() -> None:
            if ticket.done.done():
                return  # the client went away and the handler cancelled its wait
            if err is None:
                ticket.done.set_result(ticket.request)
            else:
                ticket.done.set_exception(err)
            if ticket.tokens is not None:
                ticket.tokens.put_nowait(None)  # end of stream

        ticket.loop.call_soon_threadsafe(finish)
