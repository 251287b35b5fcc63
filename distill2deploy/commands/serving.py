"""``serve``, ``export-triton`` and ``predict``: the commands that put an exported model to use.

``add_parsers`` registers them on the main parser; each parser's ``handler`` default is the function
cli.main calls. Heavy imports (FastAPI, uvicorn, onnxruntime) happen inside the handlers so
``distill2deploy --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
from pathlib import Path

from ..errors import UserError

EXAMPLES = {
    "serve": """examples:
  distill2deploy serve exports/quickstart/quantize/student.int8.onnx --port 8000
  distill2deploy serve r56.onnx student.onnx --max-batch 64 --max-delay-ms 2 --threads 4
  distill2deploy serve student.int8.onnx --runtime openvino   # pip install "distill2deploy[openvino]"
  curl -s -X POST --data-binary @cat.jpg 'localhost:8000/v2/models/student.int8/classify?top_k=3'
  curl -s localhost:8000/metrics""",
    "export-triton": """examples:
  distill2deploy export-triton exports/quickstart/quantize/student.int8.onnx --repo model_repository
  docker run --rm -p 8000:8000 -v $PWD/model_repository:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
      tritonserver --model-repository=/models""",
    "predict": """examples:
  distill2deploy predict r56.onnx cat.jpg dog.png --top-k 3
  distill2deploy predict r56.onnx images/*.jpg --json""",
}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """One fewer than the usable CPUs (at least 1): the HTTP event loop needs a core of its own."""
    return max(1, _cpus() - 1)


def add_parsers(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add the serving commands to ``sub`` (the main parser's subcommands)."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("serve", parents=parents, formatter_class=fmt, epilog=EXAMPLES["serve"],
                       help="HTTP server (Open Inference Protocol / KServe v2) with micro-batching and /metrics")
    p.add_argument("models", nargs="+", metavar="MODEL.onnx", help="models exported by distill2deploy")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="model name in URLs, once per model in order (default: the file stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one onnxruntime call (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="longest a request waits for others to share its batch (default 5)")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body; larger gets 413 (default 10)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    _runtime_option(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("export-triton", parents=parents, formatter_class=fmt, epilog=EXAMPLES["export-triton"],
                       help="write a Triton Inference Server model repository for ONNX models")
    p.add_argument("models", nargs="+", metavar="MODEL.onnx", help="models exported by distill2deploy")
    p.add_argument("--repo", required=True, metavar="DIR", help="model repository directory (created if missing)")
    p.add_argument("--name", action="append", metavar="NAME", help="model name, once per model (default: file stem)")
    p.add_argument("--max-batch", type=int, default=32, help="max_batch_size (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="dynamic_batching max_queue_delay (default 5 ms)")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count, default 1)")
    p.set_defaults(handler=cmd_export_triton)

    p = sub.add_parser("predict", parents=parents, formatter_class=fmt, epilog=EXAMPLES["predict"],
                       help="classify image files with an exported model (same preprocessing as serve)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG/WebP/... files, any size and mode")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _runtime_option(p)
    p.set_defaults(handler=cmd_predict)


def _runtime_option(p: argparse.ArgumentParser) -> None:
    from ..deploy.runtimes import DEFAULT_RUNTIME, RUNTIMES

    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help=f"inference runtime (default {DEFAULT_RUNTIME}; openvino needs pip install "
                   "\"distill2deploy[openvino]\")")


def _check_can_listen(host: str, port: int) -> None:
    """Fail before loading models when the address is taken (uvicorn would only log and exit 1)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}", where="serve")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host!r} ({e.strerror})", where="serve",
                        fix="use an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror})", where="serve",
                            fix="pass a free --port, or stop the process that uses this one") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..serving import create_app

    _check_can_listen(args.host, args.port)
    # Preprocessing runs one request per worker thread; torch's own pool per call would oversubscribe.
    torch.set_num_threads(1)
    threads = args.threads if args.threads is not None else default_threads()
    app = create_app(args.models, names=args.name, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                     threads=threads, max_body_bytes=int(args.max_body_mb * 1e6), runtime=args.runtime)
    base = f"http://{args.host}:{args.port}"
    for name, m in app.state.models.items():
        print(f"model {name!r} from {m.path}: input {m.input.name} {m.input.shape}, output "
              f"{m.output.name} {m.output.shape}; POST {base}/v2/models/{name}/classify", flush=True)
    print(f"batching: up to {args.max_batch} images or {args.max_delay_ms:g} ms; {args.runtime} threads per model: "
          f"{threads}; metrics: {base}/metrics", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=30)
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish in-flight requests, shut down)
    # and then re-raises the signal to the handlers it found; these record it, so the command
    # ends normally with exit code 0 instead of being killed by the re-raised signal.
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    why = f"on {signal.Signals(received[0]).name}" if received else ""
    print(f"server stopped {why}: in-flight requests were finished".replace("  ", " "), flush=True)
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from ..deploy.triton import export_triton

    dirs = export_triton(args.models, args.repo, names=args.name, max_batch=args.max_batch,
                         instances=args.instances, threads=args.threads or 1,
                         max_delay_us=int(round(args.max_delay_ms * 1000)))
    for d in dirs:
        print(f"wrote {d}/config.pbtxt, {d}/1/model.onnx, {d}/labels.txt")
    repo = Path(args.repo).resolve()
    print(f"run: docker run --rm -p 8000:8000 -v {repo}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
          "tritonserver --model-repository=/models")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..deploy.evaluate import make_session, run_batched
    from ..deploy.images import preprocess_images, read_image, top_k
    from ..deploy.metadata import read_metadata

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}", where="predict")
    meta = read_metadata(args.model)
    x = preprocess_images([read_image(p) for p in args.images], meta)
    logits = run_batched(make_session(args.model, threads=args.threads or 1, runtime=args.runtime), x, 64,
                         output_name=meta.get("output_name"))
    results = [{"image": str(p), "top_k": t} for p, t in zip(args.images, top_k(logits, meta["class_names"],
                                                                                args.top_k))]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}: " + ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in r["top_k"]))
    return 0
