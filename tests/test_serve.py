"""`mlet serve`: raw rows over real HTTP (127.0.0.1, a free port) against `mlet predict` on the same rows, for DLRM
and DeepFM; dynamic batching; every hostile request gets a 4xx and the next good one succeeds."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_collapse import fake_run
from test_transform import _criteo_raw

from data_pipes.convert.criteo import COLUMNS as CRITEO_COLUMNS
from data_pipes.convert.criteo import convert_criteo
from data_pipes.transform import FeatureTransform
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.serving.export import export
from mlet_torchrec.serving.predict import predict
from mlet_torchrec.serving.server import Batcher, RowScorer, ServeLimits, bind, create_app, make_server

LIMITS = ServeLimits(max_rows=64, max_body_bytes=64 * 1024)
MODELS = {
    "dlrm": ["embedding.d=4", "embedding.k=8"],
    "deepfm": ["model.name=deepfm", "embedding.d=4", "embedding.k=8", "model.dnn_hidden_units=[16]"],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Raw Criteo rows; an export of DLRM and of DeepFM trained on their data set; `mlet predict`'s FP32 and INT8
    probabilities of 40 of the raw rows (converted with --features-from the training data set, in order)."""
    root = tmp_path_factory.mktemp("serve")
    raw = _criteo_raw(root / "raw.tsv", 300, random.Random(0))
    convert_criteo(root / "raw.tsv", root / "data", min_count=1, progress=False)
    rows = raw[:40]
    (root / "new.tsv").write_text("".join("\t".join(r[c] for c in CRITEO_COLUMNS) + "\n" for r in rows))
    convert_criteo(root / "new.tsv", root / "new", features_from=root / "data", split_name="test", progress=False)
    out: dict = {"rows": rows, "data": root / "data", "new": root / "new"}
    for name, overrides in MODELS.items():
        run = fake_run(root / f"run_{name}", root / "data", overrides, seed=3)
        collapse(run, root / f"collapsed_{name}", check_split=None)
        export(root / f"collapsed_{name}", root / f"export_{name}", int8=True, check=False)
        out[name] = root / f"export_{name}", predicted(root / f"export_{name}", root / "new", "fp32")
        out[f"{name}_int8"] = predicted(root / f"export_{name}", root / "new", "int8")
    return out


def predicted(export_dir: Path, data: Path, precision: str) -> np.ndarray:
    """`mlet predict`'s probabilities of every row of the test split of ``data``, in order."""
    output = data.parent / f"{export_dir.name}-{precision}.parquet"
    predict(export_dir, data, "test", output, precision=precision)
    return pq.read_table(output).column("probability").to_numpy().astype(np.float64)


@contextmanager
def running(export_dir: Path, precision: str = "fp32", limits: ServeLimits = LIMITS) -> Iterator[int]:
    """The server on a free 127.0.0.1 port in a thread; stops when the block ends. The socket listens before the
    thread starts, so a client may connect at once (the connection waits until uvicorn accepts it)."""
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(RowScorer(export_dir, precision), limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request (``headers``: all of them, default ``Content-Type: application/json``); (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json"} if headers is None else headers
        )
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, raw


def post(port: int, rows: list[dict]) -> np.ndarray:
    status, raw = request(port, "POST", "/v1/predict", json.dumps({"rows": rows}).encode())
    assert status == 200, raw
    return np.array(json.loads(raw)["probabilities"], dtype=np.float64)


def _sparse_rows(rows: list[dict]) -> list[dict]:
    """The same rows with every empty field left out (a missing key means an empty field)."""
    return [{k: v for k, v in r.items() if v != ""} for r in rows]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_serve_is_predict_over_http(served, model):
    export_dir, expected = served[model]
    rows = served["rows"]
    with running(export_dir) as port:
        status, raw = request(port, "GET", "/healthz")
        health = json.loads(raw)
        assert status == 200 and health["model"] == model and health["precision"] == "fp32"
        assert health["transform"] == FeatureTransform.load(served["data"]).identity
        got = post(port, rows)
        assert got.shape == (len(rows),) and np.abs(got - expected).max() <= 1e-6
        assert np.abs(post(port, _sparse_rows(rows)) - expected).max() <= 1e-6
        # 8 concurrent clients: each gets its own rows' probabilities back
        results: dict[int, np.ndarray] = {}
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, post(port, rows[i * 5 : i * 5 + 5])))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert np.abs(np.concatenate([results[i] for i in range(8)]) - expected).max() <= 1e-6
    # INT8: the same module `mlet predict --precision int8` scores with
    int8 = served[f"{model}_int8"]
    with running(export_dir, "int8") as port:
        got = post(port, rows)
    assert np.abs(got - int8).max() <= 1e-6 and 0 < np.abs(got - expected).max() < 0.02


HOSTILE = [
    (b"not json", 400),
    (b'{"rows": [', 400),
    (b"\xff\xfe", 400),
    (b"[1, 2]", 422),
    (b'{"rows": {}}', 422),
    (b'{"rows": [["I1", "5"]]}', 422),
    (b'{"rows": [], "extra": 1}', 422),
    (b'{"rows": [{"nope": "1"}]}', 422),  # unknown column
    (b'{"rows": [{"I1": 5}]}', 422),  # not a string
    (b'{"rows": [{"C1": null}]}', 422),
    (b'{"rows": [{"I1": "five"}]}', 422),  # not a number
    (b'{"rows": [{"I1": "nan"}, {"I2": "-inf"}]}', 422),  # not finite
    (b'{"rows": [{"I1": NaN}]}', 422),  # JSON's NaN extension, not a string
    (b'{"rows": [{"I1": Infinity}, {"I2": 1e999}]}', 422),  # Infinity, and a number too large for a float
    (b'{"rows": [{"I1": ' + b"9" * 5000 + b"}]}", 400),  # an integer past Python's digit limit
    (b'{"rows": [1, 2]}', 422),  # an array of non-objects
    (b"", 400),
    (b'{"rows": [{"C1": "\\ud800"}]}', 400),  # a lone surrogate: not text (was a 500)
    (b'{"rows": [{"I1": "\\udfff"}]}', 400),
    (b"[" * 30_000 + b"]" * 30_000, 400),  # nested past the parser's recursion limit
    (json.dumps({"rows": [{}] * 65}).encode(), 413),  # too many rows
    (json.dumps({"rows": [{"C1": "x" * 70_000}]}).encode(), 413),  # too large
]


def test_every_hostile_request_gets_a_4xx_and_the_next_good_one_succeeds(served):
    export_dir, expected = served["dlrm"]
    rows, expected = served["rows"][:3], expected[:3]
    with running(export_dir) as port:
        for body, status in HOSTILE:
            got, raw = request(port, "POST", "/v1/predict", body)
            assert got == status, (body[:40], raw)
            assert raw.count(b"\n") == 0 and set(json.loads(raw)) == {"error"}, raw
            assert np.abs(post(port, rows) - expected).max() <= 1e-6
        # a body without Content-Length (chunked) past the limit; a wrong method; a wrong path
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/predict", body=iter([b"x" * 40_000] * 2), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and set(json.loads(resp.read())) == {"error"}
        conn.close()
        assert request(port, "GET", "/v1/predict")[0] == 405
        status, raw = request(port, "GET", "/nope")
        assert status == 404 and set(json.loads(raw)) == {"error"}
        assert post(port, []).shape == (0,)
        # the request SERVING.md shows, with a real column and its Content-Type header
        curl = re.search(r"-H '(.*?): (.*?)' -d '(.*?)'", (export_dir / "SERVING.md").read_text())
        body = curl.group(3).replace("COLUMN", "C1").encode()
        status, raw = request(port, "POST", "/v1/predict", body, {curl.group(1): curl.group(2)})
        assert status == 200 and len(json.loads(raw)["probabilities"]) == 1
        assert np.abs(post(port, rows) - expected).max() <= 1e-6


def _raw_exchange(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send ``head`` and ``body`` as they are on one connection; the answer's (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def test_only_a_body_declared_json_is_read_and_a_short_body_gets_408(served):
    """A body sent as another type gets 415 naming it (it was parsed as JSON anyway); JSON with parameters or no
    Content-Type is served. A Content-Length longer than the body sent (or a chunked body never ended) gets 408
    after ``body_seconds`` instead of holding its connection forever."""
    export_dir, expected = served["dlrm"]
    rows, expected = served["rows"][:3], expected[:3]
    body = json.dumps({"rows": rows}).encode()
    with running(export_dir, limits=ServeLimits(max_rows=64, max_body_bytes=64 * 1024, body_seconds=2.0)) as port:
        for declared in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, raw = request(port, "POST", "/v1/predict", body, {"Content-Type": declared})
            assert status == 415, raw
            assert json.loads(raw) == {"error": f"the body is sent as {declared!r}; send it as application/json"}
        for headers in ({"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "Application/JSON"}, {}):
            status, raw = request(port, "POST", "/v1/predict", body, headers)
            assert status == 200 and np.abs(np.array(json.loads(raw)["probabilities"]) - expected).max() <= 1e-6
        head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        unended = ((b"Content-Length: 100", b'{"rows": []}', 12), (b"Transfer-Encoding: chunked", b'5\r\n{"row', 5))
        for framing, sent, received in unended:
            status, raw = _raw_exchange(port, head + b"\r\n" + framing, sent)
            assert status == 408, raw
            assert json.loads(raw) == {"error": f"the body did not arrive within 2 s ({received} bytes received)"}
        assert np.abs(post(port, rows) - expected).max() <= 1e-6


def test_requests_waiting_together_share_one_model_call(served, caplog):
    """Five requests queued while the model is busy go into its next call, each getting its own rows back."""
    export_dir, expected = served["deepfm"]
    scorer = RowScorer(export_dir, "fp32")
    rows, expected = served["rows"][:10], expected[:10]

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(scorer, max_batch_rows=1000)
        waiting = [asyncio.ensure_future(batcher.submit(scorer.encode(rows[2 * i : 2 * i + 2]))) for i in range(5)]
        await asyncio.sleep(0)  # every submit is in the queue before the batcher runs
        task = asyncio.create_task(batcher.run())
        try:
            return list(await asyncio.gather(*waiting))
        finally:
            task.cancel()
            batcher.executor.shutdown()

    with caplog.at_level(logging.DEBUG, logger="mlet.serve"):
        got = asyncio.run(scenario())
    assert np.abs(np.concatenate(got) - expected).max() <= 1e-6
    calls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model call")]
    assert len(calls) == 1 and calls[0].startswith("model call: 5 requests, 10 rows"), calls


@pytest.mark.slow
def test_mlet_serve_int8_in_its_own_process(served, tmp_path):
    """`mlet serve` as a user runs it: port 0, INT8 (the default), stopped by SIGTERM."""
    export_dir, fp32 = served["dlrm"]
    rows = served["rows"]
    expected = served["dlrm_int8"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "mlet_torchrec.cli", "serve", "--input", str(export_dir), "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        line = lines.get(timeout=300)  # the first line names the port
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        assert found, line
        port = int(found.group(1))
        got = post(port, rows)
        assert np.abs(got - expected).max() <= 1e-6  # `mlet predict --precision int8`
        assert 0 < np.abs(got - fp32).max() < 0.02  # really INT8 tables
        assert json.loads(request(port, "GET", "/healthz")[1])["precision"] == "int8"
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status says SIGTERM
        assert proc.wait(timeout=60) == -signal.SIGTERM
    rest = "".join(lines.get(timeout=10) for _ in range(lines.qsize()))
    assert "Traceback" not in rest and "ERROR" not in rest, rest


def test_the_kubernetes_deployment_runs_mlet_serve_as_the_cli_reads_it():
    import yaml

    from mlet_torchrec.cli.main import build_parser

    docs = list(yaml.safe_load_all((Path(__file__).resolve().parents[1] / "docs" / "serve-deployment.yaml").open()))
    deployment, service = (next(d for d in docs if d["kind"] == kind) for kind in ("Deployment", "Service"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # the image's entrypoint hands these to mlet
    assert args.command == "serve" and args.host == "0.0.0.0"
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == args.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
