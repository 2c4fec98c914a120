"""Nothing a user owns is destroyed, interrupted writers leave nothing behind; engine files honour the umask and
carry checksums; manifests ignore unknown fields; CPU runs are quiet."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from diffusion_engine.engine.atomic import atomic_directory, current_umask, remove_stale, write_atomic
from diffusion_engine.engine.manifest import MANIFEST, check_engine_out, is_engine_directory, read_manifest


def user_folder(root: Path) -> Path:
    """A folder of someone's files, which no tool of ours may delete."""
    folder = root / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("four years of work")
    (folder / "sub" / "data.csv").write_text("1,2,3\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_overwrite_refuses_a_user_folder(tmp_path, tiny_checkpoint, capsys):
    from diffusion_engine.export.cli import main

    folder = user_folder(tmp_path)
    before = snapshot(folder)
    assert main([str(tiny_checkpoint), "--out", str(folder), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert err.count("\n") == 0 and "is not an engine directory written by this tool" in err
    assert snapshot(folder) == before and hidden_debris(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_export_out_may_not_overlap_the_source(tmp_path, tiny_checkpoint, capsys, where):
    from diffusion_engine.export.cli import main

    source = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, source)
    out = {"same": source, "inside": source / "engine", "around": tmp_path}[where]
    before = snapshot(source)
    assert main([str(source), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is the source" in err and "Traceback" not in err
    assert snapshot(source) == before and not (source / "engine").exists()


def test_check_output_dir_rules(tmp_path, tiny_engine):
    check_engine_out(tmp_path / "new", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_engine_out(empty, overwrite=True)
    check_engine_out(tiny_engine, overwrite=True)  # an engine directory we wrote
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_engine_out(tiny_engine, overwrite=False)
    regular = tmp_path / "file.bin"
    regular.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="is not an engine directory"):
        check_engine_out(regular, overwrite=True)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text("{}")  # a manifest.json that is not ours
    with pytest.raises(FileExistsError, match="is not an engine directory"):
        check_engine_out(fake, overwrite=True)


def test_atomic_directory_replaces_only_what_it_may_and_leaves_no_debris(tmp_path):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(FileExistsError):
        with atomic_directory(folder, overwrite=True, replaceable=is_engine_directory):
            raise AssertionError("must not start")
    assert snapshot(folder) == before
    engine = tmp_path / "engine"
    for text in ("first", "second"):
        with atomic_directory(engine, overwrite=True, replaceable=is_engine_directory) as tmp:
            (tmp / MANIFEST).write_text(json.dumps({"format_version": 1, "components": {}}))
            (tmp / "payload").write_text(text)
    assert (engine / "payload").read_text() == "second"
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "failed") as tmp:
            raise RuntimeError("export failed")
    assert hidden_debris(tmp_path) == [] and not (tmp_path / "failed").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_directory(tmp_path / "engine") as tmp:
            write_atomic(tmp / MANIFEST, "{}")
        folder_mode = stat.S_IMODE((tmp_path / "engine").stat().st_mode)
        file_mode = stat.S_IMODE((tmp_path / "engine" / MANIFEST).stat().st_mode)
    finally:
        os.umask(old)
    print(f"umask {umask:03o}: folder {folder_mode:03o}, file {file_mode:03o}")
    assert folder_mode == 0o777 & ~umask and file_mode == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_a_library_wrote_0600_honour_the_umask(tmp_path, umask):
    """safetensors' save (under diffusers' and transformers' save_pretrained) leaves its files 0600."""
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            (tmp / "unet").mkdir()
            fd, name = tempfile.mkstemp(dir=tmp / "unet")  # 0600, whatever the umask
            os.close(fd)
            os.replace(name, tmp / "unet" / "weights.safetensors")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "checkpoint").rglob("*")}
    finally:
        os.umask(old)
    print(f"umask {umask:03o}: {', '.join(f'{k} {v:03o}' for k, v in sorted(modes.items()))}")
    assert modes == {"unet": 0o777 & ~umask, "weights.safetensors": 0o666 & ~umask}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_external_weights_file_honours_the_umask(tmp_path, monkeypatch, umask):
    """Graphs above the external-data size keep their weights in <name>.data, which onnx creates 0600."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from diffusion_engine.export import components

    monkeypatch.setattr(components, "EXTERNAL_DATA_BYTES", 1024)
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    old = os.umask(umask)
    try:
        components.save_model(helper.make_model(graph), tmp_path / "g.onnx")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    print(f"umask {umask:03o}: {modes}")
    assert modes == {"g.onnx": 0o666 & ~umask, "g.onnx.data": 0o666 & ~umask}
    assert onnx.load(str(tmp_path / "g.onnx")).graph.initializer[0].dims == [64, 64]


def test_exported_engine_and_png_are_readable_by_others(tiny_engine, tmp_path):
    """The session's engine was exported under this process's umask: every entry must follow it."""
    from diffusion_engine.runtime.cli import main

    umask = current_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tiny_engine, *tiny_engine.iterdir()]}
    expected = {name: (0o777 if name == tiny_engine.name else 0o666) & ~umask for name in modes}
    print({k: f"{v:03o}" for k, v in modes.items()})
    assert {k: v & 0o666 for k, v in modes.items()} == {k: v & 0o666 for k, v in expected.items()}
    assert modes[tiny_engine.name] == 0o777 & ~umask
    out = tmp_path / "img.png"
    assert main(["--engine", str(tiny_engine), "--prompt", "a red circle", "--steps", "1", "--height", "256",
                 "--width", "256", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root to switch to it")
def test_another_user_can_read_the_engine(tiny_engine, tmp_path_factory):
    """Copied with its modes into a folder anyone may enter, every file reads as user nobody (65534)."""
    shared = Path(tempfile.mkdtemp(prefix="shared-engine-"))
    try:
        shared.chmod(0o755)
        copy = shared / "engine"
        shutil.copytree(tiny_engine, copy)  # copy2: modes as exported
        code = "import pathlib, sys; print(sum(len(p.read_bytes()) for p in pathlib.Path(sys.argv[1]).iterdir()))"
        r = subprocess.run(["/usr/bin/python3", "-c", code, str(copy)], capture_output=True, text=True, timeout=60,
                           preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
        print(r.stdout.strip(), "bytes read as nobody", r.stderr.strip()[-300:])
        assert r.returncode == 0 and int(r.stdout) == sum(p.stat().st_size for p in copy.iterdir())
    finally:
        shutil.rmtree(shared)


def test_manifest_readers_ignore_unknown_fields(tiny_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    d = json.loads((copy / MANIFEST).read_text())
    d["added_by_a_later_export"] = {"x": 1}
    d["dims"]["future_dim"] = 3
    d["build"]["future_range"] = [1, 2]
    d["components"]["unet"]["future_note"] = "ignored"
    (copy / MANIFEST).write_text(json.dumps(d))
    m = read_manifest(copy)
    assert m.dims == read_manifest(tiny_engine).dims and m.components["unet"].files == d["components"]["unet"]["files"]


def test_engine_tiny_never_replaces_what_it_did_not_write(tmp_path, tiny_checkpoint, capsys):
    from diffusion_engine.train.tiny import main

    folder = user_folder(tmp_path)
    before = snapshot(folder)
    assert main([str(folder), "--overwrite"]) == 2
    assert "is not a tiny checkpoint written by this tool" in capsys.readouterr().err
    assert main([str(folder)]) == 2
    assert "is not a tiny checkpoint written by engine-tiny" in capsys.readouterr().err
    assert snapshot(folder) == before
    ckpt_before = snapshot(tiny_checkpoint)
    assert main([str(tiny_checkpoint), "--family", "sdxl", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    print(err.strip())
    assert "holds another tiny checkpoint (family sd1, seed 0), not family sdxl, seed 5" in err
    assert snapshot(tiny_checkpoint) == ckpt_before and hidden_debris(tiny_checkpoint.parent) == []


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_sigterm_mid_export_cleans_up_and_exits_143(tmp_path, tiny_checkpoint):
    """A real export, terminated once its temporary folder exists: exit 143, nothing left behind."""
    out = tmp_path / "engine"
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_engine.export.cli", str(tiny_checkpoint), "--out", str(out),
                             "--min-size", "256", "--max-size", "256", "--max-batch", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".engine.partial-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before writing anything"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    print(err.strip().splitlines()[-1])
    assert proc.returncode == 143 and "engine-export: terminated; partial output removed" in err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_debris_of_dead_writers_is_removed_and_a_moved_aside_engine_restored(tmp_path):
    target = tmp_path / "engine"
    dead, live = dead_pid(), os.getpid()
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".engine.partial-{host}-{dead}-abc"
    running = tmp_path / f".engine.partial-{host}-{live}-def"  # a writer still at work: kept
    aside = tmp_path / f".engine.old-{host}-{dead}-ghi"  # killed between the two renames of --overwrite
    for folder in (stale, running, aside / "engine"):
        folder.mkdir(parents=True)
    (aside / "engine" / MANIFEST).write_text(json.dumps({"format_version": 1, "components": {}}))
    other = tmp_path / f".engineX.partial-{host}-{dead}-jkl"  # another target's: not ours to touch
    other.mkdir()
    removed = remove_stale(target)
    print([p.name for p in removed])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "engine"])
    assert is_engine_directory(target)
    with atomic_directory(target, overwrite=True, replaceable=is_engine_directory) as tmp:  # the writer removes them too
        (tmp / MANIFEST).write_text(json.dumps({"format_version": 1, "components": {}}))
    assert running.exists()


def test_engine_info_verify_finds_changed_bytes_of_the_same_size(tiny_engine, tmp_path, capsys):
    from diffusion_engine.engine.cli import info_main

    manifest = read_manifest(tiny_engine)
    listed = set(manifest.checksums)
    files = {p.name for p in tiny_engine.iterdir() if p.is_file() and p.name != MANIFEST}
    print(f"{len(listed)} files recorded")
    assert listed == files and all(v["sha256"].startswith("sha256:") for v in manifest.checksums.values())
    assert info_main([str(tiny_engine), "--verify"]) == 0
    assert f"all {len(listed)} files have the size and sha256 the export recorded" in capsys.readouterr().out
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    unet = bytearray((copy / "unet.fp32.onnx").read_bytes())
    unet[-100] ^= 0xFF  # one weight byte: the graph still loads, the size is the same
    (copy / "unet.fp32.onnx").write_bytes(bytes(unet))
    (copy / "step.onnx").write_bytes(b"")
    assert info_main([str(copy), "--verify"]) == 1
    out = capsys.readouterr().out
    print(out.strip().splitlines()[-3:])
    assert "DAMAGED: unet.fp32.onnx has other contents than the export wrote" in out
    assert "DAMAGED: step.onnx has 0 bytes" in out and f"2 of {len(listed)} files differ" in out


def test_cpu_run_is_quiet_without_verbose(tiny_engine, tmp_path, capfd, caplog):
    """No backend-choice INFO line, no empty `0step` bar; with -v the choice is one short line."""
    from diffusion_engine.runtime.cli import main

    args = ["--engine", str(tiny_engine), "--prompt", "a red circle", "--steps", "2", "--height", "256",
            "--width", "256", "--out", str(tmp_path / "a.png")]
    with caplog.at_level(logging.DEBUG, logger="diffusion_engine"):
        assert main(args) == 0
        err = capfd.readouterr().err
        print(repr(err[:200]))
        assert "TensorRT" not in err and not err.lstrip("\r").startswith("0step") and "2/2" in err
        assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
        assert main(args + ["-v"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backend ort-cpu (auto")]
    print(lines)
    assert len(lines) == 1 and len(lines[0]) < 200  # only with -v
