"""Imported first by the tests' launch forkserver (tests/launch_server.py), before torch: the launcher's one OpenMP
thread (finetune_launcher.launch.forked.compute_single_threaded) and the curves' display-less backend."""
import os

from finetune_launcher.launch.forked import compute_single_threaded

compute_single_threaded()
os.environ.setdefault("MPLBACKEND", "Agg")
