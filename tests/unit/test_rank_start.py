"""A rank of a run that is not QLoRA starts without importing bitsandbytes (peft would import it, and it imports
torch._inductor: about 1.2 s per rank on a CPU core); a QLoRA rank keeps it."""
import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

from finetune_launcher.rank_imports import leave_out_bitsandbytes


@pytest.mark.parametrize("mode,left_out", [("lora", True), ("full", True), ("qlora", False)])
def test_bitsandbytes_looks_absent_outside_qlora(monkeypatch, mode, left_out):
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    leave_out_bitsandbytes(SimpleNamespace(mode=mode))
    # what peft's is_bnb_available and transformers' is_bitsandbytes_available ask
    assert (importlib.util.find_spec("bitsandbytes") is None) == left_out


def test_peft_loads_without_bitsandbytes_after_it_is_left_out():
    code = ("import sys; from types import SimpleNamespace; "
            "from finetune_launcher.rank_imports import leave_out_bitsandbytes; "
            "leave_out_bitsandbytes(SimpleNamespace(mode='lora')); import peft.tuners.lora; "
            "from peft.import_utils import is_bnb_available; "
            "assert not is_bnb_available() and sys.modules['bitsandbytes'] is None; "
            "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor came in anyway'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
