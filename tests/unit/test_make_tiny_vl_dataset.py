"""data/make_tiny_vl_dataset.py regenerates the shipped tiny VL dataset byte for byte, and keeps it small."""
import subprocess
import sys

from tests.conftest import REPO

SHIPPED = REPO / "data" / "tiny_vl"


def files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_regenerates_the_shipped_files_byte_identically(tmp_path):
    out = tmp_path / "nested" / "tiny_vl"
    proc = subprocess.run([sys.executable, str(REPO / "data" / "make_tiny_vl_dataset.py"), "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert files(out) == files(SHIPPED)
    different = [str(p) for p in files(out) if (out / p).read_bytes() != (SHIPPED / p).read_bytes()]
    assert not different, f"regenerated files differ from the shipped ones: {different[:5]}"


def test_shipped_dataset_is_small():
    assert sum((SHIPPED / p).stat().st_size for p in files(SHIPPED)) < 2 * 2**20
