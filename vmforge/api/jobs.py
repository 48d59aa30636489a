"""Background jobs (image pulls and builds, VM starts that nobody waits for), with readable
progress. Each job's progress also goes to the event stream (kind ``job``).

Sync work (pull, import, the built-in builders) runs in the daemon's job thread pool, never
on the event loop; async work (golden builds, VM starts) runs as a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import VmforgeError
from ..events import Event
from .events import EventBus

__all__ = ["Job", "JobManager", "JobState"]

JobState = str  # "running" | "succeeded" | "failed"
Report = Callable[[Event], None]


@dataclass
class Job:
    id: str
    kind: str                 # "image.pull", "image.build", "image.import", "vm.start", ...
    target: str | None        # the image or VM it is about
    state: JobState = "running"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    message: str = ""
    done: int | None = None   # bytes (pulls) when known
    total: int | None = None
    progress: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    result: Any = None
    error: dict[str, Any] | None = None
    task: asyncio.Future[Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "target": self.target, "state": self.state,
                "created_at": self.created_at, "finished_at": self.finished_at,
                "message": self.message, "done": self.done, "total": self.total,
                "progress": list(self.progress), "result": self.result, "error": self.error}


class JobManager:
    def __init__(self, bus: EventBus, *, keep: int = 500, workers: int = 4) -> None:
        self.bus = bus
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmforge-job")

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def _new(self, kind: str, target: str | None) -> Job:
        job = Job(f"job-{secrets.token_hex(6)}", kind, target)
        self._jobs[job.id] = job
        while len(self._jobs) > self._keep:
            old_id, old = next(iter(self._jobs.items()))
            if old.state == "running":
                break
            del self._jobs[old_id]
        self.bus.publish("job", "started", f"{kind} {target or ''}".strip(), job=job.id,
                         vm=target if kind.startswith("vm.") else None,
                         data={"kind": kind, "target": target})
        return job

    def reporter(self, job: Job) -> Report:
        """A progress callback for the job: recorded, and published on the event stream.
        Byte counts (``data`` with done/total) are published at most 4 times a second."""
        last = [0.0]

        def report(e: Event) -> None:
            if "done" in e.data:
                job.done = e.data.get("done")
                job.total = e.data.get("total")
                now = time.monotonic()
                if now - last[0] < 0.25 and job.done != job.total:
                    return
                last[0] = now
            job.message = e.message
            job.progress.append({"t": e.t, "phase": e.phase, "message": e.message,
                                 **({"data": e.data} if e.data else {})})
            vm = e.vm if job.kind.startswith("vm.") else None
            self.bus.publish("vm" if vm else "job", e.phase, e.message, job=job.id, vm=vm,
                             data=e.data,
                             t=e.t, state="ready" if e.phase == "ready" else
                             (e.message if e.phase == "state" else None))
        return report

    def _finish(self, job: Job, fut: asyncio.Future[Any]) -> None:
        job.finished_at = time.time()
        if fut.cancelled():
            job.state, job.error = "failed", {"error": "Cancelled", "message": "cancelled"}
        elif (exc := fut.exception()) is not None:
            job.state = "failed"
            job.error = {"error": type(exc).__name__,
                         "message": getattr(exc, "message", str(exc)) or type(exc).__name__,
                         "hint": getattr(exc, "hint", None),
                         "field": getattr(exc, "field", None)}
            if not isinstance(exc, VmforgeError):
                job.error["message"] = f"internal error: {exc!r}"
        else:
            job.state, job.result = "succeeded", fut.result()
        job.message = job.error["message"] if job.error else "done"
        self.bus.publish("job", job.state, job.message, job=job.id,
                         vm=job.target if job.kind.startswith("vm.") else None,
                         data={"kind": job.kind, "target": job.target,
                               **({"error": job.error} if job.error else {})})

    def run_sync(self, kind: str, target: str | None,
                 fn: Callable[[Report], Any]) -> Job:
        """Run ``fn(report)`` in the job thread pool."""
        job = self._new(kind, target)
        report = self.reporter(job)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, fn, report)
        job.task = fut
        fut.add_done_callback(lambda f: self._finish(job, f))
        return job

    def run_async(self, kind: str, target: str | None,
                  fn: Callable[[Report], Awaitable[Any]]) -> Job:
        job = self._new(kind, target)
        report = self.reporter(job)
        task = asyncio.ensure_future(fn(report))
        job.task = task
        task.add_done_callback(lambda f: self._finish(job, f))
        return job

    async def close(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done() and isinstance(job.task,
                                                                          asyncio.Task):
                job.task.cancel()
                with contextlib.suppress(BaseException):
                    await job.task
        self._pool.shutdown(wait=False, cancel_futures=True)
