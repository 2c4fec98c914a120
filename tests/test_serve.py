"""engine-serve for real: uvicorn on a free loopback port, httpx as the client, the tiny engine behind it.

Every image the server returns is compared with what `Pipeline.generate` gives for the same seed and
settings: bit-identical for a request that ran alone; for requests the queue batched together, equal or
(where a larger batch changes the floating-point summation order) PSNR >= 50 dB, printed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from diffusion_engine.runtime.infotext import A1111_SAMPLERS, infotext, sampler_from_a1111
from diffusion_engine.runtime.samplers import SAMPLERS
from diffusion_engine.runtime.serve.app import ServeConfig, create_app
from tests.test_pipeline import psnr

PROMPT = "a red circle on a blue background"
SIZE = 256
BASE = dict(steps=2, height=SIZE, width=SIZE)
MIN_BATCHED_PSNR = 50.0


class Served:
    """A uvicorn server for an app on a free 127.0.0.1 port, in a thread; stops by itself on close."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=120)
        wait_ready(self.client)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.client.get("/metrics").text, name, **labels)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"


def wait_ready(client: httpx.Client, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if client.get("/v1/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{client.base_url} was not ready within {limit} s")


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 where absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))).strip(",") == want:
            return float(m.group(3))
    return 0.0


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def pipe(tiny_engine, pipelines):
    return pipelines(tiny_engine)


@pytest.fixture(scope="module")
def served(pipe):
    s = Served(create_app(pipe, ServeConfig(batch_window=0.2)))
    yield s
    s.close()


def test_native_generate_is_pipeline_generate(served, pipe):
    want = pipe.generate(PROMPT, seed=3, scheduler="ddim", **BASE).array[0]
    r = served.client.post("/v1/generate", json={"prompt": PROMPT, "seed": 3, "scheduler": "ddim", **BASE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert np.array_equal(pixels(body["images"][0]), want)
    assert body["seed"] == 3 and body["parameters"][0]["scheduler"] == "ddim"
    png = served.client.post("/v1/generate", json={"prompt": PROMPT, "seed": 3, "scheduler": "ddim", **BASE},
                             headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and png.headers["x-seed"] == "3"
    image = Image.open(io.BytesIO(png.content))
    assert np.array_equal(np.asarray(image), want)
    assert image.text["parameters"].startswith(f"{PROMPT}\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 256x256")
    assert json.loads(image.text["diffusion-engine"])["seed"] == 3
    # A random seed is reported, and reproduces the image.
    r = served.client.post("/v1/generate", json={"prompt": PROMPT, "scheduler": "ddim", **BASE}).json()
    assert np.array_equal(pixels(r["images"][0]), pipe.generate(PROMPT, seed=r["seed"], scheduler="ddim", **BASE).array[0])


def test_a1111_txt2img_matches_pipeline_seed_by_seed(served, pipe):
    body = {"prompt": PROMPT, "negative_prompt": "green", "seed": 11, "sampler_name": "Euler", "steps": 2,
            "cfg_scale": 5, "width": SIZE, "height": SIZE, "batch_size": 2, "n_iter": 2,
            "restore_faces": False, "save_images": False, "do_not_save_grid": True, "styles": [], "tiling": False}
    r = served.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11 and info["sampler_name"] == "Euler"
    assert answer["parameters"]["prompt"] == PROMPT and len(answer["images"]) == 4
    for i, b in enumerate(answer["images"]):
        want = pipe.generate(PROMPT, "green", seed=11 + i, scheduler="euler", guidance_scale=5.0, **BASE).array[0]
        got = pixels(b)
        score = psnr(got, want)
        print(f"A1111 txt2img image {i} (seed {11 + i}) vs Pipeline.generate: "
              f"{'bit-identical' if np.array_equal(got, want) else f'PSNR {score:.1f} dB'}")
        assert score >= MIN_BATCHED_PSNR
        assert info["infotexts"][i] == Image.open(io.BytesIO(base64.b64decode(b))).text["parameters"]
        assert f"Seed: {11 + i}," in info["infotexts"][i] and "Negative prompt: green" in info["infotexts"][i]


def test_every_a1111_sampler_name_runs_our_sampler(served, pipe):
    listed = served.client.get("/sdapi/v1/samplers").json()
    assert {sampler_from_a1111(s["name"]) for s in listed} == set(SAMPLERS) and len(listed) == len(SAMPLERS)
    for entry in listed:
        ours = sampler_from_a1111(entry["name"])
        for alias in entry["aliases"]:
            assert sampler_from_a1111(alias) == sampler_from_a1111(alias.upper()) == ours
        r = served.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 5, "sampler_name": entry["name"],
                                                          "steps": 2, "width": SIZE, "height": SIZE})
        assert r.status_code == 200, (entry, r.text)
        want = pipe.generate(PROMPT, seed=5, scheduler=ours, **BASE).array[0]
        assert np.array_equal(pixels(r.json()["images"][0]), want), entry["name"]
    assert sampler_from_a1111("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert sampler_from_a1111("Euler a", "Automatic") == "euler_a"
    with pytest.raises(ValueError, match="scheduler 'Exponential' with sampler 'Euler'"):
        sampler_from_a1111("Euler", "Exponential")


def test_a1111_img2img_and_inpainting(served, pipe):
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    body = {"prompt": PROMPT, "seed": 2, "sampler_name": "DDIM", "steps": 4, "width": SIZE, "height": SIZE,
            "init_images": [png_b64(init)], "denoising_strength": 0.5, "resize_mode": 0}
    r = served.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    want = pipe.generate(PROMPT, seed=2, scheduler="ddim", steps=4, image=init, strength=0.5).array[0]
    assert np.array_equal(pixels(r.json()["images"][0]), want)
    assert "init_images" not in r.json()["parameters"] and json.loads(r.json()["info"])["denoising_strength"] == 0.5
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[64:192, 64:192] = 255
    r = served.client.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(np.stack([mask] * 3, -1)),
                                                      "inpainting_fill": 1, "mask_blur": 0, "inpaint_full_res": False})
    assert r.status_code == 200, r.text
    want = pipe.generate(PROMPT, seed=2, scheduler="ddim", steps=4, image=init, strength=0.5, mask=mask).array[0]
    assert np.array_equal(pixels(r.json()["images"][0]), want)
    inverted = served.client.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(np.stack([255 - mask] * 3, -1)),
                                                             "inpainting_mask_invert": 1})
    assert np.array_equal(pixels(inverted.json()["images"][0]), want)


@pytest.mark.parametrize("path,body,message", [
    ("/v1/generate", {"prompt": PROMPT, "steps": 0}, "steps must be"),
    ("/v1/generate", {"prompt": PROMPT, "height": 100, "width": SIZE},
     "height 100 is not a size this engine takes: a multiple of 16 from 256 to 384"),
    ("/v1/generate", {"prompt": PROMPT, "latents": [0.0]}, "unknown field 'latents'"),
    ("/v1/generate", {"negative_prompt": "x"}, "prompt is required"),
    ("/v1/generate", {"prompt": PROMPT, "image": "/etc/passwd"}, "image is not valid base64 (a file path or URL is not accepted"),
    ("/v1/generate", {"prompt": PROMPT, "timeout": -1}, "timeout must be a number of seconds in (0, 600]"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "enable_hr": True}, "enable_hr True changes the image and this engine does not run it"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "sampler_name": "DPM++ SDE"}, "sampler_name 'DPM++ SDE' is not one this engine runs"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "frobnicate": 1}, "unknown field 'frobnicate'"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "batch_size": 9, "n_iter": 2}, "18 images; this server makes at most 16"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "other.safetensors"}},
     "override_settings.sd_model_checkpoint 'other.safetensors': this server runs one model"),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "override_settings": {"CLIP_stop_at_last_layers": 2}},
     "override_settings.CLIP_stop_at_last_layers 2 would change the image"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT}, "init_images must be a list of one base64 image"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": ["data:text/plain;base64,AAAA"]}, "a data URL must be data:image/"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": ["iVBORw0KGgo="]}, "init_images[0] cannot be read as an image"),
    ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [None], "mask_blur": 4}, "mask_blur 4 changes the image"),
])
def test_user_errors_are_422_with_the_engines_message(served, path, body, message):
    r = served.client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid" and message in r.json()["detail"], r.json()
    assert "Traceback" not in r.text


def test_the_engines_own_message_reaches_the_client(served, pipe):
    from diffusion_engine.runtime.request import GenerationRequest

    with pytest.raises(ValueError) as engine:
        pipe.prepare(GenerationRequest(PROMPT, steps=5000, scheduler="ddim"))
    r = served.client.post("/v1/generate", json={"prompt": PROMPT, "steps": 5000, "scheduler": "ddim"})
    assert r.status_code == 422 and r.json()["detail"] == str(engine.value)
    r = served.client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.json()["detail"]


def test_compatible_requests_share_a_unet_batch(pipe):
    s = Served(create_app(pipe, ServeConfig(batch_window=1.0)))
    try:
        seeds = [21, 22]
        out: dict[int, httpx.Response] = {}

        def post(seed: int) -> None:
            out[seed] = s.client.post("/v1/generate", json={"prompt": PROMPT, "seed": seed, "scheduler": "ddim", **BASE})

        threads = [threading.Thread(target=post, args=(seed,)) for seed in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for seed in seeds:
            assert out[seed].status_code == 200, out[seed].text
            got = pixels(out[seed].json()["images"][0])
            want = pipe.generate(PROMPT, seed=seed, scheduler="ddim", **BASE).array[0]
            print(f"batched request seed {seed} vs alone: PSNR {psnr(got, want):.1f} dB"
                  f"{' (bit-identical)' if np.array_equal(got, want) else ''}")
            assert psnr(got, want) >= MIN_BATCHED_PSNR
            assert out[seed].json()["timings"]["batch"] == 2.0
        assert s.metric("diffusion_engine_batch_size_count") == 1.0  # one UNet batch of both (the warm-up is not queued)
        assert s.metric("diffusion_engine_batch_size_sum") == 2.0
    finally:
        s.close()


def test_full_queue_is_429_with_retry_after(pipe):
    s = Served(create_app(pipe, ServeConfig(max_queue=1, batch_window=0)))
    try:
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def post(seed: int) -> None:
            r = s.client.post("/v1/generate", json={"prompt": PROMPT, "seed": seed, "scheduler": "ddim", "steps": 8,
                                                    "height": SIZE, "width": SIZE})
            with lock:
                results.append(r)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in results)
        print(f"5 concurrent requests, max queue 1: status codes {codes}")
        assert len(results) == 5 and set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes
        refused = next(r for r in results if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1 and "the queue is full" in refused.json()["detail"]
        assert s.metric("diffusion_engine_rejections_total", reason="queue_full") == codes.count(429)
    finally:
        s.close()


def test_deadline_is_504_and_the_run_stops(pipe):
    s = Served(create_app(pipe, ServeConfig(batch_window=0)))
    try:
        start = time.monotonic()
        r = s.client.post("/v1/generate", json={"prompt": PROMPT, "seed": 1, "scheduler": "ddim", "steps": 200,
                                                "height": 384, "width": 384, "timeout": 0.5})
        assert r.status_code == 504 and r.json()["error"] == "deadline", r.text
        assert time.monotonic() - start < 10
        # The abandoned run stops at its next step: the server answers the next request at once.
        ok = s.client.post("/v1/generate", json={"prompt": PROMPT, "seed": 1, "scheduler": "ddim", **BASE})
        assert ok.status_code == 200
        assert s.metric("diffusion_engine_dropped_total", reason="abandoned") == 1.0
        assert s.metric("diffusion_engine_rejections_total", reason="deadline") == 1.0
    finally:
        s.close()


def test_a_client_that_disconnects_has_its_queued_work_dropped(pipe):
    s = Served(create_app(pipe, ServeConfig(batch_window=0)))
    try:
        long = threading.Thread(target=lambda: s.client.post("/v1/generate", json={
            "prompt": PROMPT, "seed": 1, "scheduler": "ddim", "steps": 30, "height": 384, "width": 384}))
        long.start()
        time.sleep(0.5)
        with httpx.Client(base_url=s.url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/generate", json={"prompt": PROMPT, "seed": 2, "scheduler": "ddim", **BASE})
        long.join(120)
        deadline = time.monotonic() + 10
        while s.metric("diffusion_engine_dropped_total", reason="cancelled") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("diffusion_engine_dropped_total", reason="cancelled") == 1.0
        assert s.metric("diffusion_engine_batch_size_count") == 1.0  # only the long request ran
    finally:
        s.close()


def test_api_key_body_limit_and_info(pipe):
    s = Served(create_app(pipe, ServeConfig(api_key="s3cret", max_body=4096)))
    try:
        assert s.client.get("/v1/health").status_code == 200  # probes need no key
        assert s.client.get("/v1/info").status_code == 401
        assert s.client.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        info = s.client.get("/v1/info", headers={"X-API-Key": "s3cret"}).json()
        assert info["family"] == "sd1" and info["sizes"] == {"min": 256, "max": 384, "multiple_of": 16}
        assert info["samplers"] == list(SAMPLERS) and info["decoders"] == ["full", "tiny"] and info["max_batch"] == 2
        big = s.client.post("/v1/generate", headers={"Authorization": "Bearer s3cret"},
                            json={"prompt": "x" * 5000})
        assert big.status_code == 413 and "4096" in big.json()["detail"]
        models = s.client.get("/sdapi/v1/sd-models", headers={"X-API-Key": "s3cret"}).json()
        assert len(models) == 1 and models[0]["title"].startswith(models[0]["model_name"])
        opts = s.client.get("/sdapi/v1/options", headers={"X-API-Key": "s3cret"}).json()
        assert opts["sd_model_checkpoint"] == models[0]["title"]
        assert s.client.post("/sdapi/v1/options", headers={"X-API-Key": "s3cret"},
                             json={"sd_model_checkpoint": models[0]["title"], "samples_save": False}).status_code == 200
        progress = s.client.get("/sdapi/v1/progress", headers={"X-API-Key": "s3cret"}).json()
        assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
        text = s.client.get("/metrics", headers={"X-API-Key": "s3cret"}).text
        assert "diffusion_engine_queue_depth" in text and metric(text, "diffusion_engine_rejections_total",
                                                                 reason="unauthorized") == 2.0
    finally:
        s.close()


def test_infotext_is_a1111s_format():
    p = {"prompt": "a cat, sitting", "negative_prompt": "", "steps": 20, "scheduler": "dpmpp_2m_karras",
         "guidance_scale": 7.0, "seed": 1, "width": 512, "height": 768, "strength": 0.75}
    assert infotext(p, "sd15", "abcdef0123") == ("a cat, sitting\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, "
                                                  "Seed: 1, Size: 512x768, Model hash: abcdef0123, Model: sd15, "
                                                  "Denoising strength: 0.75")
    assert 'Model: "my, model"' in infotext({**p, "negative_prompt": "blur"}, "my, model")
    assert set(A1111_SAMPLERS) == set(SAMPLERS)


def test_sigterm_finishes_in_flight_work_and_exits(tiny_engine, tmp_path):
    """engine-serve in its own process: SIGTERM while a request runs; it is answered, then the server exits 0."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_engine.runtime.serve.cli", "--engine", str(tiny_engine),
                             "--port", str(port), "--no-warmup", "--batch-window", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        wait_ready(client, 120)
        results: list[httpx.Response] = []

        def post(seed: int) -> None:  # a client per thread: the two requests on their own connections
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as own:
                results.append(own.post("/v1/generate", json={"prompt": PROMPT, "seed": seed, "scheduler": "ddim",
                                                              "steps": 60, "height": 384, "width": 384}))

        threads = [threading.Thread(target=post, args=(seed,)) for seed in (1,)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while client.get("/sdapi/v1/progress").json()["state"]["job_count"] < 1:  # the request is in the server
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        output = proc.stdout.read()
        assert [r.status_code for r in results] == [200], output
        assert "engine-serve: stopped" in output
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_engine_serve_refuses_bad_flags_in_one_line(tmp_path, capsys):
    from diffusion_engine.runtime.serve.cli import main

    assert main(["--engine", str(tmp_path / "none"), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "engine-serve: error: --port 70000 must be in 0..65535"
    assert main(["--engine", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "no such engine directory" in capsys.readouterr().err
    assert main(["--engine", str(tmp_path / "none"), "--max-queue", "0"]) == 2
    assert "--max-queue 0 must be at least 1" in capsys.readouterr().err


def test_load_benchmark_checks_every_answer(tiny_engine, tmp_path, capsys):
    from diffusion_engine.benchmarks.serve_load import main

    out = tmp_path / "load.json"
    assert main(["--engine", str(tiny_engine), "--clients", "2", "--requests", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "images checked against a lone generate with their seed: 8," in printed
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["micro-batching on", "micro-batching off"]
    assert all(r["ok"] + r["rejected_429"] == r["sent"] == 4 and not r["failed"] for r in results)
    assert main(["--engine", str(tiny_engine), "--clients", "0"]) == 2
