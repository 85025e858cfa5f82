"""Files the package reads from the repository (DeepSpeed configs, the Slurm job script, the embedded configs and
data), found the same way from a checkout and from an installed package (setup.cfg installs them under
<prefix>/share/finetune-launcher/)."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHARE_NAME = Path("share") / "finetune-launcher"


class MissingResource(FileNotFoundError):
    """A file the package ships is not where a checkout or an installation keeps it."""


def search_roots():
    """The checkout (the package's parent), then every <prefix>/share/finetune-launcher above the package."""
    roots = [PACKAGE_DIR.parent]
    roots += [parent / SHARE_NAME for parent in PACKAGE_DIR.parents]
    return roots


def resource(relative):
    """Path of a shipped file such as `ds_configs/zero3.json`; MissingResource lists where it was looked for."""
    tried = []
    for root in search_roots():
        candidate = root / relative
        if candidate.exists():
            return candidate
        tried.append(str(candidate))
    raise MissingResource(f"{relative} is not where finetune-launcher keeps it; looked in: {', '.join(tried[:3])}. "
                          f"Run from a checkout of the repository or reinstall the package (pip install .)")


def repo_root():
    """The directory that holds ds_configs/ (the checkout, or the installed share directory)."""
    return resource("ds_configs").parent
