"""Imported first by the tests' launch forkserver (tests/launch_server.py), before torch: the launcher's one OpenMP
thread (train.launch.forked.compute_single_threaded) and the curves' display-less backend."""
import os

from train.launch.forked import compute_single_threaded

compute_single_threaded()
os.environ.setdefault("MPLBACKEND", "Agg")
