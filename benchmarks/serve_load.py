"""Load-test ``distill2deploy serve``: micro-batched HTTP throughput next to raw onnxruntime at batch 32.

Run by hand from the repository root (numbers depend on the CPU and its load; nothing asserts):

    python benchmarks/serve_load.py --requests 2000 --concurrency 16 --threads 1

For each model (the MobileNetV2-x0.5 student, randomly initialised -- weights do not change its
speed -- and the pretrained ResNet-56 from ``--resnet56``) it

1. exports the model with ``distill2deploy export`` (cached in ``--work``),
2. times raw onnxruntime at batch 32 with the same intra-op thread count as the server,
3. starts ``distill2deploy serve`` as a subprocess on 127.0.0.1 and sends a bounded load: a fixed
   number of ``classify`` requests, one real CIFAR-100 test image (PNG) each, from ``--concurrency``
   keep-alive connections; the run stops by itself when every request is answered,
4. reads the micro-batch sizes from the server's ``/metrics``, stops the server with SIGTERM.

The load generator speaks HTTP/1.1 over asyncio streams directly, on uvloop: on a small machine it
shares the CPUs with the server, and a full HTTP client library would cost several times more CPU
per request than the server's own parsing, measuring the client instead of the server.
Results: a table on stdout and ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import uvloop
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill2deploy import _io  # noqa: E402
from distill2deploy.deploy.latency import measure_latency  # noqa: E402

PY = [sys.executable, "-m", "distill2deploy"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar100_sample.npz")
    p.add_argument("--resnet56", type=Path, default=REPO.parent / "shared" / "weights" / "cifar100_resnet56.pth")
    p.add_argument("--models", nargs="+", default=["mobilenetv2_x0_5_cifar", "resnet56_cifar"])
    p.add_argument("--requests", type=int, default=2000, help="requests per model (default 2000)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent connections (default 16)")
    p.add_argument("--images-per-request", type=int, nargs="+", default=[1],
                   help="images in each request (1: raw PNG body; more: multipart); one load run per value")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, server and raw")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--raw-runs", type=int, default=100, help="timed raw onnxruntime batch-32 runs")
    p.add_argument("--work", type=Path, default=Path("/tmp/d2d_serve_load"), help="exported models (cached)")
    p.add_argument("--out", type=Path, default=REPO / "exports" / "benchmarks" / "serve_load")
    return p.parse_args(argv)


def export_model(model: str, args: argparse.Namespace) -> Path:
    """``distill2deploy export`` of ``model`` (random weights unless it is the ResNet-56), cached by name."""
    out = args.work / f"{model}.onnx"
    if out.is_file():
        return out
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.resnet56 if model == "resnet56_cifar" else args.work / f"{model}.random.pth"
    if model != "resnet56_cifar":
        import torch

        from distill2deploy.models.factory import create_model
        torch.manual_seed(0)
        torch.save(create_model(model, num_classes=100, pretrained=False).state_dict(), ckpt)
    subprocess.run([*PY, "export", "--model", model, "--checkpoint", str(ckpt), "--data", f"npz:{args.data}",
                    "--out", str(out)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def http_requests(path: str, pngs: list[bytes], per_request: int) -> list[bytes]:
    """Ready-to-send HTTP/1.1 requests: a raw PNG body, or ``per_request`` PNGs as multipart files."""
    if per_request == 1:
        return [f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in pngs]
    out = []
    for i in range(0, len(pngs) - per_request + 1, per_request):
        body = b"".join(b"--d2dload\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%d.png\"\r\n"
                        b"Content-Type: image/png\r\n\r\n%b\r\n" % (j, pngs[i + j]) for j in range(per_request))
        body += b"--d2dload--\r\n"
        out.append(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                   f"boundary=d2dload\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


async def run_load(port: int, requests: list[bytes], n: int, concurrency: int) -> dict:
    """Send ``n`` POSTs over ``concurrency`` keep-alive connections; per-request latency and status."""
    next_i, latencies, errors = 0, [], []

    async def client() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_i < n:
                i, next_i = next_i, next_i + 1
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status, body = await _read_response(reader)
                latencies.append(time.perf_counter() - t0)
                if status != 200 or b'"predictions"' not in body:
                    errors.append(f"{status}: {body[:200]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    results = await asyncio.gather(*(client() for _ in range(concurrency)), return_exceptions=True)
    wall = time.perf_counter() - t0
    errors += [repr(r) for r in results if isinstance(r, BaseException)]
    lat = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall, "errors": len(errors),
            "error_examples": errors[:3], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def batch_stats(metrics_text: str, model: str) -> dict:
    """Mean micro-batch size and the batch-size histogram for ``model`` from ``/metrics``."""
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name == "d2d_batch_size":
            s = {x.name.rsplit("_", 1)[-1] + (f"_{x.labels.get('le')}" if "le" in x.labels else ""): x.value
                 for x in fam.samples if x.labels.get("model") == model}
            return {"batches": int(s["count"]), "mean_batch": s["sum"] / max(1, s["count"]),
                    "hist": {k.split("_", 1)[1]: int(v) for k, v in s.items() if k.startswith("bucket")}}
    return {"batches": 0, "mean_batch": float("nan"), "hist": {}}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def serve_and_load(onnx: Path, pngs: list[bytes], args: argparse.Namespace) -> list[dict]:
    """Start the server, run one bounded load per ``--images-per-request`` value, stop it with SIGTERM."""
    import urllib.request

    port = free_port()
    cmd = [*PY, "serve", str(onnx), "--port", str(port), "--threads", str(args.threads), "--max-batch",
           str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base, runs = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {' '.join(cmd)}") from None
                time.sleep(0.3)
        name = onnx.name.removesuffix(".onnx")
        for per in args.images_per_request:
            requests = http_requests(f"/v2/models/{name}/classify?top_k=1", pngs, per)
            uvloop.run(run_load(port, requests, 4 * args.concurrency, args.concurrency))  # warm-up
            before = batch_stats(urllib.request.urlopen(f"{base}/metrics").read().decode(), name)
            cpu0 = _cpu_seconds(server.pid)
            load = uvloop.run(run_load(port, requests, args.requests, args.concurrency))
            cpu = _cpu_seconds(server.pid) - cpu0
            after = batch_stats(urllib.request.urlopen(f"{base}/metrics").read().decode(), name)
            images = load["requests"] * per
            load.update(images_per_request=per, images_per_s=images / load["seconds"],
                        mean_batch=images / max(1, after["batches"] - before["batches"]),
                        server_cpu_ms_per_image=1e3 * cpu / images, batch_hist=after["hist"])
            runs.append(load)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    for load in runs:
        load["server_exit_code"] = code
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = np.load(args.data)
    bodies = []
    for im in data["x_test"][:256]:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    rows = []
    for model in args.models:
        onnx = export_model(model, args)
        raw = measure_latency(onnx, input_size=32, batch_sizes=[32], warmup=10, runs=args.raw_runs,
                              threads=args.threads, progress=False)["throughput_ips"]["32"]
        for load in serve_and_load(onnx, bodies, args):
            rows.append({"model": model, "raw_ort_bs32_ips": raw, **load, "ratio": load["images_per_s"] / raw})
            print(f"{model} x{load['images_per_request']}: {load['images_per_s']:.0f} images/s vs raw {raw:.0f}",
                  flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["cpus"] = os.cpu_count()
    _io.write_json(args.out / "results.json", {"settings": settings, "rows": rows})
    print(f"\n{args.requests} classify requests per row from {args.concurrency} keep-alive connections on "
          f"127.0.0.1 (real 32x32 CIFAR-100 PNGs); onnxruntime intra-op threads {args.threads} (server and raw); "
          f"--max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g}; {os.cpu_count()} CPUs shared by "
          "server and load generator\n")
    print("| model | images/request | requests/s | images/s | p50 ms | p99 ms | mean batch | errors "
          "| server CPU ms/image | raw ORT bs32 images/s | served / raw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['images_per_request']} | {r['rps']:.0f} | {r['images_per_s']:.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['errors']} | "
              f"{r['server_cpu_ms_per_image']:.2f} | {r['raw_ort_bs32_ips']:.0f} | {100 * r['ratio']:.0f}% |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
