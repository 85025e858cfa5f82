"""Launch-to-first-step time on this machine: wall seconds from starting `bash launch/train_lora.sh` until the run's
training_history.json records step 1 (the launcher's checks, the data preparation, the ranks' start, the model
load, the step-0 eval and the first step), for the embedded default and for a generated instruction file of N
examples. A benchmark, not a test: it prints the figures and writes JSON.

    python bench/launch_to_first_step.py --examples 50000 --repeats 2 --json out.json [--repo DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(REPO), help="the checkout whose launcher is timed")
    p.add_argument("--examples", type=int, default=50000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    return p.parse_args()


def big_instruction_file(repo, n, out_dir):
    path = Path(out_dir) / f"instruct_{n}.jsonl"
    if not path.exists():
        subprocess.run([sys.executable, str(Path(repo) / "data" / "make_tiny_dataset.py"), "--out-dir", str(out_dir),
                        "--n", str(n)], check=True, capture_output=True)
        (Path(out_dir) / "tiny_instruct.jsonl").rename(path)
    return path


def time_to_first_step(repo, extra, work):
    """Seconds until step 1 is in the history; the run is then killed (its process group)."""
    run_dir = Path(work) / f"run{time.time_ns()}"
    history = run_dir / "r" / "training_history.json"
    cmd = ["bash", str(Path(repo) / "launch" / "train_lora.sh"), "--output_dir", str(run_dir), "--run_name", "r",
           "--no-preflight", "--max_steps", "20", "--eval_steps", "1000", "--save_steps", "1000", *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while proc.poll() is None:
            if history.exists() and '"step": 1,' in history.read_text(errors="replace"):
                return time.time() - t0
            time.sleep(0.05)
        raise RuntimeError(f"the run ended (exit {proc.returncode}) before step 1: {proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="ftl-first-step-") as work:
        data = big_instruction_file(args.repo, args.examples, work)
        cases = {"default run (configs/tiny_lora.yaml)": [],
                 f"{args.examples} instruction examples": ["--dataset", str(data)]}
        results = {}
        for name, extra in cases.items():
            times = [time_to_first_step(args.repo, extra, work) for _ in range(args.repeats)]
            results[name] = {"seconds": [round(t, 2) for t in times], "min": round(min(times), 2)}
            print(f"{name}: launch to first step {min(times):.1f} s (runs: {', '.join(f'{t:.1f}' for t in times)})",
                  flush=True)
    out = {"repo": args.repo, "commit": subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"],
                                                       capture_output=True, text=True).stdout.strip(),
           "cpus": os.cpu_count(), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
