"""`entgan serve`: a trained generator as an HTTP data source (FastAPI on uvicorn).

    GET  /health   {"status": "ok", "model": "digits v2", "job": "digits", "version": 2, ...}
    GET  /tasks    the model's tasks (name, index, source labels) and image shape
    POST /sample   {"task": "low", "n": 16, "seed": 0, "format": "grid" | "npy" | "zip"}
                   -> a PNG grid, a NumPy .npy file of uint8 (N, H, W, C), or a zip of N PNGs;
                   headers X-EntGAN-Model (the version that drew them), X-EntGAN-Seed

What it serves: a job's deployed version, or a run directory's newest checkpoint (see
`entgan.deployed`). Before each request it asks again which checkpoint is current (one SQLite
read for a job, a directory listing for a run) and, when that changed, loads the new one and
swaps it in whole; requests under way finish on the model they started with, and every response
names the version that drew it. Checkpoints are only read under their final names, which the
engine renames into place once fully written, and a file that still fails to load is not
swapped in: the server keeps serving the version it has and says so in /health
(`"status": "stale"` with the error).

Bad requests get a 4xx and a JSON body `{"error": "..."}`: a body that is not JSON (400), an
unknown field, a missing task, `n` outside 1..max_n, an unknown format (422), an unknown task (404).
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import secrets
import socket
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from entgan.config import ConfigError
from entgan.deployed import LoadedModel, ResolvedModel, load_resolved, resolve

DEFAULT_MAX_N = 256
MEDIA_TYPES = {"grid": "image/png", "npy": "application/x-npy", "zip": "application/zip"}


@dataclass
class _Current:
    model: LoadedModel
    key: tuple[str, str, int, int]
    loaded_at: str


class ModelWatcher:
    """Holds the model being served and swaps in the one that becomes current.

    Runs on the server's event loop: the jobs database connection is only used from that thread;
    checkpoints are loaded in a worker thread, one at a time.
    """

    def __init__(self, reference: str, jobs_root: str | Path | None = None, db: str | Path | None = None) -> None:
        self.reference = reference
        self._store = None
        if not Path(reference).is_dir():
            from entgan.lifelong.api import Jobs

            try:
                self._store = Jobs(jobs_root, db, must_exist=True).store
            except ConfigError as error:
                raise ConfigError(f"{reference}: no such run directory; as a job name: {error}") from None
        resolved = self._resolve()
        self.current = _Current(load_resolved(resolved), resolved.key(), _now())
        self.error: str | None = None
        self._lock: asyncio.Lock | None = None

    def _resolve(self) -> ResolvedModel:
        return resolve(self.reference, store=self._store)

    async def refresh(self) -> LoadedModel:
        """The model to use for this request: the current one, reloaded first if it changed."""
        try:
            resolved = self._resolve()
            key = resolved.key()
        except (ConfigError, OSError) as error:
            self.error = f"cannot tell which version is current, serving {self.current.model.label}: {error}"
            return self.current.model
        if key == self.current.key:
            self.error = None
            return self.current.model
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if key != self.current.key:
                try:
                    model = await run_in_threadpool(load_resolved, resolved)
                except (ConfigError, OSError) as error:
                    self.error = f"{resolved.label} did not load, serving {self.current.model.label}: {error}"
                    return self.current.model
                self.current = _Current(model, key, _now())
                self.error = None
        return self.current.model

    def health(self) -> dict[str, Any]:
        model = self.current.model
        return {
            "status": "ok" if self.error is None else "stale",
            "model": model.label,
            "job": model.resolved.job,
            "version": model.resolved.job_version,
            "checkpoint": str(model.resolved.checkpoint),
            "tasks": model.task_names,
            "loaded_at": self.current.loaded_at,
            "error": self.error,
        }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def encode(images: Any, output: str) -> bytes:
    """Generated images (N, C, H, W) in [-1, 1] as the bytes of one response body."""
    import numpy as np
    from PIL import Image

    from entgan.export import png_bytes, to_uint8
    from entgan.plots import image_grid

    if output == "grid":
        buffer = io.BytesIO()
        Image.fromarray(image_grid(images)).save(buffer, format="PNG")
        return buffer.getvalue()
    pixels = to_uint8(images)
    if output == "npy":
        buffer = io.BytesIO()
        np.save(buffer, pixels, allow_pickle=False)
        return buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, image in enumerate(pixels):
            archive.writestr(f"{index:06d}.png", png_bytes(image))
    return buffer.getvalue()


class SampleRequest(BaseModel):
    """The body of POST /sample."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    n: int = Field(16, ge=1)
    """Images to draw, at most the server's `max_n`."""
    seed: int | None = Field(None, ge=0, lt=2**63)
    """The same seed gives the same images (the first n that `entgan generate --seed` writes);
    none: a fresh one, returned in the X-EntGAN-Seed header."""
    format: Literal["grid", "npy", "zip"] = "grid"


def create_app(watcher: ModelWatcher, max_n: int = DEFAULT_MAX_N) -> FastAPI:
    """The FastAPI application serving `watcher`'s model."""
    app = FastAPI(title="EntGAN generator", version="1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            if item.get("type") == "json_invalid":
                return JSONResponse({"error": f"the body is not valid JSON: {item.get('ctx', {}).get('error', '')}"
                                     .rstrip(": ")}, status_code=400)
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
            message = "unknown field" if item.get("type") == "extra_forbidden" else item.get("msg", "invalid")
            found = item.get("input")
            suffix = "" if item.get("type") == "missing" or isinstance(found, dict) else f" (found {found!r})"
            problems.append(f"{where}: {message}{suffix}")
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        await watcher.refresh()
        return watcher.health()

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        model = await watcher.refresh()
        return {
            "model": model.label,
            "image_shape": list(model.config.image_shape),
            "max_n": max_n,
            "tasks": [
                {"name": task.name, "index": index, "labels": task.labels}
                for index, task in enumerate(model.config.tasks)
            ],
        }

    @app.post("/sample")
    async def sample(request: SampleRequest) -> Response:
        if request.n > max_n:
            raise HTTPException(422, f"n: at most {max_n} images per request (found {request.n})")
        model = await watcher.refresh()
        if request.task not in model.task_names:
            raise HTTPException(404, f"unknown task '{request.task}'; {model.label} has {model.task_names}")
        seed = secrets.randbits(63) if request.seed is None else request.seed
        body = await run_in_threadpool(lambda: encode(model.sample(request.task, request.n, seed), request.format))
        headers = {
            "X-EntGAN-Model": model.label,
            "X-EntGAN-Task": request.task,
            "X-EntGAN-Seed": str(seed),
            "X-EntGAN-Count": str(request.n),
        }
        return Response(body, media_type=MEDIA_TYPES[request.format], headers=headers)

    return app


def serve(
    reference: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_n: int = DEFAULT_MAX_N,
    jobs_root: str | Path | None = None,
    db: str | Path | None = None,
    log_level: str = "warning",
) -> None:
    """Load the model, bind `host:port` (0: any free port), say where on stdout, serve until stopped."""
    import uvicorn

    if max_n < 1:
        raise ConfigError(f"--max-n must be at least 1, found {max_n}")
    watcher = ModelWatcher(reference, jobs_root, db)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.listen(128)
    bound = listener.getsockname()[1]
    print(json.dumps({"serving": watcher.current.model.label, "url": f"http://{host}:{bound}"}), flush=True)
    config = uvicorn.Config(create_app(watcher, max_n), log_level=log_level, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        print("entgan serve: stopped", file=sys.stderr, flush=True)
