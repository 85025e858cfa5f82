"""`pip install .` gives a user the commands: the package built as a wheel and installed into a fresh virtual
environment (its heavy dependencies -- torch, transformers, DeepSpeed, ... -- taken from the test's own environment
through a .pth file, nothing of the repository on its path), then `ftl` run from another directory that holds a
user's own train.py: it trains the embedded default (its config and data found under <prefix>/share/finetune-launcher/)
and leaves its outputs in that directory."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, holding_machine, read_history

pytestmark = pytest.mark.slow

USERS_TRAIN_PY = "raise SystemExit(\"the user's own train.py was run instead of finetune-launcher\")\n"


def source_tree(destination):
    """The working tree's files as git sees them (tracked, and untracked unless ignored): what a clone plus the
    change under test holds, without build products or caches."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


def fresh_venv(path):
    """A new virtual environment whose site-packages sees this interpreter's packages after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dependencies = dict.fromkeys(sysconfig.get_paths()[kind] for kind in ("purelib", "platlib"))
    Path(own, "test_dependencies.pth").write_text("".join(f"import site; site.addsitedir({path!r})\n"
                                                          for path in dependencies))
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin directory, its python) with finetune-launcher installed from a wheel of the working tree."""
    root = tmp_path_factory.mktemp("install")
    source = source_tree(root / "source")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    python = fresh_venv(root / "venv")
    wheel, = wheels.glob("finetune_launcher-*.whl")
    # --ignore-installed: the test environment seen through the .pth may hold an editable install of the package
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, capture_output=True)
    return python.parent, python


def user_env():
    """The user's environment: nothing of the repository on the Python path; the tests' model cache and compiled
    DeepSpeed ops, so that nothing is built twice."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FTL_PYTHON")}
    env.setdefault("FTL_CACHE_DIR", str(REPO / ".cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    _, python = installed
    where = subprocess.run([str(python), "-c", "import finetune_launcher; print(finetune_launcher.__file__)"],
                           cwd=tmp_path, env=user_env(), capture_output=True, text=True, check=True).stdout
    assert str(REPO) not in where and "site-packages" in where, where


def test_ftl_lists_its_commands(installed, tmp_path):
    bin_dir, _ = installed
    for command in ("ftl", "finetune-launcher"):
        proc = subprocess.run([str(bin_dir / command), "--help"], cwd=tmp_path, env=user_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        for name in ("train", "estimate", "evaluate", "generate", "merge", "plot", "submit", "generate-images"):
            assert f"\n  {name} " in proc.stdout, proc.stdout


def test_ftl_trains_the_embedded_default_from_a_directory_with_a_users_train_py(installed, tiny_model_path,
                                                                                   tmp_path):
    """Faults 7.12 and 7.13: the embedded default's config and data come from <prefix>/share/finetune-launcher/, and
    a train.py in the working directory is not imported in place of the package."""
    bin_dir, _ = installed
    (tmp_path / "train.py").write_text(USERS_TRAIN_PY)
    with holding_machine():
        proc = subprocess.run([str(bin_dir / "ftl"), "train", "--mode", "lora", "--max_steps", "2"],
                              cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    history = read_history(tmp_path / "outputs" / "tiny_lora")
    assert history["status"] == "completed" and history["records"][-1]["step"] == 2
    assert (tmp_path / "outputs" / "tiny_lora" / "final" / "adapter_model.safetensors").is_file()
