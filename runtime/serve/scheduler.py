"""One request queue in front of one Pipeline: bounded, micro-batched, with deadlines and cancellation.

`Scheduler.submit(request)` checks the request against the engine (`Pipeline.prepare`: a user error
raises ValueError here, before it is queued) and returns a Ticket whose `future` gets the request's
GenerationResult. One worker thread runs the queue in order. A txt2img request that can share a UNet
batch (one prompt, batch_size 1, no image, mask or latents, a deterministic sampler) waits up to
`batch_window` seconds for others with the same size, steps, sampler, guidance and decoder; they run as
one `generate` of a prompt list whose initial latents are each request's own seeded noise, so every
image is the one its request gives alone (up to the floating-point summation order of a larger batch).
Work whose client left (`cancel`) or whose deadline passed is dropped from the queue, and a running
batch stops at its next UNet step once none of its tickets still wants it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from diffusion_engine.runtime.pipeline import GenerationResult, Pipeline
from diffusion_engine.runtime.request import GenerationRequest, Job
from diffusion_engine.runtime.samplers import STOCHASTIC


class QueueFull(RuntimeError):
    """The queue holds max_queue requests; retry after `retry_after` seconds (an estimate)."""

    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"the queue is full ({depth} requests waiting); retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The server is stopping: it finishes the work it has and takes no more."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its images were made."""


class Cancelled(RuntimeError):
    """Raised inside a running batch's progress callback when none of its tickets still wants it."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: its checked job, its deadline (time.monotonic()) and the future of its result."""

    request: GenerationRequest
    job: Job
    deadline: float | None
    key: tuple | None  # the micro-batching key; None: runs alone
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def wanted(self) -> bool:
        return not self.cancelled and not self.future.done() and (self.deadline is None or time.monotonic() < self.deadline)


@dataclass
class Progress:
    """What the worker is doing, for /sdapi/v1/progress: evaluations done of the running batch's total."""

    running: int = 0  # requests in the running batch
    done: int = 0
    total: int = 0
    started: float | None = None


def batch_key(job: Job) -> tuple | None:
    """Requests with equal keys can share one UNet batch; None for a request that must run alone."""
    r = job.request
    alone = (r.image is not None or r.mask is not None or r.latents is not None or r.refiner is not None
             or r.batch_size != 1 or len(job.prompts) != 1 or job.scheduler in STOCHASTIC)
    if alone:
        return None
    return (job.height, job.width, job.steps, job.scheduler, job.guidance_scale, r.guidance_rescale, job.decoder,
            job.size_ids, job.negative_size_ids)


Observer = Callable[[str, dict[str, Any]], None]


class Scheduler:
    """The queue and its worker thread around one Pipeline (see the module docstring)."""

    def __init__(self, pipe: Pipeline, max_queue: int = 32, batch_window: float = 0.02, max_batch: int | None = None,
                 observe: Observer | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if not batch_window >= 0:
            raise ValueError(f"batch_window must be >= 0 seconds, got {batch_window}")
        self.pipe = pipe
        self.max_queue = max_queue
        self.batch_window = batch_window
        self.max_batch = max(1, min(max_batch or pipe.manifest.build.max_batch, pipe.manifest.build.max_batch))
        self.observe = observe or (lambda event, data: None)
        self.progress = Progress()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._seconds_per_request = 1.0  # a running estimate, for Retry-After
        self._worker = threading.Thread(target=self._work, name="diffusion-engine-scheduler", daemon=True)
        self._worker.start()

    # -- intake ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, timeout: float | None = None) -> Ticket:
        """Check and queue a request; ValueError (a user error), QueueFull or ShuttingDown before it is queued."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        job = self.pipe.prepare(request)  # every check; draws the seed where the request has none
        ticket = Ticket(request, job, None if timeout is None else time.monotonic() + timeout, batch_key(job))
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue.append(ticket)
            self.observe("queued", {"depth": len(self._queue)})
            self._cond.notify_all()
        return ticket

    def retry_after(self) -> float:
        """Seconds until the queue has likely room again: its depth times the recent seconds per request."""
        return max(1.0, len(self._queue) * self._seconds_per_request)

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone: drop the ticket's queued work (a running batch stops once nobody wants it)."""
        ticket.cancelled = True
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self.observe("dropped", {"reason": "cancelled", "depth": len(self._queue)})
        ticket.future.cancel()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, finish the queued and running work, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Ticket] | None:
        """The oldest wanted ticket and, for a batchable one, the compatible tickets that arrive within the window."""
        with self._cond:
            while True:
                self._drop_unwanted()
                if self._queue:
                    break
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            if first.key is None or self.max_batch == 1:
                return batch
            end = time.monotonic() + self.batch_window
            while True:
                for t in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if t.key == first.key and t.wanted:
                        self._queue.remove(t)
                        batch.append(t)
                left = end - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._closing:
                    return batch
                self._cond.wait(left)

    def _drop_unwanted(self) -> None:
        for t in [t for t in self._queue if not t.wanted]:
            self._queue.remove(t)
            if not t.cancelled and not t.future.done():
                t.future.set_exception(DeadlineExceeded("the request's deadline passed while it waited in the queue"))
                self.observe("dropped", {"reason": "deadline", "depth": len(self._queue)})

    def _run(self, batch: list[Ticket]) -> None:
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.monotonic()
        self.progress = Progress(len(live), 0, 0, time.time())

        def progress(done: int, total: int) -> None:
            self.progress.done, self.progress.total = done, total
            if not any(t.wanted for t in live):
                raise Cancelled("no request of this batch is still waiting for it")

        try:
            results = self._generate(live, progress)
        except Cancelled:
            for t in live:
                _fail(t, DeadlineExceeded("the request's deadline passed while it ran") if not t.cancelled else
                      Cancelled("the client went away"))
            self.observe("dropped", {"reason": "abandoned", "size": len(live)})
            return
        except BaseException as exc:  # the engine failed: every request of the batch gets the error
            for t in live:
                _fail(t, exc)
            self.observe("error", {"kind": type(exc).__name__})
            return
        finally:
            self.progress = Progress()
        seconds = time.monotonic() - start
        self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * seconds / len(live)
        self.observe("batch", {"size": len(live), "timings": results[0].timings, "seconds": seconds})
        for t, result in zip(live, results):
            if t.deadline is not None and time.monotonic() > t.deadline:
                _fail(t, DeadlineExceeded("the request's deadline passed while it ran"))
            elif not t.future.done():
                t.future.set_result(result)

    def _generate(self, batch: list[Ticket], progress: Callable[[int, int], None]) -> list[GenerationResult]:
        return run_together(self.pipe, [t.job for t in batch], progress)


def run_together(pipe: Pipeline, jobs: list[Job], progress: Callable[[int, int], None] | None = None
                 ) -> list[GenerationResult]:
    """Prepared jobs' results: one job as itself (with the seed prepare drew); jobs of one batch_key as one
    generate of their prompts and seeded noise, split per job (each alone where the engine refuses the batch)."""
    if len(jobs) == 1:
        job = jobs[0]
        request = job.request if job.request.latents is not None else replace(job.request, seed=job.seed)
        return [pipe.run(request, progress)]
    first = jobs[0]
    combined = replace(
        first.request, prompt=[j.prompts[0] for j in jobs], negative_prompt=[j.negatives[0] for j in jobs],
        latents=np.concatenate([j.noise for j in jobs]), seed=None, steps=first.steps,
        guidance_scale=first.guidance_scale, scheduler=first.scheduler, height=first.height, width=first.width)
    try:
        out = pipe.run(combined, progress)
    except ValueError:  # the engine refuses the larger batch (its memory check): each request alone
        return [run_together(pipe, [j], progress)[0] for j in jobs]
    timings = {**out.timings, "batch": float(len(jobs))}
    return [GenerationResult([out.images[i]], out.array[i : i + 1], j.seed, timings, j.parameters())
            for i, j in enumerate(jobs)]


def _fail(ticket: Ticket, exc: BaseException) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(exc)
