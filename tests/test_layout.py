"""Packaging: one diffusion_engine package, no bare top-level modules, a lean runtime, the short API path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_ONLY = ("triton_model.py",)  # imports triton_python_backend_utils, which only tritonserver provides
RUNTIME_MODULES = sorted(
    "diffusion_engine.runtime." + ".".join(p.relative_to(ROOT / "runtime").with_suffix("").parts)
    for p in (ROOT / "runtime").rglob("*.py")
    if p.name != "__init__.py" and p.name not in TRITON_ONLY
)


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_namespace_imports_outside_repo_root(tmp_path):
    ok = python("import diffusion_engine.export, diffusion_engine.engine, diffusion_engine.runtime", tmp_path)
    assert ok.returncode == 0, ok.stderr
    for bare in ("export", "engine", "runtime", "benchmarks"):
        r = python(f"import {bare}", tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, bare


def test_short_api_path_loads_the_runtime_on_first_use(tmp_path):
    """`from diffusion_engine import Pipeline`; importing the package or a subpackage loads no runtime module."""
    code = (
        "import sys, diffusion_engine, diffusion_engine.engine.specs\n"
        "assert not [m for m in sys.modules if m.startswith('diffusion_engine.runtime')], sorted(sys.modules)\n"
        "from diffusion_engine import GenerationRequest, GenerationResult, Pipeline\n"
        "import diffusion_engine.runtime.pipeline as p, diffusion_engine.runtime.request as r\n"
        "assert (Pipeline, GenerationResult, GenerationRequest) == (p.Pipeline, p.GenerationResult, r.GenerationRequest)\n"
        "assert sorted(diffusion_engine.__all__) == ['GenerationRequest', 'GenerationResult', 'Pipeline']\n"
        "try:\n    diffusion_engine.Pipe\nexcept AttributeError as e:\n    print(e)\nelse:\n    raise SystemExit('no error')\n"
    )
    r = python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "module 'diffusion_engine' has no attribute 'Pipe'" in r.stdout


def test_runtime_never_imports_torch_or_diffusers(tmp_path):
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in RUNTIME_MODULES)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        + "print(len(sys.modules)); assert not bad, bad\n"
    )
    assert RUNTIME_MODULES, "no runtime modules found"
    r = python(code, tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return next(out.glob("diffusion_engine-*.whl"))


def test_wheel_holds_only_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"diffusion_engine", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for module in ["export/exporter.py", "engine/manifest.py", "runtime/tokenizer.py", "runtime/samplers/plan.py"]:
        assert f"diffusion_engine/{module}" in names


def test_wheel_carries_the_demo_checkpoint(wheel):
    """engine-run without --engine needs every file of train/demo-checkpoint in a regular install."""
    checkpoint = ROOT / "train" / "demo-checkpoint"
    files = sorted(p.relative_to(ROOT / "train").as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert "demo-checkpoint/model_index.json" in files
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [f for f in files if f"diffusion_engine/train/{f}" not in names] == []


def test_regular_install_imports(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r})\n"
        "import diffusion_engine.runtime.samplers as s, diffusion_engine.engine.manifest as m\n"
        f"assert s.__file__.startswith({str(target)!r}), s.__file__\n"
        "print(s.SAMPLERS)\n"
        "from diffusion_engine import Pipeline\n"
        f"assert sys.modules[Pipeline.__module__].__file__.startswith({str(target)!r})\n"
    )
    r = python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (target / "export").exists() and not (target / "runtime").exists()
