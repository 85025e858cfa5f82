"""Imported first by the tests' launch forkserver (tests/launch_server.py), before torch: the launcher's one OpenMP
thread (finetune_launcher.launch.forked.compute_single_threaded), the curves' display-less backend, and Python
tracebacks on SIGABRT in every launch and rank (a launch that times out is asked where it hangs before it is killed)."""
import faulthandler
import os

from finetune_launcher.launch.forked import compute_single_threaded

compute_single_threaded()
os.environ.setdefault("MPLBACKEND", "Agg")
faulthandler.enable()
