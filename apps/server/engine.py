"""The generation engine: one worker thread, a bounded FIFO queue, jobs that can be watched and cancelled.

All model work (loading, text encoding, sampling, decoding, even the latent previews) runs on the one worker
thread: MLX evaluates an array only on the thread whose stream made it, and one generation at a time is what a
single GPU does best anyway. Request handlers only enqueue jobs and read their state; they never touch MLX.

    submit(job) -> queued -> running -> done | failed | cancelled
                      \\-> cancelled (removed from the queue)

Watchers on an asyncio loop (`Job.changes()`) are woken through `call_soon_threadsafe`; they read the job's
latest state, so a slow reader skips intermediate steps instead of queueing them up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from mlx_sd import backend, sd_upscale
from mlx_sd.infotext import a1111_title, save_png
from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Cancelled, Control, Pipeline, Progress, Result
from mlx_sd.sd_upscale import SDUpscale
from mlx_sd.upscale import IMAGE_UPSCALERS
from mlx_sd_convert.controlnet import a1111_hash
from mlx_sd_convert.ip_adapter import read_ip_adapter
from mlx_sd_convert.library import (
    ControlNetLibrary,
    EmbeddingLibrary,
    LoraLibrary,
    UpscalerLibrary,
    embeddings_api,
)

from .errors import ApiError
from .registry import ModelEntry

log = logging.getLogger("mlx_sd.server")

TERMINAL = ("done", "failed", "cancelled")
RECENT_DURATIONS = 8  # jobs averaged for the Retry-After estimate


@dataclass(frozen=True)
class Step:
    """Where a running generation is: step of total in batch of batches, seconds since it started."""

    step: int
    total: int
    batch: int
    batches: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return (self.batch + self.step / self.total) / self.batches

    @property
    def eta(self) -> float:
        """Seconds left, extrapolated from the time so far."""
        return self.elapsed / self.fraction - self.elapsed if self.fraction > 0 else 0.0

    def as_dict(self) -> dict:
        return {"step": self.step, "total": self.total, "batch": self.batch, "batches": self.batches,
                "fraction": round(self.fraction, 4), "elapsed": round(self.elapsed, 3),
                "eta": round(self.eta, 3)}  # fmt: skip


@dataclass(eq=False)
class Job:
    """One unit of work for the worker: a generation, loading a model ("load"), or a "task" (a callable, whose return
    value becomes `output`).

    Written by the worker, read by request handlers; each field is replaced whole, never mutated in place.
    """

    model: ModelEntry
    request: GenerationRequest | None = None
    refiner: ModelEntry | None = None  # SDXL's refiner, taking over from `request.refiner_switch_at`
    hires: ModelEntry | None = None  # the hires fix's second-pass model (A1111's hr_checkpoint_name)
    kind: str = "generate"
    task: Callable[[], object] | None = None
    sd_upscale: SDUpscale | None = None  # A1111's "SD upscale" script (its upscaler by name, loaded on the worker)
    output: object = None
    source: str = "native"
    save: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    textinfo: str | None = None
    step: Step | None = None
    preview: Image.Image | None = None
    result: Result | None = None
    partial: list[Image.Image] = field(default_factory=list)
    error: ApiError | None = None
    warnings: list[str] = field(default_factory=list)
    control: Control = field(default_factory=Control)
    _watchers: list = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def images(self) -> list[Image.Image]:
        """The finished images: all of them when done, those finished before a cancel otherwise."""
        return self.result.images if self.result is not None else self.partial

    def notify(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for loop, event in watchers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its watcher is gone
                pass

    async def changes(self) -> AsyncIterator[None]:
        """Yields now and after every change until the job is finished (read the job's fields on each yield)."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._watchers.append(entry)
        try:
            while True:
                yield
                if self.terminal:
                    return
                await event.wait()
                event.clear()
        finally:
            with self._lock:
                self._watchers.remove(entry)

    async def wait(self) -> None:
        async for _ in self.changes():
            pass


class Engine:
    """Runs jobs one at a time on a worker thread, in submission order.

    Args:
        initial: the model new jobs use unless they name another (switched by `set_default_model`).
        max_queue: jobs waiting behind the running one; `submit` refuses more (503 with Retry-After).
        keep_jobs: finished jobs kept (with their images) for later reads.
        output_dir: where jobs with `save=True` write their PNGs.
        preload: load the initial model as soon as the worker starts.
        lora_dir: LoRA files that `<lora:name:weight>` in a prompt resolves from (None: the syntax is refused).
        embeddings_dir: textual-inversion embeddings loaded into every model they fit.
        controlnet_dir: ControlNets that requests name (None: ControlNet units are refused).
        ip_adapter: (IP-Adapter file, image encoder folder) for requests with an image prompt, or None; read when the
            first model loads, attached to every model it fits.
        upscaler_dir: model upscalers (ESRGAN, ...) for the hires fix and the Extras endpoints (None: only the
            built-in upscalers).
    """

    def __init__(self, initial: ModelEntry, max_queue: int = 8, keep_jobs: int = 32, output_dir: Path | None = None,
                 preload: bool = True, lora_dir: Path | None = None, embeddings_dir: Path | None = None,
                 controlnet_dir: Path | None = None, ip_adapter: tuple[Path, Path] | None = None,
                 upscaler_dir: Path | None = None):  # fmt: skip
        self.default_model = initial
        self.max_queue = max_queue
        self.keep_jobs = keep_jobs
        self.output_dir = output_dir
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._stopping = False
        self._durations: deque[float] = deque(maxlen=RECENT_DURATIONS)
        self._pipeline: Pipeline | None = None
        self.loaded: ModelEntry | None = None
        self.refiner: ModelEntry | None = None  # the refiner attached to the loaded pipeline
        self.hires: ModelEntry | None = None  # the hires checkpoint attached to it
        self._thread = threading.Thread(target=self._work, name="mlx-sd-worker", daemon=True)
        self._preload = preload
        self.loras = LoraLibrary(lora_dir) if lora_dir is not None else None
        self.embeddings = EmbeddingLibrary(embeddings_dir) if embeddings_dir is not None else None
        self.embedding_listing: dict = {"loaded": {}, "skipped": {}}  # for GET /sdapi/v1/embeddings
        self.controlnets = ControlNetLibrary(controlnet_dir) if controlnet_dir is not None else None
        self.upscalers = UpscalerLibrary(upscaler_dir) if upscaler_dir is not None else None
        self.ip_adapter_paths = ip_adapter
        self.ip_adapter_title = a1111_title(ip_adapter[0].stem, a1111_hash(ip_adapter[0])) if ip_adapter else None
        self._ip_adapter = None  # read on the worker thread, with the first model
        self._ip_adapter_refused: str | None = None  # why the loaded model runs without it

    # --- used by request handlers ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._preload:
            self.submit(Job(self.default_model, kind="load", source="startup"), force=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job, force: bool = False) -> Job:
        """Queue a job. Raises ApiError 503 (with Retry-After) when the queue is full or the server is stopping."""
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._queue) >= self.max_queue and not force:
                seconds = self._retry_after_locked()
                raise ApiError(
                    503, f"the queue is full ({self.max_queue} requests waiting); retry in {seconds} s",
                    code="queue_full", headers={"Retry-After": str(seconds)},
                )  # fmt: skip
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def running(self) -> Job | None:
        with self._cond:
            return self._running

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, None unless queued."""
        with self._cond:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return None

    def cancel(self, job: Job) -> None:
        """Cancel a job: a queued one leaves the queue now; a running one stops at its next step."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._finish_locked(job, "cancelled")
                job.notify()
                return
        if job.status == "running":
            job.control.cancel()

    def interrupt(self) -> None:
        """A1111's interrupt: stop the running generation (its finished images are kept)."""
        job = self.running()
        if job is not None and job.kind == "generate":
            job.control.cancel()

    def skip(self) -> None:
        """A1111's skip: finish the running batch now and go on with the next one."""
        job = self.running()
        if job is not None and job.kind == "generate":
            job.control.skip()

    def stop(self) -> None:
        """Refuse new jobs and cancel the queued ones and the running one (returns at once; see `join`)."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            for job in queued:
                job.error = ApiError(503, "the server shut down before this job ran", code="shutting_down")
                self._finish_locked(job, "cancelled")
            running = self._running
            self._cond.notify_all()
        for job in queued:
            job.notify()
        if running is not None:
            running.control.cancel()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the worker to finish its job (cancelled by `stop`, it stops at its next step)."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def retry_after(self) -> int:
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, min(600, round(mean * (len(self._queue) + 1))))

    def _finish_locked(self, job: Job, status: str) -> None:
        job.status = status
        job.finished = time.time()
        finished = [j for j in self._jobs.values() if j.terminal]
        for old in finished[: max(0, len(finished) - self.keep_jobs)]:
            if old is not job:
                del self._jobs[old.id]

    # --- the worker thread -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                job.status, job.started = "running", time.time()
                self._running = job
                moved = list(self._queue)
            for waiting in (job, *moved):  # every queue position changed
                waiting.notify()
            status = self._execute(job)
            with self._cond:
                self._running = None
                self._durations.append(time.time() - job.started)
                self._finish_locked(job, status)
                idle = not self._queue
            job.notify()
            if idle:  # hand the activations' memory back while nothing waits (MLX's cache, the tuned malloc heap)
                backend.release_cpu_memory()

    def _execute(self, job: Job) -> str:
        """Run one job on this (the worker) thread; returns its final status. Never raises."""
        try:
            if job.kind == "task":  # work that needs no model (Extras upscaling), queued behind the generations
                job.output = job.task()
                return "done"
            self._ensure_loaded(job)
            if job.kind == "load":
                return "done"
            return self._generate(job)
        except Cancelled as e:
            job.partial = e.images
            if self._stopping:
                job.error = ApiError(503, "the server shut down during this job", code="shutting_down")
            return "cancelled"
        except ApiError as e:
            job.error = e
        except ValueError as e:  # parameters the model rejects, found before any work (the library names them)
            job.error = ApiError(422, str(e), code="invalid_value")
        except MemoryError:
            job.error = ApiError(507, "out of memory: try a smaller size or batch", code="out_of_memory")
        except Exception as e:  # a bug: report it, keep serving
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            job.error = ApiError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error")
        return "failed"

    def _ensure_loaded(self, job: Job) -> None:
        entry = job.model
        if self._pipeline is None or self.loaded is None or self.loaded.folder != entry.folder:
            self._load(job, entry)
        for role in ("refiner", "hires"):
            if job.kind == "generate" and getattr(job, role) != getattr(self, role):
                self._attach(job, role)

    def _attach(self, job: Job, role: str) -> None:
        """Attach the job's refiner or hires checkpoint (`role`: "refiner", "hires") to the loaded pipeline, or detach
        it; one of each is kept at a time."""
        setter = self._pipeline.set_refiner if role == "refiner" else self._pipeline.set_hires_model
        label, param = ("refiner", "refiner") if role == "refiner" else ("hires checkpoint", "hr_checkpoint_name")
        entry = getattr(job, role)
        setter(None)
        setattr(self, role, None)
        gc.collect()
        if entry is None:
            return
        job.textinfo = f"Loading {label} {entry.name}"
        job.notify()
        try:
            setter(entry.folder)
        except ValueError as e:  # a model that cannot take this role: the library says why
            raise ApiError(422, f"{label} {entry.name!r}: {e}", param=param, code="invalid_value") from None
        except Exception as e:
            log.error("loading %s failed:\n%s", entry.folder, traceback.format_exc())
            raise ApiError(500, f"{label} {entry.name!r} could not be loaded: {e}",
                           code="model_load_failed") from None  # fmt: skip
        setattr(self, role, entry)
        job.textinfo = None

    def _load(self, job: Job, entry: ModelEntry) -> None:
        job.textinfo = f"Loading model {entry.name}"
        job.notify()
        self._pipeline, self.loaded, self.refiner, self.hires = None, None, None, None
        gc.collect()  # free the previous model's arrays before the next one is read
        try:
            self._pipeline = Pipeline(entry.folder, lora_resolver=self.loras, controlnet_resolver=self.controlnets,
                                      upscaler_resolver=self.upscalers)  # fmt: skip
            self._attach_ip_adapter(entry)
            if self.embeddings is not None:
                loaded, skipped = self.embeddings.for_model(self._pipeline.model)
                self._pipeline.load_embeddings(loaded)
                self.embedding_listing = embeddings_api(loaded, skipped)
        except Exception as e:
            log.error("loading %s failed:\n%s", entry.folder, traceback.format_exc())
            raise ApiError(500, f"model {entry.name!r} could not be loaded: {e}", code="model_load_failed") from None
        self.loaded = entry
        job.textinfo = None

    def _attach_ip_adapter(self, entry: ModelEntry) -> None:
        self._ip_adapter_refused = None
        if self.ip_adapter_paths is None:
            return
        if self._ip_adapter is None:
            self._ip_adapter = read_ip_adapter(*self.ip_adapter_paths)
        try:
            self._pipeline.set_ip_adapter(self._ip_adapter)
        except ValueError as e:  # made for another family than this model
            self._ip_adapter_refused = f"model {entry.name!r} runs without an IP-Adapter: {e}"

    def _generate(self, job: Job) -> str:
        if job.request.ip_adapter_image is not None and self._ip_adapter_refused:
            raise ApiError(422, self._ip_adapter_refused, code="invalid_value")
        if job.sd_upscale is None:
            events = self._pipeline.stream(job.request, job.control)
        else:
            settings = job.sd_upscale
            if settings.upscaler not in IMAGE_UPSCALERS:
                settings = replace(settings, upscaler=self.upscalers(settings.upscaler))
            events = sd_upscale.stream(self._pipeline, job.request, settings, job.control)
        for event in events:
            if isinstance(event, Progress):
                # Previews are made here: their arrays belong to this thread's MLX stream.
                job.step = Step(event.step, event.total, event.batch, event.batches, event.elapsed)
                job.preview = event.preview()[0]
                job.notify()
            else:
                job.result = event
        if job.save and self.output_dir is not None:
            self._save(job)
        return "done"

    def _save(self, job: Job) -> None:
        result = job.result
        for i, (image, text, seed) in enumerate(zip(result.images, result.infotexts, result.seeds)):
            path = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id[:8]}-{i}-{seed}.png"
            try:
                save_png(image, path, text)
            except OSError as e:
                job.warnings.append(f"could not save {path.name}: {e}")
