"""The GPU layer against the real APIs, without a GPU: every cudart call, enum and field our CUDA layer uses
exists in cuda-python's runtime module with the arity we call it with; every TensorRT class, method, attribute,
keyword and enum member the backend and builder use is bound by the TensorRT 11 and 10 bindings wheels; the real
bindings without a driver give our one-line error. The names are collected from our source (tests/api_surface.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import api_surface as api

WHEELS = Path(os.environ.get("DIFFUSION_ENGINE_API_WHEELS", Path(sys.prefix) / "api-wheels"))
MISSING = f"not in {WHEELS}: `make install` downloads it (pip download failed there, or the venv predates it)"


def real_cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        pytest.skip("cuda-bindings is not installed (the [test] extra installs it): no cudart to check against")
    return runtime


def test_every_cudart_call_enum_and_field_exists_with_our_arity():
    rt = real_cudart()
    uses = api.collect_cuda(api.sources(api.CUDA_SOURCES))
    # The collector sees both users of cudart: the runtime's wrapper and the shared device query.
    assert {w.split(":")[0] for *_, w in uses.calls} == {"runtime/cuda.py", "engine/toolchain.py"}
    assert uses.chains and uses.unpacks and uses.fields
    assert api.check_cuda(uses, rt) == []


def test_cudart_checks_catch_planted_mistakes():
    rt = real_cudart()
    texts = api.sources(api.CUDA_SOURCES)
    cuda_py, toolchain = texts["runtime/cuda.py"], texts["engine/toolchain.py"]
    plants = {
        "a missing argument": ("src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle",
                               "src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice", "cudaMemcpyAsync"),
        "a wrong function": ("rt.cudaStreamCreateWithFlags(", "rt.cudaStreamCreateWithFlag(", "no cudaStreamCreateWithFlag"),
        "a wrong enum member": ("cudaStreamCaptureModeGlobal", "cudaStreamCaptureModeGlobl", "cudaStreamCaptureModeGlobl"),
        "a wrong constant": ("rt.cudaStreamNonBlocking", "rt.cudaStreamNonBlock", "cudaStreamNonBlock"),
    }
    for what, (old, new, named) in plants.items():
        assert old in cuda_py, what
        problems = api.check_cuda(api.collect_cuda({"runtime/cuda.py": cuda_py.replace(old, new, 1)}), rt)
        assert len(problems) == 1 and named in problems[0], (what, problems)
    for old, new, named in (("err, count = cudart.cudaGetDeviceCount()", "err, count, x = cudart.cudaGetDeviceCount()",
                             "cudaGetDeviceCount returns 2 values"), ("prop.major", "prop.majr", "has no attribute majr")):
        assert old in toolchain
        problems = api.check_cuda(api.collect_cuda({"engine/toolchain.py": toolchain.replace(old, new)}), rt)
        assert len(problems) == 1 and named in problems[0], (old, problems)


def test_cudart_calls_against_cuda_12_bindings(tmp_path):
    """The [trt] extra allows cuda-python 12 too: the same check with the CUDA 12 bindings wheel, in a subprocess."""
    wheels = sorted(WHEELS.glob("cuda_bindings-12.*.whl")) if WHEELS.is_dir() else []
    if not wheels:
        pytest.skip(f"the cuda-bindings 12 wheel is {MISSING}")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(tmp_path)
    code = ("import json; from cuda.bindings import runtime as rt, __version__ as v; from tests import api_surface as a; "
            "print(json.dumps([v, a.check_cuda(a.collect_cuda(a.sources(a.CUDA_SOURCES)), rt)]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(api.ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=api.ROOT, check=True)
    version, problems = json.loads(out.stdout.splitlines()[-1])
    assert version.startswith("12.") and problems == []


def test_no_driver_gives_our_one_line_error():
    """With the real bindings and no driver, our CUDA layer says which error and what to run instead, in one line."""
    rt = real_cudart()
    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("a CUDA driver and GPU are here: the no-driver error cannot be seen")
    from diffusion_engine.runtime import cuda

    name = rt.cudaGetErrorName(err)[1].decode()
    for make in (cuda.Stream, lambda: cuda.DeviceBuffer(16)):
        with pytest.raises(RuntimeError) as info:
            make()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"CUDA error {name}: ")
        assert rt.cudaGetErrorString(err)[1].decode() in message and message.endswith("use --backend ort-cpu")
    assert cuda.device_count() == 0
    from diffusion_engine.engine.toolchain import TrtUnavailable
    from diffusion_engine.runtime.trt_loader import cuda_device

    with pytest.raises(TrtUnavailable, match=f"no CUDA GPU is visible \\(cudaGetDeviceCount: {name}\\)"):
        cuda_device()


def bindings(major: int) -> api.Bindings:
    wheel = api.bindings_wheel(WHEELS, major)
    if wheel is None:
        pytest.skip(f"the tensorrt-cu12-bindings {major}.x wheel is {MISSING}")
    return api.read_bindings(wheel)


@pytest.mark.parametrize("major", [11, 10])
def test_every_tensorrt_name_we_use_is_bound(major):
    b = bindings(major)
    uses = api.collect_trt(api.sources(api.TRT_SOURCES))
    assert {u.where.split(":")[0] for u in uses} == set(api.TRT_SOURCES)
    assert b.version.startswith(f"{major}.") and len(b.names) > 1000
    assert api.check_trt(uses, b) == []


@pytest.mark.parametrize("major", [11, 10])
def test_tensorrt_checks_catch_planted_mistakes(major):
    b = bindings(major)
    texts = api.sources(api.TRT_SOURCES)
    plants = {  # file: (what we write, a wrong name in its place)
        "runtime/trt.py": ("self.context.execute_async_v3(", "self.context.execute_async_v4("),
        "runtime/trt_loader.py": ("runtime.deserialize_cuda_engine(", "runtime.deserialise_cuda_engine("),
        "engine/trt_build.py": ("trt.MemoryPoolType.WORKSPACE", "trt.MemoryPoolType.WORK_SPACE"),
        "engine/toolchain.py": ("def log(self, severity", "def log_message(self, severity"),
    }
    for path, (old, new) in plants.items():
        assert old in texts[path], old
        problems = api.check_trt(api.collect_trt({**texts, path: texts[path].replace(old, new)}), b)
        wrong = new.split(".")[-1].split("(")[0].replace("def ", "")
        assert len(problems) == 1 and f"binds no {wrong} " in problems[0], (new, problems)


def test_weak_typing_is_gone_in_tensorrt_11():
    """BuilderFlag.FP16 exists in 10 and not in 11: our builder sets it only where STRONGLY_TYPED is missing;
    without that test the checker reports it on 11 only."""
    b11, b10 = bindings(11), bindings(10)
    text = api.sources(("engine/trt_build.py",))["engine/trt_build.py"]
    old = "    if not tc.strongly_typed and precision == \"fp16\":\n"
    assert old in text
    unguarded = api.collect_trt({"engine/trt_build.py": text.replace(old, "    if precision == \"fp16\":\n")})
    assert [p.split(": ", 1)[1] for p in api.check_trt(unguarded, b11)] == [f"TensorRT {b11.version} binds no FP16 (BuilderFlag)"]
    assert api.check_trt(unguarded, b10) == []
