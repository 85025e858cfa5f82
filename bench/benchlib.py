"""Shared by the GPU benchmark scripts (bench/gpu_matrix.py, bench/bench.py, bench/scaling.py, bench/big_runs.py): a
synthetic corpus that fills every row, the models built before the cases, running a case through
`bash launch/train_<mode>.sh`, reading what the trainer measured, and the estimator's prediction for the same run."""
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune_launcher.console import ascii_safe  # noqa: E402

# NVLink multicast stays off wherever the ranks run (the device machines' rule: a program that uses it can put a
# host's shared GPUs out of service for a day or more).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega red green blue cat dog bird fish "
         "river mountain cloud stone tree leaf wind rain north south east west one two three four five six seven "
         "eight nine ten run jump swim read write sing open close").split()


def write_text_corpus(path, words, seed=0, words_per_doc=2000):
    """A JSONL `text` dataset of random words: with dataset_format text every training row is a full block."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(max(1, words // words_per_doc)):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words_per_doc))}) + "\n")
    os.replace(tmp, path)
    return path


TOKENS_PER_WORD = 1.3  # English through a real model's tokenizer (Llama-3 / Qwen2.5: about 1.3 tokens a word)


def one_token_words(model_ref):
    """Words the model's tokenizer (the tiny one of a random: shape) encodes as one token each, after a space: text
    of n of them is n tokens, so synthetic examples get the token lengths real text of that many words would have."""
    from transformers import AutoTokenizer

    from finetune_launcher.models.references import resolve_model_path

    vocab = AutoTokenizer.from_pretrained(resolve_model_path(model_ref)).get_vocab()
    words = sorted(k[1:] for k in vocab if k.startswith("\u0120") and k[1:].isalpha() and k[1:].islower()
                   and len(k) >= 4)
    return words or WORDS


def write_instruction_corpus(path, examples, model_ref, seed=0):
    """A Dolly-like JSONL (instruction, context, response) with Dolly's shape of lengths, counted in words of real
    English (TOKENS_PER_WORD tokens each): instructions of tens of words (log-normal, median 12), a context on 30% of
    the examples (median 80 words, up to 600), responses from tens of words to a thousand (log-normal, median 80,
    sigma 1.0, 8-1000 words). Returns the path and the examples' token lengths as written (before the template)."""
    import math

    path = Path(path)
    rng = random.Random(seed)
    words = one_token_words(model_ref)

    def text(n_words):
        return " ".join(rng.choice(words) for _ in range(max(1, round(n_words * TOKENS_PER_WORD))))

    def lognormal(median, sigma, low, high):
        return min(high, max(low, math.exp(rng.gauss(math.log(median), sigma))))

    lengths = []
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(examples):
            record = {"instruction": text(lognormal(12, 0.6, 3, 80)),
                      "context": text(lognormal(80, 0.8, 10, 600)) if rng.random() < 0.3 else "",
                      "response": text(lognormal(80, 1.0, 8, 1000))}
            lengths.append(sum(len(v.split()) for v in record.values()))
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path, lengths


def write_config(config, path):
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_launcher(config, out_dir, nproc, extra=(), timeout=600, log_name="train.log", env=None, stop_after_step=None):
    """Run one case through the shell launcher the users type; return (exit code, history or None, wall s, log).
    `stop_after_step`: once the history records that step, the run is ended (SIGKILL to its process group) instead
    of writing final/ and the last checkpoint, which a benchmark does not measure (minutes for a full 3B state);
    the exit code is then 0."""
    out_dir = Path(out_dir)
    config = dict(config, output_dir=str(out_dir), run_name="run")
    path = write_config(config, out_dir / "config.yaml")
    cmd = ["bash", str(REPO / "launch" / f"train_{config['mode']}.sh"), str(path), "--nproc-per-node", str(nproc),
           "--no-preflight", *map(str, extra)]
    log = out_dir / log_name
    history_file = out_dir / "run" / "training_history.json"
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = start_case(cmd, stdout=f, env={**os.environ, **MULTICAST_OFF, **(env or {})})
        try:
            code = wait_for(proc, history_file, t0 + timeout, stop_after_step)
        finally:
            RUNNING.discard(proc)
    history = json.loads(history_file.read_text()) if history_file.exists() else None
    return code, history, time.time() - t0, log


RUNNING = set()  # the cases running now (their launchers), ended with the benchmark when it is stopped


def start_case(cmd, **popen):
    """Start one case's command in a session of its own (stop_group ends it and everything it started); if the
    benchmark itself is stopped (SIGTERM, e.g. from `timeout`, or SIGINT), the case goes with it instead of training
    on beside whatever runs next on the GPU (seen on the H200, issue 31)."""
    import signal

    if not RUNNING and signal.getsignal(signal.SIGTERM) is not stop_running_cases:
        signal.signal(signal.SIGTERM, stop_running_cases)
        signal.signal(signal.SIGINT, stop_running_cases)
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    RUNNING.add(proc)
    return proc


def stop_running_cases(signum=None, _frame=None):
    """End every running case's processes; as a signal handler, then exit (128 + the signal)."""
    for proc in list(RUNNING):
        stop_group(proc)
        RUNNING.discard(proc)
    if signum is not None:
        raise SystemExit(128 + signum)


def wait_for(proc, history_file, deadline, stop_after_step):
    """The run's exit code: its own, 0 when it was ended after `stop_after_step`, 124 past the deadline."""
    while proc.poll() is None:
        if time.time() > deadline:
            stop_group(proc)
            return 124
        if stop_after_step and recorded_step(history_file) >= stop_after_step:
            stop_group(proc)
            return 0
        time.sleep(0.5)
    return proc.returncode


def recorded_step(history_file):
    try:
        records = json.loads(history_file.read_text()).get("records", [])
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0
    return max((r.get("step", 0) for r in records), default=0)


def stop_group(proc):
    """SIGKILL to every process of the run (the launcher, torchrun, the ranks), then reap the launcher. torchrun
    starts each rank in a session of its own, so the ranks are found as descendants, not only as members of the
    launcher's session: a rank that outlived its killed torchrun trained on beside the next case (seen on the
    H200, issue 31)."""
    import signal

    for pid in set(session_members(proc.pid)) | set(descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def descendants(root):
    """Every process below `root` in the parent tree (from /proc/PID/stat)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def session_members(sid):
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return members


def build_models(models):
    """Build the `random:` shapes' directories (config and tokenizer: the trainer builds the weights where it trains)
    and the `builtin:` models before any case, so no case's time or timeout includes them. In a fresh Python, so this
    process never starts CUDA. Returns the seconds it took."""
    t0 = time.time()
    code = ("import sys; from finetune_launcher.models.references import resolve_model_path; "
            "[resolve_model_path(m) for m in sys.argv[1:]]")
    subprocess.run([sys.executable, "-c", code, *dict.fromkeys(models)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.time() - t0


def record_case(rows, row, label, args, device):
    """Add a finished case's row, print its one-line result and rewrite the partial --json, so a run cut short by its
    time limit still leaves every finished case behind."""
    rows.append(row)
    status = (f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_time_s']:.3f} s/step" if "tokens_per_s" in row
              else f"FAILED (exit {row['exit_code']})\n{row.get('error', '')}")
    print(ascii_safe(f"{label}: {status} ({row['wall_s']:.0f} s)"), flush=True)
    if args.json:
        write_json({"command": " ".join(sys.argv), "partial": True, "device": device.name, "settings": vars(args),
                    "cases": rows}, args.json)


def this_machine_gpus():
    """The GPUs of this machine (nvidia-smi, without starting CUDA here): 0 on a CPU machine."""
    from finetune_launcher.config.machine import detect

    return detect().gpus


def prediction(config, nproc, device, margin=0.0):
    """The estimator's cold figures for a case (step time, tokens/s over all ranks, peak GiB per GPU with `margin`,
    whether that fits the GPU, host memory per node), or the reason it gave none."""
    try:
        result = predict(config, nproc, device, {}, margin=margin)
    except Exception as error:  # noqa: BLE001 - a case the estimator cannot model is reported, not fatal
        return {"error": ascii_safe(f"{type(error).__name__}: {error}")}
    return {"device": device.name, "step_time_s": round(result.step_time_s, 4),
            "tokens_per_s": round(result.tokens_per_s, 1), "peak_gib": round(result.peak_bytes / 2**30, 2),
            "fits": result.fits, "params_trainable": result.counts.trainable,
            "host_gib_per_node": round(result.host_bytes / 2**30, 1)}  # CPU offload's states


def launch_decisions(log):
    """What the launcher decided (checkpointing, engine, compiled layers, Liger), as it printed them in `log`."""
    lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    found = {}
    for key, prefix in (("gradient_checkpointing", "gradient checkpointing:"), ("engine", "engine:"),
                        ("compile_layers", "compile layers:"), ("liger_kernel", "liger kernels:")):
        found[key] = next((line.split(":", 1)[1].strip() for line in lines if line.startswith(prefix)), None)
    return found


def run_hf_baseline(cmd, out, name, timeout):
    """Run bench/hf_baseline.py's `cmd` (writing out/result.json), its output in out/train.log; the row of the
    case, with the baseline's result or the log's tail as the error."""
    (out / "result.json").unlink(missing_ok=True)
    t0 = time.time()
    with open(out / "train.log", "w", encoding="utf-8") as f:
        proc = start_case(cmd, stdout=f)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            code = 124
        finally:
            RUNNING.discard(proc)
    row = {"case": name, "stack": "HF Trainer + PEFT", "exit_code": code, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(cmd)}
    if code != 0 or not (out / "result.json").exists():
        return dict(row, error=log_tail(out / "train.log"))
    return dict(row, **json.loads((out / "result.json").read_text()))


def log_tail(log, chars=1500):
    text = Path(log).read_text(encoding="utf-8", errors="replace")
    return ascii_safe(text[-chars:])


def measured(history, warmup, last=None):
    """Median step time, tokens/s and the peak memory of the steps after `warmup` (up to `last`: later ones were
    profiled)."""
    records = [r for r in history.get("records", []) if warmup < r.get("step", 0) <= (last or float("inf"))
               and "step_time_s" in r]
    if not records:
        return None
    times = sorted(r["step_time_s"] for r in records)
    rates = sorted(r["tokens_per_s"] for r in records)
    final = records[-1]
    return {"step_time_s": times[len(times) // 2], "tokens_per_s": rates[len(rates) // 2],
            "peak_allocated_gib": final.get("peak_memory_allocated_gib"),
            "peak_reserved_gib": final.get("peak_memory_reserved_gib"),
            "first_loss": history["records"][0]["loss"], "last_loss": final["loss"], "measured_steps": len(records)}


def predict(config, nproc, device, calibration, margin=0.0):
    """The estimator's figures for this run config (no memory margin: compared with what the GPU held)."""
    from finetune_launcher.config import resolve_run_config
    from finetune_launcher.config.machine import named
    from finetune_launcher.estimate import estimate, spec_from_config

    resolved = resolve_run_config(None, config, procs_per_node=nproc, machine=named(device.name), require_model=False)
    spec = spec_from_config(resolved.as_dict(), nproc, 1, gpu=device.name)
    spec = replace(spec, max_steps=1, margin=margin)
    return estimate(spec, calibration=calibration, device=device, with_alternatives=False)


def versions():
    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__}
    for name in ("peft", "deepspeed", "bitsandbytes", "liger_kernel", "accelerate"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - report what is there
            found[name] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["cuda"] = torch.version.cuda
    return found


def write_json(data, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
