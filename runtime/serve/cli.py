"""`engine-serve [--engine DIR]`: the HTTP API (native /v1 and A1111's /sdapi/v1) around one Pipeline, under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys

from diffusion_engine.engine.atomic import Terminated, run_cli
from diffusion_engine.engine.manifest import ManifestError
from diffusion_engine.runtime import demo
from diffusion_engine.runtime.backends import BACKENDS
from diffusion_engine.runtime.session import BackendUnavailable

API_KEY_ENV = "DIFFUSION_ENGINE_API_KEY"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="engine-serve", description="Serve an engine directory over HTTP: POST /v1/generate, A1111's "
        "/sdapi/v1/txt2img and img2img, /v1/health, /v1/ready, /v1/info, /metrics.",
        epilog=f"Without --engine it serves the built-in demo model ({demo.DESCRIPTION}).")
    p.add_argument("--engine", help="engine directory made by engine-export (default: the built-in demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860, A1111's; 0: any free port)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get 429 (default 32)")
    p.add_argument("--batch-window", type=float, default=20.0, metavar="MS",
                   help="milliseconds a request that can share a UNet batch waits for others (default 20; 0: no wait)")
    p.add_argument("--max-batch", type=int, help="requests per UNet batch (default: the engine's max batch)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included (default 600)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="MiB per request body (default 32)")
    p.add_argument("--api-key", help=f"require this key (Authorization: Bearer KEY or X-API-Key); default ${API_KEY_ENV}")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--no-cuda-graph", action="store_true", help="trt: run every step eagerly")
    p.add_argument("--no-warmup", action="store_true", help="ready at once, without a warm-up generation")
    p.add_argument("--grace", type=float, default=120.0,
                   help="on SIGTERM/SIGINT: seconds to finish the requests in flight before closing them (default 120)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("engine-serve", lambda: serve(args))


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusion_engine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        from diffusion_engine.runtime.serve.app import ServeConfig, create_app
        import uvicorn
    except ImportError as exc:
        print(f"engine-serve: error: {exc.name or exc} is not installed; pip install 'diffusion-engine[serve]'",
              file=sys.stderr)
        return 2
    from diffusion_engine.runtime.pipeline import Pipeline

    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port} must be in 0..65535")
        for name in ("max_queue", "max_images"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
        if args.max_batch is not None and args.max_batch < 1:
            raise ValueError(f"--max-batch {args.max_batch} must be at least 1")
        if not args.grace >= 0:
            raise ValueError(f"--grace {args.grace} must be >= 0 seconds")
        key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
        config = ServeConfig(max_queue=args.max_queue, batch_window=args.batch_window / 1000, max_batch=args.max_batch,
                             timeout=args.timeout, api_key=key, max_body=int(args.max_body_mb * (1 << 20)),
                             max_images=args.max_images, warmup=not args.no_warmup)
        sock = _bind(args.host, args.port)
        engine = args.engine or demo.ensure_engine(say=lambda m: print(m, file=sys.stderr)).engine_dir
        pipe = Pipeline.load(engine, backend=args.backend, cuda_graphs=not args.no_cuda_graph)
    except (ValueError, OSError, ManifestError, demo.DemoError, BackendUnavailable) as exc:
        print(f"engine-serve: error: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    if key is None and not _loopback(args.host):
        print(f"engine-serve: warning: listening on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    with pipe:
        server = uvicorn.Server(uvicorn.Config(create_app(pipe, config), log_level="warning", access_log=args.verbose,
                                               timeout_graceful_shutdown=args.grace, lifespan="on"))
        print(f"engine-serve: serving {engine} ({pipe.manifest.family}, {pipe.backend}) on http://{host}:{port}",
              flush=True)
        try:
            server.run(sockets=[sock])
        except (Terminated, KeyboardInterrupt):  # uvicorn raises the signal again once it has shut down gracefully
            pass
    print("engine-serve: stopped", flush=True)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the engine loads (a taken port fails at once, with its number)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
