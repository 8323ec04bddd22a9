"""``mlet serve``: raw rows in, click probabilities out, over HTTP, with dynamic batching.

``POST /v1/predict`` takes ``{"rows": [{"I1": "5", "C1": "68fd1e64", ...}, ...]}`` (raw values as strings, as in
the source files; a missing key is an empty field), encodes them with the export's feature transform
(:class:`data_pipes.transform.FeatureTransform`, the one ``mlet convert`` used) and answers
``{"probabilities": [...]}`` from the export's TorchRec dict-signature module (``--precision int8|fp32``).
``GET /healthz`` answers 200 once the model is loaded (the server binds only after loading): a readiness probe.

The body must be declared JSON: ``Content-Type: application/json`` (parameters such as ``; charset=utf-8`` allowed)
or no Content-Type at all (taken as JSON, as most JSON APIs do: a client that names no type gets served); any
other type (``text/plain``, ``application/x-www-form-urlencoded``, what ``curl -d`` sends without ``-H``,
``multipart/form-data``) gets 415 naming the type received and the one expected.

Dynamic batching: the requests that arrive while the model runs wait in a queue; the next model call takes
them all (up to ``max_batch_rows``) and splits the result, so concurrent clients share model calls without a
fixed delay. A bad request (not declared JSON, not JSON, too large, too many rows, a body that does not arrive in
time, not ``{"rows": [objects]}``, an unknown column, a value that is not a string, not Unicode or not a number
where one is needed) gets a 4xx with a one-line JSON ``{"error": "..."}`` and the server goes on serving. One
DEBUG log line per model call; nothing per request.

The server library is FastAPI on uvicorn: the most used ASGI stack, maintained, typed; ``litserve`` adds its own
batching on top of FastAPI, but a queue drained per model call is all this needs, and Ray Serve / BentoML /
TorchServe bring a cluster runtime or model store this service does not use.

Example:
    >>> parse_rows(b'{"rows": [{"I1": "5"}]}', max_rows=10)
    [{'I1': '5'}]
    >>> parse_rows(b'{"rows": 1}', max_rows=10)
    Traceback (most recent call last):
    ...
    mlet_torchrec.serving.server.BadRequest: "rows" must be a list of objects (column -> raw value string)
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from data_pipes.errors import DataError
from data_pipes.transform import EncodedRows, FeatureTransform
from mlet_torchrec.errors import UserError
from mlet_torchrec.serving.artifact import read_manifest
from mlet_torchrec.serving.scoring import resolve_scorer
from mlet_torchrec.serving.torchrec_package import load_predict_module

log = logging.getLogger("mlet.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold, and how many rows one model call takes."""

    max_rows: int = 4096  # rows per request (413 beyond)
    max_body_bytes: int = 8 << 20  # bytes per request body (413 beyond)
    max_batch_rows: int = 8192  # rows per model call, over the requests waiting
    body_seconds: float = 30.0  # from the headers to the body's last byte (408 beyond: a Content-Length that lies)


class BadRequest(Exception):
    """A client's mistake: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


JSON_TYPE = "application/json"


def check_content_type(declared: str | None) -> None:
    """Refuse (415) a body declared as anything but JSON; parameters (``; charset=utf-8``) and a missing
    Content-Type are accepted.

        >>> check_content_type("application/json; charset=utf-8"), check_content_type(None)
        (None, None)
        >>> check_content_type("text/plain")
        Traceback (most recent call last):
        ...
        mlet_torchrec.serving.server.BadRequest: the body is sent as 'text/plain'; send it as application/json
    """
    if declared is None or declared.split(";", 1)[0].strip().lower() == JSON_TYPE:
        return
    raise BadRequest(f"the body is sent as {declared[:80]!r}; send it as {JSON_TYPE}", 415)


def parse_rows(body: bytes, max_rows: int) -> list[dict[str, Any]]:
    """The rows of a request body ``{"rows": [{column: value}, ...]}``; :class:`BadRequest` otherwise."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON ({str(e)[:80]})", 400) from None
    except RecursionError:  # arrays or objects nested thousands deep: the parser's stack, not the server's error
        raise BadRequest("the body is JSON nested too deeply", 400) from None
    if not isinstance(doc, dict) or set(doc) != {"rows"}:
        raise BadRequest('the body must be a JSON object with one key, "rows"')
    rows = doc["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadRequest('"rows" must be a list of objects (column -> raw value string)')
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} rows in one request; at most {max_rows}", 413)
    return rows


def concat_encoded(parts: Sequence[EncodedRows]) -> EncodedRows:
    """Several requests' encoded rows as one batch, in order."""
    first = parts[0]
    return EncodedRows(
        dense=np.concatenate([p.dense for p in parts]),
        sparse=np.concatenate([p.sparse for p in parts]),
        sparse_names=first.sparse_names,
        bags={
            name: (np.concatenate([p.bags[name][0] for p in parts]), np.concatenate([p.bags[name][1] for p in parts]))
            for name in first.bags
        },
    )


class RowScorer:
    """An export's feature transform and dict-signature module: raw rows -> probabilities."""

    def __init__(self, export: Path | str, precision: str | None = None) -> None:
        scorer = resolve_scorer(export, precision)
        if scorer.kind != "export" or scorer.model_file is None:
            raise UserError(f"{export}: mlet serve needs the output of `mlet export`, not a {scorer.kind}")
        self.manifest = read_manifest(export)
        self.transform = FeatureTransform.load(export)
        self._check_transform()
        self.precision, self.keys = scorer.precision, list(self.manifest["sparse_features"])
        self.module = load_predict_module(scorer.model_file)

    def _check_transform(self) -> None:
        """The transform must give the model's features, in its order, with ids inside its tables."""
        man, t = self.manifest, self.transform
        if man.get("transform_identity") not in (None, t.identity):
            raise UserError(
                f"the export's feature transform is not the one its model was trained with ({t.identity[:12]})"
            )
        if list(t.dense_names) != list(man["dense_features"]) or set(t.sparse_names) != set(man["sparse_features"]):
            raise UserError("the export's feature transform does not give the features its model reads")
        rows = {f: tab["rows"] for tab in man["tables"].values() for f in tab["features"]}
        wrong = [f for f, n in t.cardinalities().items() if rows.get(f) != n]
        if wrong:
            raise UserError(f"the export's feature transform and its model disagree on the cardinality of {wrong[0]}")

    def encode(self, rows: Sequence[dict[str, Any]]) -> EncodedRows:
        try:
            return self.transform.encode(rows)
        except DataError as e:
            raise BadRequest(str(e).splitlines()[0]) from None
        except UnicodeEncodeError:  # JSON's "\\ud800" escapes decode to lone surrogates, which are not text
            raise BadRequest("a value holds a lone UTF-16 surrogate (a \\ud800 escape), not text", 400) from None

    def batch(self, encoded: EncodedRows) -> dict[str, torch.Tensor]:
        """The dict-signature batch of encoded rows (sparse features in the manifest's order)."""
        lengths, values = encoded.jagged(self.keys)
        return {
            "float_features": torch.from_numpy(np.ascontiguousarray(encoded.dense, dtype=np.float32)),
            "id_list_features.lengths": torch.from_numpy(lengths),
            "id_list_features.values": torch.from_numpy(values),
        }

    def predict(self, parts: Sequence[EncodedRows]) -> list[np.ndarray]:
        """One model call for several requests' rows; each request's probabilities (float32)."""
        start = time.perf_counter()
        with torch.inference_mode():
            probs = self.module(self.batch(concat_encoded(parts)))["default"].numpy()
        sizes = [len(p) for p in parts]
        log.debug(
            "model call: %d requests, %d rows, %.2f ms", len(parts), sum(sizes), 1e3 * (time.perf_counter() - start)
        )
        return np.split(probs, np.cumsum(sizes)[:-1])


@dataclass
class _Pending:
    rows: EncodedRows
    done: asyncio.Future[np.ndarray]


@dataclass
class Batcher:
    """Dynamic batching: every request waiting when the model is free goes into its next call."""

    scorer: RowScorer
    max_batch_rows: int
    queue: asyncio.Queue[_Pending] = field(default_factory=asyncio.Queue)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "mlet-model"))

    async def submit(self, rows: EncodedRows) -> np.ndarray:
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.done

    def _take(self, first: _Pending) -> list[_Pending]:
        taken, n = [first], len(first.rows)
        while not self.queue.empty() and n < self.max_batch_rows:
            nxt = self.queue.get_nowait()
            taken.append(nxt)
            n += len(nxt.rows)
        return taken

    async def run(self) -> None:
        """Serve the queue until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            taken = self._take(await self.queue.get())
            try:
                results = await loop.run_in_executor(self.executor, self.scorer.predict, [p.rows for p in taken])
            except Exception as e:  # a model failure fails its requests (500), not the server
                log.exception("model call failed")
                for p in taken:
                    p.done.set_exception(e)
                continue
            for p, r in zip(taken, results, strict=True):
                if not p.done.cancelled():
                    p.done.set_result(r)


def create_app(scorer: RowScorer, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI application: ``POST /v1/predict``, ``GET /healthz``; errors as one-line JSON."""
    batcher = Batcher(scorer, limits.max_batch_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="mlet serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": scorer.manifest["model"],
            "precision": scorer.precision,
            "transform": scorer.transform.identity,
        }

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        check_content_type(request.headers.get("content-type"))
        rows = parse_rows(await read_body(request, limits.max_body_bytes, limits.body_seconds), limits.max_rows)
        if not rows:
            return JSONResponse({"probabilities": []})
        encoded = await run_in_threadpool(scorer.encode, rows)
        probs = await batcher.submit(encoded)
        return JSONResponse({"probabilities": probs.tolist()})

    return app


async def read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest, and (408) when it has not
    all arrived ``seconds`` after the headers (a Content-Length longer than the body sent would wait forever)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"the body has {declared} bytes; at most {limit}", 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"the body has more than {limit} bytes", 413)
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"the body did not arrive within {seconds:g} s ({size} bytes received)", 408) from None
    return b"".join(chunks)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port the OS picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def make_server(app: FastAPI) -> Any:
    """A uvicorn server for ``app`` with the project's logging: uvicorn's own at WARNING, no access log (one
    line per model call at DEBUG is ours)."""
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning", lifespan="on")
    return uvicorn.Server(config)


def serve(
    export: Path | str,
    host: str = "127.0.0.1",
    port: int = 8080,
    precision: str | None = None,
    limits: ServeLimits = ServeLimits(),
) -> None:
    """Load ``export`` and serve it on ``host:port`` until SIGINT/SIGTERM."""
    scorer = RowScorer(export, precision)
    sock = bind(host, port)
    where = sock.getsockname()
    log.info(
        "serving %s (%s, %s) on http://%s:%d: POST /v1/predict, GET /healthz",
        export,
        scorer.manifest["model"],
        scorer.precision,
        host,
        where[1],
    )
    make_server(create_app(scorer, limits)).run(sockets=[sock])
