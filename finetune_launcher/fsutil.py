"""Atomic file and directory writes: a crash or kill leaves either the old or the new version, never half."""
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status); elsewhere set and
    restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `path` through a temporary file in the same directory, renamed into place. The file gets the mode an
    ordinary open() would give it (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def apply_umask(directory: str | Path) -> None:
    """Give `directory` and everything in it the modes an ordinary open() / mkdir() would (0666 / 0777 less the
    umask). Some writers make private 0600 files (mkstemp; safetensors' save_file since 0.8), and the weights in
    best/, final/ or a merged model are meant to be shared like any other output."""
    mask = current_umask()
    directory = Path(directory)
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing any previous one."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(final_dir: str | Path) -> Path:
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".tmp-{final_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


@contextlib.contextmanager
def built_into(target: str | Path) -> Iterator[Path]:
    """`with built_into(target) as tmp:` write a directory into `tmp` (a sibling of `target`); on success it replaces
    `target` at once with shared modes (the umask's, not mkdtemp's private ones), on failure it is removed and
    `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
