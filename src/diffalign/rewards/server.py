"""``diffalign reward-server``: serve any registered reward over HTTP (Starlette on uvicorn).

Endpoints::

    POST /score   {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]?}
                  → 200 {"reward": name, "scores": [...], "details": {key: [...]}, "batch_images": n}
    GET  /health  → 200 {"status": "ok", "reward": name, "requests": ..., "batches": ..., ...}

Concurrent requests are **batched**: the first waiting request opens a batch, which collects
further requests for up to ``batch_wait_ms`` or until ``max_batch_images``, then one reward
call scores them all (split by image size) in a single worker thread, so a GPU model sees
large batches and never two calls at once.

Every answer is JSON; errors are ``{"error": message, "reward": name}``: 400 the body is not
JSON (syntax, text encoding, nesting too deep to parse); 404 / 405 unknown path or method; 422
fields missing, of the wrong type or length, an image that is not a readable PNG, or images of a
size the reward does not take (its declared ``input_sizes``, checked before queueing); 413 body
larger than ``max_request_mb`` or more than ``max_images_per_request`` images; 503 queue full
(retry later); 504 not scored within ``request_timeout_s``; 422 as well when the reward rejects
a request's input while scoring it (a prompt it cannot parse, an image it cannot read); 500 the
reward itself failed (the message names it), or a server bug (logged). A failing batch of
several requests is retried one request at a time, so one bad request cannot fail its neighbours. ``/health`` counts every
answer by status (``responses``) and every 4xx / 5xx in ``errors``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch

from diffalign.config import check_ranges, ranged
from diffalign.errors import PromptError
from diffalign.rewards.base import Reward, RewardInputError, check_input, checked_call, input_sizes
from diffalign.rewards.remote import decode_image, images_to_tensor

_log = logging.getLogger("diffalign.reward_server")


@dataclass
class ServerConfig:
    """Reward-server limits and batching."""

    max_batch_images: int = ranged(64, ge=1)
    """Most images scored in one reward call (concurrent requests are merged up to this)."""
    batch_wait_ms: float = ranged(10.0, ge=0)
    """After the first request of a batch arrives, wait this long (milliseconds) for more."""
    max_request_mb: float = ranged(64.0, gt=0)
    """Largest request body (MiB); larger requests get 413."""
    max_images_per_request: int = ranged(512, ge=1)
    """Most images in one request; more get 413."""
    request_timeout_s: float = ranged(300.0, gt=0)
    """A request not scored within this many seconds (queueing included) gets 504."""
    max_queue_images: int = ranged(8192, ge=1)
    """Images waiting to be scored; a request arriving above this gets 503 (the client retries)."""

    def __post_init__(self) -> None:
        check_ranges(self)  # built from CLI flags, not load_config: check the declared ranges here


@dataclass
class _Job:
    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Batcher:
    """Merges queued jobs into reward calls run one at a time in a worker thread."""

    def __init__(self, reward: Reward, cfg: ServerConfig):
        self.reward, self.cfg = reward, cfg
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.queue: asyncio.Queue[_Job] | None = None
        self.carry: _Job | None = None
        self.queued_images = 0
        self.stats = {"requests": 0, "batches": 0, "images": 0, "errors": 0, "reward_failures": 0, "timeouts": 0,
                      "max_requests_per_batch": 0, "reward_seconds": 0.0}

    def submit(self, job: _Job) -> None:
        if self.queued_images + len(job.prompts) > self.cfg.max_queue_images:
            raise _HTTPError(503, f"server busy: {self.queued_images} images queued (max_queue_images="
                                  f"{self.cfg.max_queue_images}); retry later")
        self.queued_images += len(job.prompts)
        self.queue.put_nowait(job)

    async def _next_batch(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        first = self.carry or await self.queue.get()
        self.carry = None
        jobs, n = [first], len(first.prompts)
        deadline = loop.time() + self.cfg.batch_wait_ms / 1000
        while n < self.cfg.max_batch_images:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if n + len(job.prompts) > self.cfg.max_batch_images:
                self.carry = job  # opens the next batch
                break
            jobs.append(job)
            n += len(job.prompts)
        return jobs

    def _score(self, jobs: list[_Job]):
        images = torch.cat([j.images for j in jobs])
        prompts = [p for j in jobs for p in j.prompts]
        meta = [m for j in jobs for m in j.metadata]
        return checked_call(self.reward, images, prompts, meta)

    async def _run_group(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self.executor, self._score, jobs)
        except Exception as e:  # noqa: BLE001 - reported to the requests
            if len(jobs) > 1:  # find the request that fails; the others still get scores
                for j in jobs:
                    await self._run_group([j])
                return
            self.stats["reward_failures"] += 1
            if not jobs[0].future.done():
                name = getattr(self.reward, "name", type(self.reward).__name__)
                status = 422 if _input_fault(e) else 500  # the request's images or prompts, not the reward
                jobs[0].future.set_exception(_HTTPError(status, f"reward {name!r} failed: {type(e).__name__}: {e}"))
            return
        finally:
            self.stats["reward_seconds"] += time.perf_counter() - t0
        n_total = len(out.scores)
        s = 0
        for j in jobs:
            k = len(j.prompts)
            if not j.future.done():
                j.future.set_result({"scores": out.scores[s : s + k].tolist(), "batch_images": n_total,
                                     "details": {key: v[s : s + k].tolist() for key, v in out.details.items()}})
            s += k

    async def run(self) -> None:
        while True:
            jobs = await self._next_batch()
            self.queued_images -= sum(len(j.prompts) for j in jobs)
            live = [j for j in jobs if not j.future.done()]  # timed-out requests are skipped
            if not live:
                continue
            self.stats["batches"] += 1
            self.stats["images"] += sum(len(j.prompts) for j in live)
            self.stats["max_requests_per_batch"] = max(self.stats["max_requests_per_batch"], len(live))
            by_size: dict[tuple[int, int], list[_Job]] = {}
            for j in live:
                by_size.setdefault(tuple(j.images.shape[-2:]), []).append(j)
            for group in by_size.values():
                try:
                    await self._run_group(group)
                except Exception as e:  # noqa: BLE001 - keep serving; fail only these requests
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(_HTTPError(500, f"{type(e).__name__}: {e}"))


def _input_fault(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from (``raise ... from``), blames the request's
    input (its images or prompts: :class:`RewardInputError`, :class:`PromptError`) rather than the reward."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (RewardInputError, PromptError)):
            return True
        seen.add(id(e))
        e = e.__cause__
    return False


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_safe(value):
    """A copy with non-finite floats as None (strict JSON has no NaN / Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_response(content, status: int = 200):
    """A strict-JSON response (ASCII-escaped, so any string encodes, even a lone surrogate)."""
    from starlette.responses import Response

    try:
        body = json.dumps(content, ensure_ascii=True, allow_nan=False)
    except ValueError:
        body = json.dumps(_json_safe(content), ensure_ascii=True, allow_nan=False)
    return Response(body, status_code=status, media_type="application/json")


def _loads(body: bytes):
    """The decoded JSON body; every parser failure (syntax, encoding, nesting depth) is a 400."""
    try:
        return json.loads(body)
    except RecursionError:
        raise _HTTPError(400, "the body nests JSON arrays / objects too deeply to parse; send one flat object "
                              "{\"images\": [...], \"prompts\": [...]}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (not UTF-8/16/32), int too long
        raise _HTTPError(400, f"the body is not valid JSON ({type(e).__name__}: {_short(e)})") from None


def _decode_images(images: list) -> torch.Tensor:
    arrays = []
    for i, data in enumerate(images):
        try:
            arrays.append(decode_image(data))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise _HTTPError(422, f"images[{i}]: {_short(e)}") from None
    if len({a.shape for a in arrays}) > 1:
        raise _HTTPError(422, f"images in one request must share one size; got {sorted({a.shape[:2] for a in arrays})}")
    return images_to_tensor(arrays)


def _parse(payload, cfg: ServerConfig, reward: Reward | None = None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Validate a decoded JSON body; raises _HTTPError(422/413) that says what is wrong."""
    if not isinstance(payload, dict):
        raise _HTTPError(422, f"the body must be a JSON object with 'images' and 'prompts', got {type(payload).__name__}")
    images, prompts = payload.get("images"), payload.get("prompts")
    metadata = payload.get("metadata")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise _HTTPError(422, "'images' (list of base64 PNG strings) and 'prompts' (list of strings) are required")
    if not images:
        raise _HTTPError(422, "'images' is empty; send at least one image")
    if len(images) != len(prompts):
        raise _HTTPError(422, f"got {len(images)} images but {len(prompts)} prompts; send one prompt per image")
    if len(images) > cfg.max_images_per_request:
        raise _HTTPError(413, f"{len(images)} images in one request; the limit is {cfg.max_images_per_request} "
                              f"(split the batch)")
    if not all(isinstance(p, str) for p in prompts):
        raise _HTTPError(422, "every prompt must be a string")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or len(metadata) != len(prompts) or not all(isinstance(m, dict) for m in metadata):
        raise _HTTPError(422, "'metadata', when given, must be a list of one JSON object per image")
    tensor = _decode_images(images)
    try:
        check_input(reward, tensor)  # the reward's declared input size, before it is queued
    except RewardInputError as e:
        raise _HTTPError(422, str(e)) from None
    return tensor, prompts, metadata


def _decode_request(body: bytes, cfg: ServerConfig, reward: Reward):
    """Body bytes → (images, prompts, metadata); runs in a worker thread (large bodies)."""
    return _parse(_loads(body), cfg, reward)


class _Service:
    """The endpoints of one server. Every answer is JSON and counted by status in /health."""

    def __init__(self, reward: Reward, cfg: ServerConfig):
        self.reward, self.cfg = reward, cfg
        self.batcher = Batcher(reward, cfg)
        self.limit = int(cfg.max_request_mb * 2**20)
        self.started = time.time()
        self.name = getattr(reward, "name", type(reward).__name__)
        self.responses: dict[str, int] = {}

    def answer(self, content: dict, status: int = 200):
        self.responses[str(status)] = self.responses.get(str(status), 0) + 1
        if status >= 400:
            self.batcher.stats["errors"] += 1
        return _json_response(content, status)

    def error(self, status: int, message: str):
        return self.answer({"error": message, "reward": self.name}, status)

    async def read_body(self, request) -> bytes:
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limit:
                too_big = True
                if size > 8 * self.limit:  # stop draining a huge upload; the connection is closed
                    break
            elif not too_big:
                chunks.append(chunk)
        if too_big:
            raise _HTTPError(413, f"request body of {max(size, int(declared or 0)) / 2**20:.1f} MiB exceeds "
                                  f"max_request_mb={self.cfg.max_request_mb:g}; send fewer images per request")
        return b"".join(chunks)

    async def _scored(self, request) -> dict:
        from starlette.concurrency import run_in_threadpool

        body = await self.read_body(request)
        images, prompts, metadata = await run_in_threadpool(_decode_request, body, self.cfg, self.reward)
        future = asyncio.get_running_loop().create_future()
        self.batcher.submit(_Job(images, prompts, metadata, future))
        try:
            return await asyncio.wait_for(future, self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            self.batcher.stats["timeouts"] += 1
            raise _HTTPError(504, f"not scored within request_timeout_s={self.cfg.request_timeout_s:g} s") from None

    async def score(self, request):
        from starlette.requests import ClientDisconnect

        self.batcher.stats["requests"] += 1
        try:
            result = await self._scored(request)
        except _HTTPError as e:
            return self.error(e.status, e.message)
        except ClientDisconnect:
            return self.error(400, "client disconnected")
        except Exception as e:  # noqa: BLE001 - a server bug: answer JSON, log it, keep serving
            _log.exception("reward server: unexpected error answering POST /score")
            return self.error(500, f"internal server error: {type(e).__name__}: {_short(e)}")
        return self.answer({"reward": self.name, **result})

    async def health(self, request):
        cfg = self.cfg
        return self.answer({"status": "ok", "reward": self.name, "uptime_s": round(time.time() - self.started, 3),
                            "queued_images": self.batcher.queued_images, **self.batcher.stats,
                            "responses": dict(self.responses), "input_sizes": input_sizes(self.reward),
                            "limits": {"max_batch_images": cfg.max_batch_images, "max_request_mb": cfg.max_request_mb,
                                       "max_images_per_request": cfg.max_images_per_request,
                                       "request_timeout_s": cfg.request_timeout_s}})

    async def http_error(self, request, exc):
        """Routing errors (404 unknown path, 405 wrong method) as JSON too."""
        return self.error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; the server "
                                           "answers POST /score and GET /health")

    @asynccontextmanager
    async def lifespan(self, app):
        self.batcher.queue = asyncio.Queue()
        task = asyncio.create_task(self.batcher.run())
        try:
            yield
        finally:
            task.cancel()
            self.batcher.executor.shutdown(wait=False, cancel_futures=True)


def create_app(reward: Reward, cfg: ServerConfig | None = None):
    """The Starlette application serving ``reward``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    service = _Service(reward, cfg or ServerConfig())
    app = Starlette(routes=[Route("/score", service.score, methods=["POST"]),
                            Route("/health", service.health, methods=["GET"])],
                    lifespan=service.lifespan, exception_handlers={HTTPException: service.http_error})
    app.state.batcher = service.batcher
    app.state.service = service
    return app


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 8000, cfg: ServerConfig | None = None,
          log_level: str = "warning") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(create_app(reward, cfg), host=host, port=port, log_level=log_level, timeout_keep_alive=30)
