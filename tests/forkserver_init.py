"""Imported first by the tests' launch forkserver (tests/launch_server.py), before torch: the launcher's one
OpenMP thread (see train.launch.forked.compute_single_threaded) and the curves' display-less backend."""
import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
