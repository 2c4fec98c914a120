"""`python -m diffusion_engine.benchmarks.serve_load`: engine-serve under load, micro-batching on and off.

N client threads send M txt2img requests each (distinct seeds) to a real uvicorn server on a free
127.0.0.1 port, once with micro-batching (the engine's max batch, a batch window) and once without
(max batch 1). Every answer is checked: an image equal to what a lone `Pipeline.generate` with that seed
gives (bit-identical, else its PSNR is printed and must be >= 50 dB), or a clean 429. Bounded: each
request has a client timeout, the whole run a deadline; the server stops by itself at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MIN_PSNR = 50.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Server:
    """The app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any):
        import httpx
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 120
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                try:
                    if c.get("/v1/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > end:
                    raise RuntimeError("the server did not become ready in 120 s")
                time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def run_mode(pipe: Any, name: str, config: Any, clients: int, per_client: int, body: dict[str, Any],
             timeout: float) -> dict[str, Any]:
    import httpx

    from diffusion_engine.runtime.serve.app import create_app

    server = Server(create_app(pipe, config))
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=timeout) as c:
            for j in range(per_client):
                seed = 1000 + index * per_client + j
                start = time.perf_counter()
                try:
                    r = c.post("/v1/generate", json={**body, "seed": seed})
                    status, payload = r.status_code, (r.json() if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    status, payload = None, repr(exc)
                with lock:
                    answers.append({"seed": seed, "status": status, "seconds": time.perf_counter() - start,
                                    "payload": payload})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * per_client + 60)
    wall = time.perf_counter() - start
    hung = sum(t.is_alive() for t in threads)
    server.close()
    ok = [a for a in answers if a["status"] == 200]
    latencies = [a["seconds"] for a in ok]
    batches = [a["payload"]["timings"].get("batch", 1.0) for a in ok]
    return {"mode": name, "answers": answers, "sent": clients * per_client, "hung_clients": hung, "ok": len(ok),
            "rejected_429": sum(a["status"] == 429 for a in answers),
            "failed": [a for a in answers if a["status"] not in (200, 429)],
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": percentile(latencies, 99) if latencies else None,
            "throughput_img_s": len(ok) / wall, "wall_s": wall, "mean_batch": statistics.mean(batches) if batches else None}


def check(pipe: Any, results: list[dict[str, Any]], body: dict[str, Any]) -> tuple[int, int, float]:
    """Each answered image against a lone generate with its seed: (bit-identical, checked, lowest PSNR)."""
    from PIL import Image

    kw = {k: v for k, v in body.items() if k != "prompt"}
    identical, checked, lowest = 0, 0, float("inf")
    for result in results:
        for a in result["answers"]:
            if a["status"] != 200:
                continue
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["payload"]["images"][0]))).convert("RGB"))
            want = pipe.generate(body["prompt"], seed=a["seed"], **kw).array[0]
            score = psnr(got, want)
            identical += bool(np.array_equal(got, want))
            checked += 1
            lowest = min(lowest, score)
            a["psnr_db"] = score
    return identical, checked, lowest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffusion_engine.benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", help="engine directory (default: the built-in demo model)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scheduler", default="ddim", help="a deterministic sampler (the stochastic ones run alone)")
    p.add_argument("--batch-window-ms", type=float, default=50.0)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    p.add_argument("--out", help="write the figures as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("clients", "requests", "steps", "max_queue"):
        if getattr(args, name) < 1:
            print(f"serve_load: error: --{name.replace('_', '-')} {getattr(args, name)} must be at least 1", file=sys.stderr)
            return 2
    from diffusion_engine.runtime import demo
    from diffusion_engine.runtime.pipeline import Pipeline
    from diffusion_engine.runtime.serve.app import ServeConfig

    engine = args.engine or demo.ensure_engine(say=lambda m: print(m, file=sys.stderr)).engine_dir
    body = {"prompt": args.prompt, "steps": args.steps, "scheduler": args.scheduler}
    with Pipeline.load(engine) as pipe:
        max_batch = pipe.manifest.build.max_batch
        modes = [
            ("micro-batching on", ServeConfig(max_queue=args.max_queue, batch_window=args.batch_window_ms / 1000)),
            ("micro-batching off", ServeConfig(max_queue=args.max_queue, batch_window=0.0, max_batch=1)),
        ]
        results = [run_mode(pipe, name, config, args.clients, args.requests, body, args.timeout) for name, config in modes]
        identical, checked, lowest = check(pipe, results, body)
    print(f"engine {engine}; {args.clients} clients x {args.requests} requests, {args.steps} steps of {args.scheduler}, "
          f"max batch {max_batch}, batch window {args.batch_window_ms:g} ms")
    print("| mode | answered | 429 | other | p50 latency (s) | p99 latency (s) | throughput (img/s) | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['ok']}/{r['sent']} | {r['rejected_429']} | {len(r['failed'])} | {r['p50_s']:.2f} | "
              f"{r['p99_s']:.2f} | {r['throughput_img_s']:.2f} | {r['mean_batch']:.2f} |")
    print(f"images checked against a lone generate with their seed: {checked}, bit-identical {identical}, "
          f"lowest PSNR {lowest:.1f} dB")
    if len(results) == 2 and results[0]["throughput_img_s"] and results[1]["throughput_img_s"]:
        print(f"throughput ratio on/off: {results[0]['throughput_img_s'] / results[1]['throughput_img_s']:.2f}")
    if args.out:
        from diffusion_engine.engine.atomic import write_atomic

        slim = [{k: v for k, v in r.items() if k != "answers"} | {"psnr_db": [a.get("psnr_db") for a in r["answers"]]}
                for r in results]
        write_atomic(Path(args.out), json.dumps({"settings": vars(args), "engine": str(engine), "results": slim},
                                                indent=2, default=str) + "\n")
    bad = [r for r in results if r["failed"] or r["hung_clients"] or r["ok"] + r["rejected_429"] != r["sent"]]
    if bad or lowest < MIN_PSNR:
        print("serve_load: FAILED: " + ("; ".join(f"{r['mode']}: {len(r['failed'])} failed, {r['hung_clients']} hung"
                                                   for r in bad) or f"lowest PSNR {lowest:.1f} dB < {MIN_PSNR}"),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
