"""``distill2deploy serve`` started as a user would (a subprocess on a free loopback port), every endpoint
and every kind of bad input; ``predict`` and the Python client against the same model.

The model is the pretrained ResNet-56 exported once per session; the images are real CIFAR-100 test
images written as PNG/JPEG files.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from distill2deploy.client import Client, ServerError
from distill2deploy.deploy.evaluate import make_session, run_batched
from distill2deploy.deploy.images import preprocess_images, softmax
from distill2deploy.deploy.metadata import read_metadata

from .conftest import REPO, SAMPLE_NPZ

pytestmark = pytest.mark.slow
MAX_BODY_MB = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``serve`` subprocess; ``url`` is its base URL once ready."""

    def __init__(self, *args: str | Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "distill2deploy", "serve", *map(str, args), "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", "1"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.stop()[1]}")
            time.sleep(0.2)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(resnet56_onnx: Path) -> Iterator[Server]:
    # A long batching delay makes concurrent requests reliably share batches on a loaded machine.
    s = Server(resnet56_onnx, resnet56_onnx, "--name", "r56", "--name", "second", "--max-batch", "16",
               "--max-delay-ms", "50", "--max-body-mb", str(MAX_BODY_MB))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def images() -> dict[str, object]:
    """Real test images: PNG bytes of 32x32 originals, plus the same images upscaled as JPEG."""
    d = np.load(SAMPLE_NPZ)
    arrays = list(d["x_test"][:12])
    pngs, jpgs = [], []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(a).resize((97, 61)).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    return {"arrays": arrays, "png": pngs, "jpg": jpgs}


def _direct(model: Path, blobs: list[bytes]) -> np.ndarray:
    """Probabilities from onnxruntime run directly on the shared preprocessing of ``blobs``."""
    meta = read_metadata(model)
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
    return softmax(run_batched(make_session(model, threads=1), preprocess_images(arrays, meta), 64))


def _metric(url: str, name: str, **labels: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(name) and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.name + json.dumps({k: v for k, v in s.labels.items() if k not in labels})] = s.value
    return out


def test_health_and_metadata(server: Server, resnet56_onnx: Path) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2").json()["name"] == "distill2deploy"
    r = httpx.get(f"{server.url}/v2/models/r56/ready")
    assert r.status_code == 200 and r.json() == {"name": "r56", "ready": True}
    meta = httpx.get(f"{server.url}/v2/models/r56").json()
    want = read_metadata(resnet56_onnx)
    assert meta["name"] == "r56" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 100]}]
    for key in ("class_names", "mean", "std", "input_size"):
        assert meta["parameters"][key] == want[key]
    assert httpx.get(f"{server.url}/v2/models/second").json()["inputs"] == meta["inputs"]  # the second model


def test_serve_startup_errors_are_user_errors(resnet56_onnx: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from distill2deploy.cli import main

    assert main(["serve", str(tmp_path / "missing.onnx"), "--port", str(_free_port())]) == 2
    assert "ONNX file not found" in capsys.readouterr().err
    assert main(["serve", str(resnet56_onnx), str(resnet56_onnx), "--port", str(_free_port())]) == 2
    assert "--name NAME once per model" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(resnet56_onnx), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_classify_batch_equals_onnxruntime_on_the_same_preprocessing(server: Server, resnet56_onnx: Path,
                                                                       images: dict) -> None:
    blobs = images["png"][:6] + images["jpg"][:6]  # 32x32 PNGs and resized 97x61 JPEGs in one upload
    files = [("file", (f"img{i}", b)) for i, b in enumerate(blobs)]
    r = httpx.post(f"{server.url}/v2/models/r56/classify", params={"top_k": 3}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = _direct(resnet56_onnx, blobs)
    names = read_metadata(resnet56_onnx)["class_names"]
    assert len(preds) == len(blobs)
    for p, want in zip(preds, probs):  # upload order kept, same classes and probabilities
        assert [t["index"] for t in p["top_k"]] == list(np.argsort(-want, kind="stable")[:3])
        assert [t["label"] for t in p["top_k"]] == [names[t["index"]] for t in p["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in p["top_k"]], np.sort(want)[::-1][:3], atol=1e-5)
    # the pretrained model gets most of these real images right
    labels = np.load(SAMPLE_NPZ)["y_test"][:6]
    assert sum(p["top_k"][0]["index"] == y for p, y in zip(preds[:6], labels)) >= 3


def test_classify_raw_body_and_top_k(server: Server, resnet56_onnx: Path, images: dict) -> None:
    r = httpx.post(f"{server.url}/v2/models/r56/classify", content=images["jpg"][0],
                   headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    (pred,) = r.json()["predictions"]
    assert len(pred["top_k"]) == 5  # the default
    assert pred["top_k"][0]["index"] == int(_direct(resnet56_onnx, [images["jpg"][0]])[0].argmax())
    r = httpx.post(f"{server.url}/v2/models/r56/classify?top_k=1", content=images["png"][1])
    assert len(r.json()["predictions"][0]["top_k"]) == 1


def test_infer_json_tensors_equal_onnxruntime(server: Server, resnet56_onnx: Path, images: dict) -> None:
    x = preprocess_images(images["arrays"][:3], read_metadata(resnet56_onnx))
    body = {"id": "req-1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
    r = httpx.post(f"{server.url}/v2/models/r56/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-1" and out["model_name"] == "r56"
    (t,) = out["outputs"]
    assert t["name"] == "logits" and t["datatype"] == "FP32" and t["shape"] == [3, 100]
    want = run_batched(make_session(resnet56_onnx, threads=1), x, 64)
    np.testing.assert_allclose(np.asarray(t["data"]).reshape(3, 100), want, atol=1e-4)


def _bad_requests(images: dict) -> list[tuple[str, dict, int, str]]:
    ok = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}
    big = b"\x89PNG" + b"0" * int(MAX_BODY_MB * 1e6)
    infer = "/v2/models/r56/infer"
    cls = "/v2/models/r56/classify"
    return [
        (cls, {"content": b"definitely not an image"}, 400, "not an image"),
        (cls, {"content": images["jpg"][0][:300]}, 400, "truncated"),
        (cls, {"content": b""}, 400, "empty image"),
        (cls, {"files": [("file", ("a.png", images["png"][0])), ("file", ("b.txt", b"hello"))]}, 400, "file 2"),
        (cls, {"files": [("file", ("e.png", b""))]}, 400, "empty image"),
        (cls, {"files": {"top_k": (None, "3")}}, 400, "no file parts"),
        (cls, {"content": big}, 413, "larger than the server's limit"),
        (cls, {"files": [("file", ("big.png", big))]}, 413, "larger than the server's limit"),
        (cls + "?top_k=0", {"content": images["png"][0]}, 422, "top_k"),
        (cls + "?top_k=abc", {"content": images["png"][0]}, 422, "top_k"),
        ("/v2/models/nope/classify", {"content": images["png"][0]}, 404, "unknown model 'nope'"),
        ("/v2/models/nope/infer", {"json": {"inputs": [ok]}}, 404, "unknown model"),
        (infer, {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
        (infer, {"json": {"inputs": [{"name": "input"}]}}, 422, "Field required"),
        (infer, {"json": {"inputs": []}}, 422, "inputs"),
        (infer, {"json": {"inputs": [{**ok, "shape": [1, 3, 28, 28]}]}}, 400, "expects \\[-1, 3, 32, 32\\]"),
        (infer, {"json": {"inputs": [{**ok, "datatype": "INT32"}]}}, 400, "datatype 'INT32'"),
        (infer, {"json": {"inputs": [{**ok, "name": "images"}]}}, 400, "input is 'input'"),
        (infer, {"json": {"inputs": [{**ok, "data": [0.0] * 100}]}}, 400, "needs 3072 values"),
        (infer, {"json": {"inputs": [ok], "outputs": [{"name": "probs"}]}}, 400, "output is 'logits'"),
    ]


def test_every_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(server: Server, images: dict) -> None:
    import re

    for path, kwargs, status, message in _bad_requests(images):
        r = httpx.post(f"{server.url}{path}", timeout=60, **kwargs)
        assert r.status_code == status, (path, kwargs.keys(), r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert re.search(message, r.json()["error"]), (path, r.json())
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/no/such/route"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{server.url}/v2/models/r56/infer").status_code == 405
    r = httpx.post(f"{server.url}/v2/models/r56/classify", content=images["png"][2])
    assert r.status_code == 200 and httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    counts = _metric(server.url, "d2d_requests_total")
    assert any('"404"' in k for k in counts) and any('"413"' in k for k in counts)


def test_concurrent_requests_share_micro_batches(server: Server, images: dict) -> None:
    before = _metric(server.url, "d2d_batch_size", model="r56")
    n = 24

    def one(i: int) -> int:
        return httpx.post(f"{server.url}/v2/models/r56/classify", content=images["png"][i % 12], timeout=60).status_code

    with ThreadPoolExecutor(n) as pool:
        assert set(pool.map(one, range(n))) == {200}
    after = _metric(server.url, "d2d_batch_size", model="r56")
    batches = after["d2d_batch_size_count{}"] - before.get("d2d_batch_size_count{}", 0)
    rows = after["d2d_batch_size_sum{}"] - before.get("d2d_batch_size_sum{}", 0)
    assert rows == n
    assert batches < n / 2, f"{n} concurrent requests ran in {batches} onnxruntime calls"
    singles = after['d2d_batch_size_bucket{"le": "1.0"}'] - before.get('d2d_batch_size_bucket{"le": "1.0"}', 0)
    assert singles < batches  # the histogram shows batches of more than one image
    text = httpx.get(f"{server.url}/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    for name in ("d2d_request_duration_seconds_bucket", "d2d_queue_depth", "d2d_inference_duration_seconds"):
        assert name in text.text


def test_client_classify_infer_and_errors(server: Server, resnet56_onnx: Path, images: dict,
                                          tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(images["jpg"][3])
    with Client(server.url) as c:
        assert c.ready()
        assert c.metadata("r56")["parameters"]["input_size"] == 32
        res = c.classify("r56", [path, images["png"][4]], top_k=2)
        assert len(res) == 2 and len(res[0]) == 2
        assert res[0][0]["index"] == int(_direct(resnet56_onnx, [images["jpg"][3]])[0].argmax())
        x = preprocess_images(images["arrays"][:2], read_metadata(resnet56_onnx))
        np.testing.assert_allclose(c.infer("r56", x), run_batched(make_session(resnet56_onnx, threads=1), x, 8),
                                   atol=1e-4)
        with pytest.raises(ServerError) as e:
            c.classify("nope", [path])
        assert e.value.status == 404 and "unknown model" in e.value.message
    assert not Client(f"http://127.0.0.1:{_free_port()}").ready()


def test_sigterm_finishes_in_flight_requests(resnet56_onnx: Path, images: dict) -> None:
    s = Server(resnet56_onnx, "--max-delay-ms", "1500", "--max-batch", "64")  # requests wait 1.5 s in the queue
    results: list[int] = []

    def post(i: int) -> None:
        results.append(httpx.post(f"{s.url}/v2/models/r56/classify", content=images["png"][i], timeout=60).status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while _metric(s.url, "d2d_queue_depth", model="r56").get("d2d_queue_depth{}", 0) < 3:
        assert time.monotonic() < deadline, "requests never reached the queue"
        time.sleep(0.05)
    code, out = s.stop()  # SIGTERM while three requests wait for their batch
    for t in threads:
        t.join(timeout=30)
    assert results == [200, 200, 200]
    assert code == 0 and "server stopped on SIGTERM" in out, out


def test_predict_cli_matches_the_server(server: Server, resnet56_onnx: Path, images: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for i, blob in enumerate([images["png"][5], images["jpg"][6]]):
        paths.append(tmp_path / f"img{i}.{'png' if i == 0 else 'jpg'}")
        paths[-1].write_bytes(blob)
    out = subprocess.run([sys.executable, "-m", "distill2deploy", "predict", str(resnet56_onnx), *map(str, paths),
                          "--top-k", "3", "--json"], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    local = json.loads(out)
    files = [("file", (p.name, p.read_bytes())) for p in paths]
    served = httpx.post(f"{server.url}/v2/models/r56/classify?top_k=3", files=files).json()["predictions"]
    assert [r["image"] for r in local] == [str(p) for p in paths]
    for a, b in zip(local, served):
        assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in a["top_k"]],
                                   [t["probability"] for t in b["top_k"]], atol=1e-5)
    from distill2deploy.cli import main

    assert main(["predict", str(resnet56_onnx), str(tmp_path / "x.png")]) == 2
    assert "image file not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a picture")
    assert main(["predict", str(resnet56_onnx), str(tmp_path / "notes.txt")]) == 2
    assert "not an image" in capsys.readouterr().err
