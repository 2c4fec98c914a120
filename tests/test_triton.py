"""engine-triton: the model repository it writes, loaded by a real tritonserver and asked with tritonclient (HTTP).

The server is the one the nvidia-pytriton wheel ships (it runs on a CPU-only machine), with its python
backend and this Python's stub copied into a backend folder of the test's own. The model's Python is a
venv given as EXECUTION_ENV_PATH that sees this environment's packages; where the stub's pybind11
predates numpy 2 (pytriton 0.7.0's does: BYTES and numeric tensors come out wrong under numpy 2) it puts
numpy < 2 first, installed once with pip into pytest's cache (or the folder $DIFFUSION_ENGINE_TRITON_NUMPY1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import venv
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from diffusion_engine.engine.atomic import atomic_directory, current_umask
from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.runtime.serve import triton
from tests.test_pipeline import psnr

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
SETTINGS = {"steps": 2, "height": 256, "width": 256}  # guidance and scheduler left out: the engine's defaults
START_TIMEOUT, REQUEST_TIMEOUT, STOP_TIMEOUT = 120.0, 120.0, 30.0
NUMPY1_ENV = "DIFFUSION_ENGINE_TRITON_NUMPY1"
CLIENT_DATATYPE = {"STRING": "BYTES"}  # Triton's config says TYPE_STRING, its protocol BYTES
NUMPY_DTYPE = {"STRING": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}


@dataclass(frozen=True)
class TritonDist:
    """Where nvidia-pytriton keeps tritonserver, its bundled libraries, the python backend and this Python's stub."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path
    libpython_dir: Path


def find_tritonserver() -> TritonDist:
    """The installed pytriton's server pieces (found, not imported: its own Python deps are not needed); skip
    naming the first one missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-pytriton is not installed (pip install nvidia-pytriton): it ships the tritonserver binary")
    root = Path(list(spec.submodule_search_locations)[0])
    dist, version = root / "tritonserver", f"{sys.version_info.major}.{sys.version_info.minor}"
    libs = root.parent / "nvidia_pytriton.libs"
    libs = libs if libs.is_dir() else dist / "external_libs"  # an editable pytriton keeps them there
    pieces = {
        "the tritonserver binary": dist / "bin" / "tritonserver",
        "tritonserver's bundled libraries (nvidia_pytriton.libs)": libs,
        "the python backend (libtriton_python.so)": dist / "backends" / "python" / "libtriton_python.so",
        f"the python backend stub for Python {version}": dist / "python_backend_stubs" / version /
        "triton_python_backend_stub",
    }
    for what, path in pieces.items():
        if not path.exists():
            pytest.skip(f"{what} is not in nvidia-pytriton at {path}")
    libpython = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("INSTSONAME") or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libpython.is_file():
        pytest.skip(f"this Python ({sys.executable}) has no shared libpython{version}, which the stub links")
    return TritonDist(pieces["the tritonserver binary"], libs, dist / "backends" / "python",
                      pieces[f"the python backend stub for Python {version}"], libpython.parent)


def backend_directory(dist: TritonDist, root: Path) -> Path:
    """A --backend-directory whose python backend has this Python's stub beside libtriton_python.so (as pytriton
    lays it out at run time; the bundled libraries come from LD_LIBRARY_PATH)."""
    backends = root / "backends"
    shutil.copytree(dist.python_backend, backends / "python")
    shutil.copy2(dist.stub, backends / "python" / "triton_python_backend_stub")
    return backends


def stub_needs_numpy1(stub: Path) -> bool:
    """True under numpy 2 when the stub's pybind11 predates numpy 2 (pybind11 >= 2.12 names numpy._core)."""
    return int(np.__version__.split(".")[0]) >= 2 and b"numpy._core" not in stub.read_bytes()


def numpy1_folder(cache: Path) -> Path:
    """A folder holding numpy < 2: $DIFFUSION_ENGINE_TRITON_NUMPY1, else pip-installed once into the cache."""
    if os.environ.get(NUMPY1_ENV):
        return Path(os.environ[NUMPY1_ENV])
    target = cache / f"numpy1-py{sys.version_info.major}{sys.version_info.minor}"
    if (target / "numpy").is_dir():
        return target
    with atomic_directory(target) as tmp:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
                   "--target", str(tmp), "numpy<2"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"numpy<2 for the python backend stub (its pybind11 predates numpy 2) could not be installed: "
                        f"{last}; set ${NUMPY1_ENV} to a folder made by `pip install --target DIR 'numpy<2'`")
    return target


def stub_environment(root: Path, numpy1: Path | None) -> Path:
    """A venv for EXECUTION_ENV_PATH that sees this environment's packages (this package, onnxruntime, ...),
    numpy1's numpy first where given."""
    env = root / "stub-env"
    venv.EnvBuilder(with_pip=False).create(env)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    lines = ([str(numpy1)] if numpy1 else []) + [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    (purelib / "host_environment.pth").write_text("\n".join(lines) + "\n")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def tritonserver(dist: TritonDist, backends: Path, repo: Path, model: str, log: Path) -> Iterator[str]:
    """Run tritonserver on 127.0.0.1 (HTTP only) until the model is ready; yield its URL; stop it (each bounded)."""
    from tritonclient.http import InferenceServerClient

    port = free_port()
    command = [str(dist.binary), "--model-repository", str(repo), "--backend-directory", str(backends),
               "--http-address", "127.0.0.1", "--http-port", str(port), "--allow-grpc", "false",
               "--allow-metrics", "false", "--exit-timeout-secs", "10",
               "--backend-config", f"python,shm-region-prefix-name=de-test-{os.getpid()}-{port}"]
    paths = [str(dist.libs), str(dist.libpython_dir), os.environ.get("LD_LIBRARY_PATH", "")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, paths))}
    print("starting", " ".join(command))
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, start = f"127.0.0.1:{port}", time.monotonic()
    try:
        client = InferenceServerClient(url)
        try:
            while not _ready(client, model):
                if server.poll() is not None:
                    pytest.fail(f"tritonserver exited with {server.returncode}:\n{log_tail(log)}")
                if time.monotonic() - start > START_TIMEOUT:
                    pytest.fail(f"model {model} not ready after {START_TIMEOUT:.0f} s:\n{log_tail(log)}")
                time.sleep(0.5)
        finally:
            client.close()  # an open connection holds the server's shutdown for its whole exit timeout
        print(f"tritonserver ready at {url} in {time.monotonic() - start:.1f} s")
        yield url
    finally:
        stop = time.monotonic()
        _stop(server)
        print(f"tritonserver stopped with {server.returncode} in {time.monotonic() - stop:.1f} s")


def _ready(client, model: str) -> bool:
    try:
        return client.is_server_ready() and client.is_model_ready(model)
    except Exception:  # not listening yet
        return False


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to its process group (the server and its stubs) if it has not exited in time."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        server.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(STOP_TIMEOUT)


def request_inputs(**rows: list) -> list:
    """tritonclient inputs, one list of per-row values per model input (as the model's config declares it)."""
    from tritonclient.http import InferInput

    specs = {s.name: s for s in triton.INPUTS}
    inputs = []
    for name, values in rows.items():
        spec = specs[name]
        data = [v.encode() if isinstance(v, str) else v for v in values]
        array = np.array(data, dtype=NUMPY_DTYPE[spec.data_type]).reshape(len(values), 1)
        item = InferInput(name, list(array.shape), CLIENT_DATATYPE.get(spec.data_type, spec.data_type))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def compare(label: str, served: np.ndarray, direct: np.ndarray, batched: bool = False) -> None:
    """Print and assert that served pixels are generate's: exactly, or for rows that shared a UNet batch (where
    a larger batch may change the floating-point summation order) equal or PSNR >= 50 dB."""
    assert served.shape == direct.shape and served.dtype == direct.dtype, (served.shape, direct.shape)
    same = np.array_equal(served, direct)
    score = float("inf") if same else psnr(served, direct)
    print(f"{label}: served {served.shape} {served.dtype} vs generate: equal {same} "
          f"(differing values: {int(np.count_nonzero(served != direct))}, PSNR {score:.1f} dB)")
    assert same or (batched and score >= 50)


@pytest.fixture
def served_repository(tiny_engine, tmp_path, request):
    """(URL, model name) of the tiny engine's repository served by a real tritonserver; skips naming what is missing."""
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    dist = find_tritonserver()
    cache = request.config.cache.mkdir("triton") if getattr(request.config, "cache", None) else tmp_path
    numpy1 = numpy1_folder(Path(cache)) if stub_needs_numpy1(dist.stub) else None
    print(f"tritonserver {dist.binary}, stub {dist.stub}, numpy<2 for the stub: {numpy1}")
    env = stub_environment(tmp_path, numpy1)
    repo = tmp_path / "repo"
    assert triton.main([str(tiny_engine), "--out", str(repo), "--execution-env", str(env)]) == 0
    with tritonserver(dist, backend_directory(dist, tmp_path), repo, triton.DEFAULT_MODEL_NAME,
                      tmp_path / "tritonserver.log") as url:
        yield url, triton.DEFAULT_MODEL_NAME


def test_tritonserver_answers_with_the_pixels_of_generate(served_repository, tiny_engine, pipelines):
    from tritonclient.http import InferenceServerClient

    url, model = served_repository
    pipe = pipelines(tiny_engine)
    client = InferenceServerClient(url, connection_timeout=REQUEST_TIMEOUT, network_timeout=REQUEST_TIMEOUT)
    try:
        ask(client, model, pipe)
    finally:
        client.close()


def ask(client, model: str, pipe) -> None:
    """The bad request, a seeded one and a two-row one without seeds, each against generate."""
    from tritonclient.utils import InferenceServerException

    # A bad request gets the engine's own one-line message, and the model goes on serving.
    with pytest.raises(ValueError) as engine_error:
        pipe.generate(PROMPT, **{**SETTINGS, "height": 100})
    with pytest.raises(InferenceServerException) as served_error:
        client.infer(model, request_inputs(prompt=[PROMPT], steps=[2], height=[100], width=[256]))
    print(f"height 100: engine says {str(engine_error.value)!r}; served {served_error.value.message()!r}")
    assert str(engine_error.value) in served_error.value.message()

    # A seeded row: the same pixels, seed and parameters as generate with the same settings.
    served = client.infer(model, request_inputs(prompt=[PROMPT], negative_prompt=[NEGATIVE], seed=[1234],
                                                **{k: [v] for k, v in SETTINGS.items()}))
    direct = pipe.generate(PROMPT, NEGATIVE, seed=1234, **SETTINGS)
    compare("seed 1234", served.as_numpy(triton.IMAGE), direct.array)
    assert served.as_numpy(triton.SEED).tolist() == [[1234]]
    assert json.loads(served.as_numpy(triton.PARAMETERS)[0, 0]) == direct.parameters

    # Two rows without seeds: each gets a random seed, reported, and its pixels are generate's with that seed.
    prompts = [PROMPT, "a green square"]
    served = client.infer(model, request_inputs(prompt=prompts, **{k: [v, v] for k, v in SETTINGS.items()}))
    seeds = served.as_numpy(triton.SEED)[:, 0].tolist()
    print(f"two rows without seeds: seeds {seeds}")
    direct = np.concatenate([pipe.generate(p, seed=s, **SETTINGS).array for p, s in zip(prompts, seeds)])
    compare("two rows, random seeds (one UNet batch)", served.as_numpy(triton.IMAGE), direct, batched=True)


def rows(**values) -> dict[str, np.ndarray]:
    """One request's inputs as the model gets them from Triton: [rows, 1] arrays, text as bytes."""
    specs = {s.name: s for s in triton.INPUTS}
    return {k: np.array([x.encode() if isinstance(x, str) else x for x in v],
                        dtype=NUMPY_DTYPE[specs[k].data_type]).reshape(len(v), 1) for k, v in values.items()}


def test_answer_batches_rows_of_several_requests_and_fails_only_the_bad_one(tiny_engine, pipelines, monkeypatch):
    pipe = pipelines(tiny_engine)
    batches: list[int] = []
    run = pipe.run
    monkeypatch.setattr(pipe, "run", lambda request, progress=None: batches.append(
        len(request.prompt) if isinstance(request.prompt, list) else 1) or run(request, progress))
    two = {k: [v] for k, v in SETTINGS.items()}
    requests = [
        rows(prompt=[PROMPT], seed=[11], **two),
        rows(prompt=[PROMPT], seed=[12], steps=[2], height=[100], width=[256]),  # refused by the engine
        rows(prompt=["a green square"], seed=[13], **two),  # shares the first one's UNet batch
        rows(prompt=[PROMPT], seed=[14], steps=[3], height=[256], width=[256]),  # other steps: alone
        rows(prompt=[PROMPT, PROMPT], seed=[15, 16], steps=[2, 2], height=[256, 320], width=[256, 256]),  # refused
    ]
    answers = triton.answer(pipe, requests)
    print(f"UNet batches: {batches}; answers: {[type(a).__name__ for a in answers]}")
    assert batches == [2, 1]
    for n in (1, 4):
        assert isinstance(answers[n], ValueError)
        print(f"request {n} refused: {answers[n]}")
    assert "height" in str(answers[1]) and "share height and width" in str(answers[4])
    monkeypatch.setattr(pipe, "run", run)
    for n, prompt, seed, steps in ((0, PROMPT, 11, 2), (2, "a green square", 13, 2), (3, PROMPT, 14, 3)):
        direct = pipe.generate(prompt, seed=seed, **{**SETTINGS, "steps": steps})
        compare(f"request {n} (seed {seed})", answers[n][triton.IMAGE], direct.array, batched=n in (0, 2))
        assert answers[n][triton.SEED].tolist() == [[seed]]
        assert json.loads(answers[n][triton.PARAMETERS][0, 0]) == direct.parameters


def test_engine_triton_writes_a_repository_and_replaces_only_its_own(tiny_engine, tmp_path, capsys):
    repo, engine = tmp_path / "repo", Path(tiny_engine).resolve()
    assert triton.main([str(tiny_engine), "--out", str(repo), "--max-batch", "1", "--instances", "2"]) == 0
    model = repo / triton.DEFAULT_MODEL_NAME
    config = (model / triton.CONFIG).read_text()
    print(config)
    for expected in (f'string_value: "{engine}"', "max_batch_size: 1", "count: 2", "dynamic_batching"):
        assert expected in config
    assert (model / triton.VERSION / triton.MODEL_FILE).read_bytes() == triton.TEMPLATE.read_bytes()
    assert triton.is_triton_repository(repo)
    assert stat.S_IMODE((model / triton.CONFIG).stat().st_mode) == 0o666 & ~current_umask()
    capsys.readouterr()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("not a repository")
    refused = [
        ([str(tiny_engine), "--out", str(repo)], str(repo)),  # exists, no --overwrite
        ([str(tiny_engine), "--out", str(mine), "--overwrite"], str(mine)),  # not one engine-triton wrote
        ([str(tmp_path), "--out", str(tmp_path / "r2")], str(tmp_path)),  # not an engine
        ([str(tiny_engine), "--out", str(tmp_path / "r3"), "--max-batch", "0"], "--max-batch 0"),
        ([str(tiny_engine), "--out", str(tmp_path / "r4"), "--model-name", "../up"], "'../up'"),
        ([str(tiny_engine), "--out", str(tiny_engine / "repo")], str(tiny_engine / "repo")),  # inside the engine
    ]
    errors = []
    for argv, named in refused:
        assert triton.main(argv) == 2
        errors.append(capsys.readouterr().err)
        assert errors[-1].count("\n") == 1 and named in errors[-1] and "Traceback" not in errors[-1]
    print("".join(errors), end="")  # after the last readouterr: shown with -s
    assert (mine / "keep.txt").read_text() == "not a repository"
    assert not (tiny_engine / "repo").exists()

    assert triton.main([str(tiny_engine), "--out", str(repo), "--overwrite", "--copy-engine"]) == 0
    assert f'string_value: "{triton.ENGINE_COPY}"' in (model / triton.CONFIG).read_text()
    copied = triton.engine_path({triton.ENGINE_PARAMETER: triton.ENGINE_COPY}, model)
    assert read_manifest(copied).build == read_manifest(engine).build
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary debris left
