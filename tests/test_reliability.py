"""Nothing a user owns is destroyed; engine files honour the umask; manifests ignore unknown fields."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from diffusion_engine.engine.manifest import (
    MANIFEST,
    atomic_directory,
    check_output_dir,
    current_umask,
    read_manifest,
    write_atomic,
)


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
    check_output_dir(tmp_path / "new", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_dir(empty, overwrite=True)
    check_output_dir(tiny_engine, overwrite=True)  # an engine directory we wrote
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output_dir(tiny_engine, overwrite=False)
    regular = tmp_path / "file.bin"
    regular.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="is not an engine directory"):
        check_output_dir(regular, overwrite=True)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text("{}")  # a manifest.json that is not ours
    with pytest.raises(FileExistsError, match="is not an engine directory"):
        check_output_dir(fake, overwrite=True)


def test_atomic_directory_replaces_only_what_it_may_and_leaves_no_debris(tmp_path):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(FileExistsError):
        with atomic_directory(folder, overwrite=True):
            raise AssertionError("must not start")
    assert snapshot(folder) == before
    engine = tmp_path / "engine"
    for text in ("first", "second"):
        with atomic_directory(engine, overwrite=True) as tmp:
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
    from diffusion_engine.export.tiny import main

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
