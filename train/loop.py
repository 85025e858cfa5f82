"""The training recipe, top to bottom: data -> model -> DeepSpeed engine -> steps with token-normalised loss,
guards, evaluation, plateau/early-stop rules, checkpoints, history -> best/ and final/."""
import contextlib
import math
import os
import platform
import signal
import time
from pathlib import Path

import torch

from train import __version__
from train.checkpoint import latest_checkpoint, load_training_state, save_training_state, save_weights
from train.config import public_config
from train.console import Progress, say, warn
from train.data import IGNORE_INDEX, RowSampler, collate, prepare_data, supervised_tokens
from train.engine import (all_reduce_max, all_reduce_sum, barrier, device_for, init_distributed, resolve_ds_config,
                          resolve_precision, shutdown_distributed)
from train.estimate import log_estimate_vs_measured
from train.history import History, MetricSinks, check_sinks_available, plot_history
from train.model import (count_parameters, hidden_size_of, largest_adapter_tensor, load_model, load_tokenizer,
                         model_config)
from train.schedule import EvalTracker, LRSchedule

EXIT_OK, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 3, 0


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to check."""


class StopSignal:
    """Remembers a SIGTERM / SIGUSR1 (Slurm preemption, `kill`); the loop checkpoints and exits 0 at the next step."""

    def __init__(self):
        self.received = None

    @classmethod
    def install(cls):
        stop = cls()

        def handler(signum, _frame):
            stop.received = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread (e.g. called from a notebook helper)
                pass
        return stop


class NanGradient(torch.autograd.Function):
    """Testing only (debug_nan_grad_at_step): the loss passes unchanged, its gradient comes back NaN, as after an
    overflow in the backward pass."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def run(config):
    check_sinks_available(config["report_to"])
    stop = StopSignal.install()  # before the (long) model load: a preemption then still ends in a clean exit
    rank, world, local_rank = init_distributed()
    try:
        return train_run(config, stop, rank, world, local_rank)
    finally:
        # On every path, errors included: left to interpreter teardown, gloo's worker threads abort the process
        # ("terminate called without an active exception") when a peer has already gone.
        shutdown_distributed()


def train_run(config, stop, rank, world, local_rank):
    device = device_for(local_rank)
    torch.manual_seed(config["seed"] + rank)
    precision = resolve_precision(config["precision"])
    out_dir = Path(config["output_dir"]) / config["run_name"]

    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    report_data(data.stats, config)

    architecture = model_config(config)
    decide_gradient_checkpointing(config, world)
    ds_config = resolve_ds_config(config, world, hidden_size_of(architecture), precision,
                                  largest_adapter=largest_adapter_tensor(config, architecture))
    model, keepalive = load_model(config, precision, ds_config, device)
    trainable, total = count_parameters(model)
    say(f"model {config['model']}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
        f"({config['mode']}, ZeRO-{config['zero_stage']}{' + offload' if config['offload'] else ''}, {precision}, "
        f"{world} process{'es' if world > 1 else ''})")
    engine = build_engine(model, config, ds_config)

    sampler = RowSampler(data.train_rows, rank, world, config["micro_batch_size"],
                         config["gradient_accumulation_steps"], config["seed"], data.pad_id, data.packed)
    if sampler.steps_per_epoch == 0:
        raise TrainingError(
            f"the dataset has {len(data.train_rows)} rows, fewer than one optimizer step needs "
            f"({world} processes x micro_batch_size {config['micro_batch_size']} x gradient_accumulation_steps "
            f"{config['gradient_accumulation_steps']}); lower those or add data")
    total_steps = config["max_steps"] or max(1, math.ceil(config["num_epochs"] * sampler.steps_per_epoch))
    schedule = LRSchedule(config, total_steps)
    tracker = EvalTracker(config, schedule)
    metadata = run_metadata(config, precision, world, trainable, total, data.stats, total_steps, sampler)
    history = History(out_dir / "training_history.json", metadata, enabled=rank == 0)

    start_step = maybe_resume(engine, config, out_dir, rank, schedule, tracker, history)
    sinks = MetricSinks(out_dir / "tensorboard", config["report_to"], config["run_name"], public_config(config),
                        enabled=rank == 0)
    trainer = Trainer(config, engine, model, tokenizer, data, sampler, schedule, tracker, history, sinks,
                      out_dir, rank, world, device, total_steps, stop)
    try:
        code = trainer.train(start_step)
        barrier()  # no rank closes its connections while another still talks to it
    finally:
        sinks.close()
        del keepalive
    return code


def decide_gradient_checkpointing(config, world):
    """Resolve `gradient_checkpointing: auto` from the memory estimate (the same on every rank: same inputs)."""
    from train.estimate import resolve_gradient_checkpointing

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    config["gradient_checkpointing"], why = resolve_gradient_checkpointing(config, per_node, max(1, world // per_node))
    say(f"gradient checkpointing: {why}")


def report_data(stats, config):
    say(f"data {config['dataset']} ({stats.format}): {stats.train_examples} train / {stats.eval_examples} eval "
        f"examples -> {stats.train_rows} rows of up to {config['max_length']} tokens"
        f"{f', {100 * stats.nonpad_fraction:.1f}% non-pad (packed)' if config['packing'] else ''}")
    if stats.truncated or stats.dropped_no_response:
        warn(f"max_length {config['max_length']}: {stats.truncated} examples lost response tokens to truncation, "
             f"{stats.dropped_no_response} had no response token left and were dropped")


def build_engine(model, config, ds_config):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    betas = (config["adam_beta1"], config["adam_beta2"])
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=config["learning_rate"], betas=betas,
                                     weight_decay=config["weight_decay"], adamw_mode=True)
    else:
        # A torch optimizer: DeepSpeed's own "AdamW" would JIT-compile FusedAdam (slow first start, GPU-only).
        optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], betas=betas,
                                      weight_decay=config["weight_decay"], fused=torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def run_metadata(config, precision, world, trainable, total, stats, total_steps, sampler):
    import deepspeed
    import peft
    import transformers

    return {
        "run_name": config["run_name"], "mode": config["mode"], "model": config["model"],
        "precision": precision, "world_size": world, "zero_stage": config["zero_stage"],
        "offload": config["offload"], "params_total": total, "params_trainable": trainable,
        "total_steps": total_steps, "steps_per_epoch": sampler.steps_per_epoch,
        "tokens_per_step_capacity": world * config["micro_batch_size"] * config["gradient_accumulation_steps"]
        * config["max_length"],
        "data": stats.as_dict(), "config": public_config(config),
        "versions": {"finetune_launcher": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def maybe_resume(engine, config, out_dir, rank, schedule, tracker, history):
    """Resume from checkpoints/latest when asked (always) or when it exists (auto). Returns the step to continue
    after."""
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    if config["resume"] == "never" or (checkpoint is None and config["resume"] == "auto"):
        return 0
    if checkpoint is None:
        raise TrainingError(f"resume requested but no checkpoint in {out_dir / 'checkpoints'}; "
                            f"run without --resume to start fresh")
    client = load_training_state(engine, checkpoint, rank, config["mode"] != "full")
    schedule.load_state_dict(client["schedule"])
    tracker.load_state_dict(client["tracker"])
    history.resume_from(client["step"])
    say(f"resumed from {checkpoint} at step {client['step']}")
    return client["step"]


class Trainer:
    def __init__(self, config, engine, model, tokenizer, data, sampler, schedule, tracker, history, sinks,
                 out_dir, rank, world, device, total_steps, stop):
        self.c, self.engine, self.model, self.tokenizer = config, engine, model, tokenizer
        self.data, self.sampler, self.schedule, self.tracker = data, sampler, schedule, tracker
        self.history, self.sinks, self.out_dir = history, sinks, out_dir
        self.rank, self.world, self.device, self.total_steps = rank, world, device, total_steps
        self.stop = stop

    # ------------------------------------------------------------ the loop

    def train(self, start_step):
        progress = Progress(self.total_steps, start_step, every=self.c["logging_steps"])
        say(f"training {self.total_steps - start_step} steps ({self.sampler.steps_per_epoch} per epoch) -> {self.out_dir}")
        estimate_log = log_estimate_vs_measured(self.c, self.world, self.history)
        stop_reason, step = None, start_step
        if start_step == 0 and self.data.eval_rows:
            baseline = self.evaluate()
            self.history.log_eval(0, baseline, {"baseline": True})
            say(f"eval step 0 (before training): loss {baseline:.4f}")
        try:
            for step in range(start_step + 1, self.total_steps + 1):
                record = self.train_step(step)
                estimate_log.observe(step, record)
                progress.update(step, {"loss": f"{record['loss']:.4f}", "lr": f"{record['learning_rate']:.2e}",
                                       "s/step": f"{record['step_time_s']:.2f}"})
                if step % self.c["logging_steps"] == 0 or step == 1 or step == self.total_steps:
                    self.history.log_step(record)
                    self.sinks.log(step, {f"train/{k}": v for k, v in record.items() if k != "step"})
                if step % self.c["eval_steps"] == 0 and self.data.eval_rows:
                    stop_reason = self.evaluate_and_track(step)
                if step % self.c["save_steps"] == 0 or stop_reason:
                    self.save_state(step)
                self.history.save()
                if stop_reason:
                    break
                if self.stop_requested():
                    self.save_state(step)
                    return self.finish_preempted(step, progress)
        except TrainingError as error:
            progress.close()
            self.history.set("status", "failed")
            self.history.set("stop_reason", str(error))
            self.history.save()
            raise
        progress.close()
        return self.finish(step, stop_reason)

    def train_step(self, step):
        engine, c = self.engine, self.c
        t0 = time.time()
        epoch, step_in_epoch = divmod(step - 1, self.sampler.steps_per_epoch)
        lr = self.schedule.lr_at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        batches, real_tokens = self.sampler.micro_batches(epoch, step_in_epoch)
        local_tokens = sum(supervised_tokens(b) for b in batches)
        padded_tokens = sum(int(b["input_ids"].numel()) for b in batches)
        global_tokens, = all_reduce_sum([local_tokens], self.device)
        if global_tokens == 0:
            raise TrainingError(
                f"step {step}: no token in this optimizer step has a label (all labels are -100), so the loss "
                f"would be 0.0 and nothing would be learned. Check the prompt length against max_length and the "
                f"dataset's field names")
        # Each micro-batch's loss is its token-sum divided by the step's average tokens per micro-batch, so that
        # DeepSpeed's 1/accumulation and 1/world averaging leave sum(all token losses) / (all supervised tokens).
        normaliser = global_tokens / (self.world * len(batches))
        engine.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no sync per micro-batch
        for i, batch in enumerate(batches):
            batch = self.to_device(batch)
            loss = engine(**batch, num_items_in_batch=normaliser, use_cache=False).loss
            if c["debug_nan_at_step"] == step:
                loss = loss * float("nan")
            if c["debug_nan_grad_at_step"] == step:
                loss = NanGradient.apply(loss)
            engine.backward(loss)
            loss_sum += loss.detach().double() * normaliser
            if i == len(batches) - 1:
                total_loss, = all_reduce_sum([loss_sum], self.device)
                mean_loss = total_loss / global_tokens
                if not math.isfinite(mean_loss):
                    raise self.nonfinite_error(step, "loss", mean_loss)
            engine.step()
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm) and not self.fp16_skipped_step():
            raise self.nonfinite_error(step, "grad norm", grad_norm)
        step_time = time.time() - t0
        tokens, padded = all_reduce_sum([real_tokens, padded_tokens], self.device)
        return {"step": step, "epoch": round(step / self.sampler.steps_per_epoch, 4), "loss": mean_loss,
                "learning_rate": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / step_time,
                "step_time_s": step_time, "supervised_tokens": int(global_tokens),
                "nonpad_fraction": tokens / padded, **self.peak_memory()}

    def peak_memory(self):
        """The largest GPU memory peak over the ranks since the run started (GiB), on CUDA."""
        if self.device.type != "cuda":
            return {}
        allocated, reserved = all_reduce_max([torch.cuda.max_memory_allocated(self.device) / 2**30,
                                              torch.cuda.max_memory_reserved(self.device) / 2**30], self.device)
        return {"peak_memory_allocated_gib": round(allocated, 3), "peak_memory_reserved_gib": round(reserved, 3)}

    def to_device(self, batch):
        """A copy from pageable memory blocks the host until the GPU has caught up; from pinned memory it is queued,
        so the host keeps launching the next micro-batch's kernels meanwhile."""
        if self.device.type != "cuda":
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def fp16_skipped_step(self):
        """With fp16 loss scaling an overflow skips the step and lowers the scale: expected, not fatal."""
        return bool(getattr(self.engine, "fp16_enabled", lambda: False)()) and \
            not self.engine.was_step_applied()

    def nonfinite_error(self, step, what, value):
        last = latest_checkpoint(self.out_dir / "checkpoints")
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before this step"
        return TrainingError(
            f"step {step}: {what} is {value} (not finite); stopping instead of training on. Likely causes: all "
            f"labels masked in a batch, fp16 overflow (use bf16 or a smaller LR), a learning rate too high, or bad "
            f"data. {kept}; fix the cause and rerun (it resumes from there)")

    # ------------------------------------------------------------ evaluation and stopping rules

    def evaluate(self):
        """Token-weighted eval loss over the whole eval split, all ranks running the same number of forwards."""
        rows = self.data.eval_rows
        micro = self.c["micro_batch_size"]
        mine = rows[self.rank::self.world]
        n_batches = math.ceil(math.ceil(len(rows) / self.world) / micro)
        self.engine.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for i in range(n_batches):
                chunk = mine[i * micro:(i + 1) * micro]
                if not chunk:  # keep collectives in step with other ranks (ZeRO-3): a fully masked batch
                    chunk = [{**rows[0], "labels": [IGNORE_INDEX] * len(rows[0]["labels"])}]
                batch = collate(chunk, self.data.pad_id, self.data.packed)
                n = supervised_tokens(batch)
                batch = self.to_device(batch)
                loss = self.engine(**batch, num_items_in_batch=1.0, use_cache=False).loss
                loss_sum += float(loss) if n else 0.0
                tokens += n
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens], self.device)
        return loss_sum / max(tokens, 1.0)

    def evaluate_and_track(self, step):
        eval_loss = self.evaluate()
        event = self.tracker.on_eval(eval_loss, step)
        self.history.log_eval(step, eval_loss, {"learning_rate_scale": self.schedule.scale,
                                                "improved": event["improved"]})
        self.sinks.log(step, {"eval/loss": eval_loss})
        note = " (best)" if event["improved"] else ""
        if event["lr_reduced"]:
            note += f", plateau: LR x{self.c['plateau_factor']} -> scale {self.schedule.scale:.3g}"
        say(f"\neval step {step}: loss {eval_loss:.4f}{note}")
        if event["improved"]:
            self.save_weights("best", step, eval_loss)
            self.history.set("best", {"step": step, "eval_loss": eval_loss, "path": str(self.out_dir / "best")})
        if event["stop_reason"]:
            say(f"stopping: {event['stop_reason']}")
        return event["stop_reason"]

    # ------------------------------------------------------------ saving

    def save_weights(self, name, step, eval_loss=None):
        info = {"step": step, "eval_loss": eval_loss, "mode": self.c["mode"], "base_model": self.c["model"],
                "run_name": self.c["run_name"], "max_length": self.c["max_length"],
                "dataset_format": self.data.stats.format}
        with self.timed_save(step, name):
            save_weights(self.engine, self.model, self.tokenizer, self.out_dir / name, self.c["mode"], self.rank,
                         info)

    @contextlib.contextmanager
    def timed_save(self, step, what):
        t0 = time.time()
        yield
        self.history.log_save(step, what, time.time() - t0)

    def save_state(self, step):
        client = {"step": step, "schedule": self.schedule.state_dict(), "tracker": self.tracker.state_dict()}
        with self.timed_save(step, "checkpoint"):
            save_training_state(self.engine, self.out_dir / "checkpoints", step, client, self.rank,
                                self.c["save_total_limit"], adapters_only=self.c["mode"] != "full")

    def finish(self, step, stop_reason):
        if self.data.eval_rows and not any(e["step"] == step for e in self.history.data["evals"]):
            stop_reason = self.evaluate_and_track(step) or stop_reason
        self.save_weights("final", step, self.history.data["evals"][-1]["eval_loss"]
                          if self.history.data["evals"] else None)
        if step % self.c["save_steps"] != 0:
            self.save_state(step)
        self.history.set("stop_reason", stop_reason or f"completed {step} steps")
        self.history.set("status", "completed")
        self.history.set("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.history.save()
        if self.rank == 0:
            plot_history(self.history.data, self.out_dir / "training_curves.png")
        best = self.history.data.get("best")
        say(f"done: {self.history.data['stop_reason']}. final/ and "
            f"{'best/ (step %d, eval loss %.4f)' % (best['step'], best['eval_loss']) if best else 'no best/'} "
            f"in {self.out_dir}")
        barrier()
        return EXIT_OK

    # ------------------------------------------------------------ preemption (SIGTERM / SIGUSR1)

    def stop_requested(self):
        """Every rank must agree to stop at the same step (a signal may reach one rank first)."""
        flag, = all_reduce_sum([1.0 if self.stop.received else 0.0], self.device)
        return flag > 0

    def finish_preempted(self, step, progress):
        os.environ["FTL_PREEMPTED"] = "1"  # the launcher trusts this 0 over torchrun's 1 after a signal
        progress.close()
        self.history.set("status", "preempted")
        self.history.set("stop_reason", f"signal received: checkpoint saved at step {step}; resume continues it")
        self.history.save()
        say(f"preempted: checkpoint saved at step {step} in {self.out_dir / 'checkpoints'}")
        barrier()
        return EXIT_PREEMPTED
