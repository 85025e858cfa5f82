"""A real Slurm for the tests in this directory: started once per session (tests/slurm/start_slurm.sh does the same
from a shell), stopped at the end by the PIDs it wrote. Its config, state, logs and munge socket live in a scratch
directory this fixture owns; SLURM_CONF points there for every Slurm command the tests run."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.slurm import local_slurm


def unavailable_reason():
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root: starts munged, slurmctld and slurmd on this machine"
    installed = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "munged"))
    if not installed and not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get to install them (Debian/Ubuntu only)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """(root, env): env has SLURM_CONF set; the cluster has nodes n1 and n2 (8 CPUs each) in partition debug."""
    reason = unavailable_reason()
    if reason and os.environ.get("FTL_REQUIRE_SLURM") == "1":
        pytest.fail(f"FTL_REQUIRE_SLURM=1 (set by .ci/run) but no local Slurm can start: {reason}")
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    # Not under pytest's tmp: munged (user munge) must be able to reach its socket directory.
    root = Path(tempfile.mkdtemp(prefix="ftl-slurm-"))
    try:
        conf = local_slurm.start(root)
    except local_slurm.SlurmUnavailable as error:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted((root / "log").glob("*.log")))
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start the local Slurm: {error}\n{logs}")
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        yield root, env
    finally:
        local_slurm.stop(root)
        if os.environ.get("FTL_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)
