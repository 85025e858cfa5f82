"""data/make_tiny_dataset.py, run as the README runs it."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_out_dir_is_created_with_its_parents(tmp_path):
    out = tmp_path / "held_out" / "nested" / "dir"
    proc = subprocess.run([sys.executable, str(REPO / "data" / "make_tiny_dataset.py"), "--out-dir", str(out),
                           "--n", "40", "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    instruct = [json.loads(line) for line in (out / "tiny_instruct.jsonl").read_text().splitlines()]
    assert len(instruct) == 40
    assert all(set(r) == {"instruction", "context", "response"} for r in instruct)
    assert (out / "tiny_chat.jsonl").read_text().strip() and (out / "tiny_text.jsonl").read_text().strip()
