"""Atomic file and directory writes: a crash or kill leaves either the old or the new version, never half."""
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_dir(tmp_dir, final_dir):
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


def fresh_tmp_dir(final_dir):
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".tmp-{final_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp
