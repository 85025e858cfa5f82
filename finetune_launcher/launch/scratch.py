"""The launch's scratch directory: the resolved run config every rank reads, the pre-flight's figures and the file
the ranks write their exit code to. It lives while the launcher does; a launcher killed outright (`kill -9`, the
out-of-memory killer) cannot remove it, so its name carries the launcher's pid and every later launch on the
machine removes the scratch directories of launchers that are gone."""
import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "ftl-launch-"
NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


@contextlib.contextmanager
def launch_scratch_dir():
    """A fresh directory `ftl-launch-<pid>-XXXX` in the system's temporary directory, removed on the way out; the
    orphans of earlier, killed launchers are removed first."""
    remove_orphaned_scratch()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_orphaned_scratch(root=None):
    """Remove this user's scratch directories whose launcher process no longer exists."""
    root = Path(root or tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for entry in entries:
        match = NAME.match(entry.name)
        if match and owned_dir(entry) and not process_exists(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def owned_dir(path):
    try:
        return path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
    except OSError:
        return False


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
