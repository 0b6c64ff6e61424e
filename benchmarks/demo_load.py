"""The demo under load, on loopback: N clients at once send uploads (MNIST test digits as
PNG files) and drawings (the same digits as the sketchpad sends them, RGBA composites)
for a bounded time; every answer is checked, and latency is reported per request. Then
one upload larger than the page accepts, which must come back as a clear message.

    python benchmarks/demo_load.py vit-mqa/mnist --data-dir ../shared/data \\
        --clients 20 --seconds 60 --json benchmarks/results/demo-load.json

The server is `vit-mqa demo` in its own process, bound to 127.0.0.1; the clients are
gradio_client's, in threads of this process. Bounded: it stops after --seconds (and each
request after 60 s) by itself.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe
from PIL import Image

from vit_mqa.checkpoint import write_json
from vit_mqa.data.datasets import DATASETS, load_idx_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "vit_mqa", "demo", model, "--port",
                                str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 180
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(r"served at (\S+)", line)
        if found:
            return process, found.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit(f"demo_load: the demo did not start: {line.strip()}")


def sample_files(data_dir: str | None, count: int, out: Path) -> list[tuple[Path, int]]:
    arrays, _ = load_idx_dataset(DATASETS["mnist"], data_dir, download=False)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(arrays["test-labels"]), count, replace=False)
    files = []
    for n, i in enumerate(picks):
        # Dark ink on white paper, 4x: what a person uploads or draws.
        img = Image.fromarray(255 - arrays["test-images"][i]).resize((112, 112))
        path = out / f"{n}.png"
        img.save(path)
        files.append((path, int(arrays["test-labels"][i])))
    return files


def client_loop(url: str, files: list[tuple[Path, int]], stop: float, seed: int,
                out: list[dict[str, Any]]) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    rng = np.random.default_rng(seed)
    while time.monotonic() < stop:
        path, label = files[int(rng.integers(len(files)))]
        drawing = rng.random() < 0.5
        started = time.perf_counter()
        try:
            if drawing:
                rgba = np.asarray(Image.open(path).convert("L"))
                layer = np.zeros((*rgba.shape, 4), np.uint8)
                layer[..., 3] = 255 - rgba  # black strokes on a transparent layer
                tmp = path.with_suffix(f".draw{seed}.png")
                Image.fromarray(layer, "RGBA").save(tmp)
                value = {"background": None, "layers": [], "composite": handle_file(str(tmp))}
                verdict = client.predict(value, api_name="/classify_drawing")[0]
            else:
                verdict = client.predict(handle_file(str(path)), api_name="/classify")[0]
            error = None
        except Exception as e:  # a failed request is counted, not fatal
            verdict, error = "", f"{type(e).__name__}: {e}"
        out.append({"ms": 1000 * (time.perf_counter() - started), "kind":
                    "drawing" if drawing else "upload", "label": label, "error": error,
                    "right": f"Prediction: {label} " in verdict})


def too_large(url: str, out: Path) -> str:
    """The page's answer to an upload over its size limit."""
    from gradio_client import Client, handle_file

    big = out / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40 << 20))
    try:
        Client(url, verbose=False).predict(handle_file(str(big)), api_name="/classify")
    except Exception as e:
        return " ".join(str(e).split())[:200]
    return "accepted"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a run directory or built-in model")
    ap.add_argument("--data-dir")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = sample_files(args.data_dir, 200, Path(tmp))
        process, url = start_server(args.model, free_port())
        try:
            results: list[dict[str, Any]] = []
            stop = time.monotonic() + args.seconds
            threads = [threading.Thread(target=client_loop,
                                        args=(url, files, stop, seed, results))
                       for seed in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=args.seconds + 120)
            large = too_large(url, Path(tmp))
        finally:
            process.terminate()
            process.wait(timeout=30)
    ms = sorted(r["ms"] for r in results)
    record = {
        "command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
        "cpu": describe(), "clients": args.clients, "seconds": args.seconds,
        "requests": len(results), "errors": sum(r["error"] is not None for r in results),
        "right": sum(r["right"] for r in results),
        "p50_ms": statistics.median(ms) if ms else None,
        "p95_ms": ms[int(0.95 * (len(ms) - 1))] if ms else None,
        "max_ms": ms[-1] if ms else None, "too_large_upload": large,
        "first_errors": [r["error"] for r in results if r["error"]][:3]}
    print(f"{record['requests']} requests from {args.clients} clients in {args.seconds:g} s: "
          f"{record['errors']} errors, {record['right']} right; p50 {record['p50_ms']:.0f} ms, "
          f"p95 {record['p95_ms']:.0f} ms, max {record['max_ms']:.0f} ms ({record['cpu']})")
    print(f"an upload over the limit: {large}")
    if args.json:
        write_json(args.json, record)
    return 0 if record["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
