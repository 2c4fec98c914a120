"""Every foreseeable bad input to the CLIs: exit status 2, one line on stderr naming the value, no
traceback, nothing written and nothing deleted (the working folder is compared before and after)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_engine.engine.manifest import MANIFEST
from tests.test_reliability import user_folder

PROMPT = ["--prompt", "a red circle"]


@pytest.fixture(scope="module")
def engines(tiny_engine, tmp_path_factory) -> dict[str, Path]:
    """The tiny engine, a copy whose scheduler has steps_offset 1 (leading DDIM then ends at 999 steps),
    one with a truncated UNet graph, and same-size garbage in place of the step graph and of tokenizer.json
    (sizes match, so only loading them finds it)."""
    root = tmp_path_factory.mktemp("cli-engines")
    out = {"engine": tiny_engine}
    for name in ("offset", "truncated", "step", "tokenizer", "old"):
        out[name] = root / name
        shutil.copytree(tiny_engine, out[name])
    manifest = json.loads((out["offset"] / MANIFEST).read_text())
    manifest["scheduler_config"].update({"_class_name": "DDIMScheduler", "steps_offset": 1, "timestep_spacing": "leading"})
    (out["offset"] / MANIFEST).write_text(json.dumps(manifest))
    old = json.loads((out["old"] / MANIFEST).read_text())
    del old["components"]["vae_encoder"]  # exported before image requests
    (out["old"] / MANIFEST).write_text(json.dumps(old))
    unet = out["truncated"] / "unet.fp32.onnx"
    unet.write_bytes(unet.read_bytes()[:4096])
    for name, file in (("step", "step.onnx"), ("tokenizer", "tokenizer.json")):
        path = out[name] / file
        path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
    return out


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under root (hidden ones too): files with their bytes, folders as None."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def workspace(root: Path) -> dict[str, Path]:
    """A user's folder of files, a regular file, an empty folder and a read-only folder."""
    mine = user_folder(root)
    (root / "afile").write_text("not a folder")
    (root / "picture.png").mkdir()  # a folder with a file's name
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    Image.new("RGB", (256, 256), (200, 30, 30)).save(root / "in.png")
    Image.new("RGBA", (256, 256)).save(root / "alpha.png")
    return {"mine": mine, "afile": root / "afile", "png_folder": root / "picture.png", "readonly": readonly,
            "picture": root / "in.png", "rgba": root / "alpha.png"}


def without(module: str):
    """find_spec that does not find `module` (a base install without the [export] extra)."""
    real = importlib.util.find_spec
    return lambda name, *a, **k: None if name == module else real(name, *a, **k)


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
HAS_ORT_GPU = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None

CASES = [
    # engine-export
    pytest.param("export", ["{tmp}/nowhere", "--out", "{tmp}/e"], "{tmp}/nowhere: no such file or folder", id="export-missing-source"),
    pytest.param("export", ["{mine}", "--out", "{tmp}/e"], "is not a diffusers checkpoint", id="export-not-a-checkpoint"),
    pytest.param("export", ["{ckpt}", "--out", "{engine}"], "already exists; choose another --out or pass --overwrite", id="export-out-exists"),
    pytest.param("export", ["{ckpt}", "--out", "{mine}", "--overwrite"], "is not an engine directory written by this tool", id="export-overwrite-user-folder"),
    pytest.param("export", ["{ckpt}", "--out", "{ckpt}", "--overwrite"], "is the source", id="export-out-is-source"),
    pytest.param("export", ["{ckpt}", "--out", "{afile}/e"], "is a file, not a folder", id="export-out-under-a-file"),
    pytest.param("export", ["{ckpt}", "--out", "{readonly}/e"], "cannot write in", id="export-out-read-only", marks=NOT_ROOT),
    pytest.param("export", ["{ckpt}", "--out", "{tmp}/e", "--min-size", "0"], "min-size", id="export-min-size-0"),
    pytest.param("export", ["{ckpt}", "--out", "{tmp}/e"], "pip install 'diffusion-engine[export]'", id="export-base-install (no torch)"),
    # engine-tiny
    pytest.param("tiny", ["{mine}"], "is not a tiny checkpoint written by engine-tiny", id="tiny-user-folder"),
    pytest.param("tiny", ["{mine}", "--overwrite"], "is not a tiny checkpoint written by this tool", id="tiny-overwrite-user-folder"),
    pytest.param("tiny", ["{tmp}/t"], "pip install 'diffusion-engine[export]'", id="tiny-base-install (no torch)"),
    # engine-run
    pytest.param("run", ["--engine", "{engine}", "--height", "0"], "height 0 is not a size this engine takes: a multiple of 16 from 256 to 384", id="run-height-0"),
    pytest.param("run", ["--engine", "{engine}", "--width", "0"], "width 0 is not a size this engine takes", id="run-width-0"),
    pytest.param("run", ["--engine", "{engine}", "--height", "65"], "height 65 is not a size this engine takes: a multiple of 16", id="run-height-65"),
    pytest.param("run", ["--engine", "{offset}", "--scheduler", "ddim", "--steps", "1000"], "steps 1000 is more than ddim takes on this engine: 1 to 999", id="run-ddim-1000"),
    pytest.param("run", ["--engine", "{engine}", "--scheduler", "heun", "--steps", "600"], "steps 600 is more than heun takes on this engine: 1 to 500", id="run-heun-600"),
    pytest.param("run", ["--engine", "{engine}", "--steps", "0"], "steps must be an integer >= 1, got 0", id="run-steps-0"),
    pytest.param("run", ["--engine", "{engine}", "--seed", "-2"], "seed must be an integer >= 0, or -1", id="run-seed-negative"),
    pytest.param("run", ["--engine", "{engine}", "--batch", "9"], "exceeds the engine's max batch 2", id="run-batch-too-big"),
    pytest.param("run", ["--engine", "{engine}", "--out", "{png_folder}"], "is a folder; give a file name", id="run-out-is-a-folder"),
    pytest.param("run", ["--engine", "{engine}", "--out", "{afile}/x.png"], "is a file, not a folder", id="run-out-under-a-file"),
    pytest.param("run", ["--engine", "{engine}", "--out", "{readonly}/x.png"], "cannot write in", id="run-out-read-only", marks=NOT_ROOT),
    pytest.param("run", ["--engine", "{engine}", "--out", "{tmp}/x.jpg"], "must end in .png", id="run-out-not-png"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{tmp}/nowhere.png"], "cannot be read as an image", id="run-image-missing"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{afile}"], "cannot be read as an image", id="run-image-not-an-image"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{picture}", "--strength", "0"], "strength must be a number in (0, 1]", id="run-strength-0"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{picture}", "--strength", "0.1", "--steps", "5"], "reruns no step", id="run-strength-leaves-no-step"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{picture}", "--height", "384"], "image is 256x256 but the request is 256x384", id="run-image-other-size"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{rgba}"], "image has an alpha channel (mode RGBA)", id="run-image-with-alpha"),
    pytest.param("run", ["--engine", "{old}", "--image", "{picture}"], "has no vae_encoder", id="run-image-on-an-old-engine"),
    pytest.param("run", ["--engine", "{engine}", "--mask", "{picture}"], "mask applies to an init image", id="run-mask-without-image"),
    pytest.param("run", ["--engine", "{engine}", "--image", "{picture}", "--mask", "{rgba}"], "mask has an alpha channel", id="run-mask-with-alpha"),
    pytest.param("run", ["--engine", "{tmp}/nowhere"], "no such engine directory", id="run-engine-missing"),
    pytest.param("run", ["--engine", "{mine}"], "is not an engine directory: it has no manifest.json", id="run-engine-user-folder"),
    pytest.param("run", ["--engine", "{truncated}"], "unet.fp32.onnx has 4,096 bytes", id="run-engine-truncated-unet"),
    pytest.param("run", ["--engine", "{step}"], "{step}/step.onnx cannot be loaded (", id="run-engine-random-step-graph"),
    pytest.param("run", ["--engine", "{tokenizer}"], "{tokenizer}/tokenizer.json cannot be loaded (", id="run-engine-garbage-tokenizer"),
    pytest.param("run", ["--engine", "{engine}", "--backend", "ort-cuda"], "pip install onnxruntime-gpu", id="run-ort-cuda-without-onnxruntime-gpu",
                 marks=pytest.mark.skipif(HAS_ORT_GPU, reason="onnxruntime-gpu is installed")),
    pytest.param("run", ["--engine", "{engine}", "--backend", "trt"], "pip install 'diffusion-engine[trt]'", id="run-trt-without-tensorrt",
                 marks=pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")),
    # engine-info
    pytest.param("info", ["{tmp}/nowhere"], "no such engine directory", id="info-missing"),
]


def cli(name: str):
    if name == "export":
        from diffusion_engine.export.cli import main
    elif name == "tiny":
        from diffusion_engine.train.tiny import main
    elif name == "run":
        from diffusion_engine.runtime.cli import main
    else:
        from diffusion_engine.engine.cli import info_main as main
    return main


@pytest.mark.parametrize("name,args,message", CASES)
def test_bad_input_is_one_clear_line_and_touches_nothing(name, args, message, tmp_path, engines, tiny_checkpoint,
                                                         capsys, monkeypatch, request):
    if "(no torch)" in request.node.callspec.id:
        monkeypatch.setattr(importlib.util, "find_spec", without("torch"))
    places = {**{k: str(v) for k, v in workspace(tmp_path).items()}, **{k: str(v) for k, v in engines.items()},
              "tmp": str(tmp_path), "ckpt": str(tiny_checkpoint)}
    argv = [a.format(**places) for a in args]
    if name == "run":
        argv = PROMPT + (["--out", str(tmp_path / "out.png")] if "--out" not in argv else []) + argv
    watched = [tmp_path, tiny_checkpoint, *engines.values()]
    before = [tree(p) for p in watched]
    code = cli(name)(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    print(f"exit {code}: {err.strip()}")
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"engine-{name}: error: ") and message.format(**places) in lines[0]
    assert [tree(p) for p in watched] == before


@pytest.mark.parametrize("case", ["missing-source", "out-exists"])
def test_export_refuses_bad_paths_before_importing_torch(case, tmp_path, tiny_checkpoint, tiny_engine):
    """The cheap checks run before the heavy imports: the error comes in about a second, not after 10."""
    source, out = {"missing-source": (tmp_path / "nowhere", tmp_path / "e"), "out-exists": (tiny_checkpoint, tiny_engine)}[case]
    code = (
        "import sys\nfrom diffusion_engine.export.cli import main\n"
        f"rc = main([{str(source)!r}, '--out', {str(out)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules)\n"
        "print(heavy); sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    print(r.stdout.strip(), r.stderr.strip())
    assert r.returncode == 2 and r.stdout.strip() == "[]" and r.stderr.count("\n") == 1
