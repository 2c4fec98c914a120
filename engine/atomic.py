"""Writing files and folders atomically, safely and under the umask; stale debris; SIGTERM as Ctrl-C.

Every writer of this project goes through these: a folder is built under a hidden sibling
`.NAME.partial-PID-*` and renamed into place; a file is written under a hidden temporary name and
renamed. Nothing but an empty folder or one `replaceable` accepts is ever replaced. Stdlib only.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

PARTIAL, OLD = "partial", "old"  # the two kinds of hidden sibling a folder write makes
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as shells report them


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(target: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None,
                     replaceable: Callable[[Path], bool] = lambda path: False, what: str = "an output folder") -> None:
    """Raise (before any work) unless target may be written: absent, or with overwrite an empty folder or
    one `replaceable` accepts (a folder this tool wrote); never the source, inside it or around it."""
    out = Path(target).expanduser().resolve()
    if source is not None and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"--out {target} is the source {source}, inside it or contains it; choose another folder")
    if not os.path.lexists(out):
        _check_can_create(f"--out {target}", out)
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; choose another --out or pass --overwrite")
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or replaceable(out)):
        _check_can_create(f"--out {target}", out)  # the replacement is made beside it
        return
    raise FileExistsError(
        f"{target} exists and is not {what} written by this tool (nor an empty folder); "
        "--overwrite replaces only those: choose another --out"
    )


def check_output_file(path: str | os.PathLike) -> None:
    """Raise unless a file can be written at path: not a folder, in a folder that exists or can be made, writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    _check_can_create(str(path), path.resolve())


def _check_can_create(label: str, path: Path) -> None:
    """Raise unless an entry can be made beside path: its nearest existing ancestor is a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{label}: {parent} is a file, not a folder")
    if not _writable(parent):
        raise PermissionError(f"{label}: cannot write in {parent}; choose a writable folder")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in folder (tried, not guessed: root ignores modes, read-only mounts do not)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@contextmanager
def atomic_directory(
    target: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None,
    replaceable: Callable[[Path], bool] = lambda path: False, what: str = "an output folder",
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to target, on failure (or SIGTERM) delete it.

    With overwrite, only an empty folder or one `replaceable` accepts (check_output_dir) is replaced.
    Debris of earlier writers to target that were killed is removed first (remove_stale).
    The folder and everything in it get the permissions the umask gives (mkdtemp alone makes it 0700;
    libraries that write through mkstemp, as safetensors' save does, leave files 0600).
    """
    check_output_dir(target, overwrite, source, replaceable, what)
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_ours(target, PARTIAL), dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        umask_permissions(tmp)
        if target.exists():
            aside_temp = Path(tempfile.mkdtemp(prefix=_ours(target, OLD), dir=target.parent))
            os.replace(target, aside_temp / target.name)
            os.replace(tmp, target)
            shutil.rmtree(aside_temp, ignore_errors=True)  # only what we just moved aside: the replaced folder
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder
        raise


def umask_permissions(folder: Path) -> None:
    """Give every folder and file under `folder` the permissions the umask gives (files keep execute bits)."""
    umask = current_umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        wanted = 0o777 if path.is_dir() or mode & 0o111 else 0o666
        os.chmod(path, wanted & ~umask)


def _kind_prefix(target: Path, kind: str) -> str:
    """`.NAME.KIND-HOST-`: the start of the hidden siblings of one kind that writers on this host make."""
    return f".{target.name}.{kind}-{socket.gethostname().replace('-', '_') or 'host'}-"


def _ours(target: Path, kind: str) -> str:
    """`.NAME.KIND-HOST-PID-`: a hidden sibling named by the process that makes it, so a later run knows it is stale."""
    return f"{_kind_prefix(target, kind)}{os.getpid()}-"


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the hidden siblings of target left by writers on this host that died (kill -9, power loss).

    A `.partial-` folder of a dead process is deleted; an `.old-` one holds the folder it was
    replacing: it is put back if target is missing, else deleted. Live processes' folders are kept.
    """
    target = Path(target)
    removed = []
    for kind in (OLD, PARTIAL):  # old first: a restored folder makes later partials plain debris
        prefix = _kind_prefix(target, kind)
        for stale_temp in sorted(target.parent.glob(f"{prefix}*-*")):
            pid = stale_temp.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)) or not stale_temp.is_dir():
                continue
            if kind == OLD and not target.exists() and (stale_temp / target.name).is_dir():
                os.replace(stale_temp / target.name, target)
                logger.warning("restored %s, which an interrupted --overwrite had moved aside", target)
            shutil.rmtree(stale_temp, ignore_errors=True)  # a temporary folder of ours whose writer died
            removed.append(stale_temp)
            logger.info("removed %s, left by an interrupted run (process %s)", stale_temp, pid)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_atomic(path: str | os.PathLike, data: bytes | str | None = None,
                 writer: Callable[[Path], None] | None = None) -> None:
    """Write a file under a temporary name (data, or writer(tmp_path)), then rename it into place.

    The file gets the permissions the umask gives (mkstemp alone makes it 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if writer is None:
                fh.write(data.encode() if isinstance(data, str) else data)
        if writer is not None:
            writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so `finally` blocks and atomic writers clean up."""


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated (as Ctrl-C raises KeyboardInterrupt); the old handler comes back after."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run a CLI body with SIGTERM handled like Ctrl-C: temporary files removed, one line, exit 143 (130 for Ctrl-C)."""
    try:
        with sigterm_as_exception():
            return main()
    except Terminated:
        print(f"{prog}: terminated; partial output removed", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; partial output removed", file=sys.stderr)
        return EXIT_INTERRUPTED
