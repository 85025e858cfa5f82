"""The training loop every recipe shares: resume, steps with a loss normalised over the whole optimizer step,
guards, evaluation with plateau LR and early stopping, checkpoints, history, progress, preemption, best/ and final/.
A recipe hands it a Task (finetune_launcher/task.py: every member the loop uses) and an engine."""
import contextlib
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_launcher import __version__
from finetune_launcher.checkpoint import (latest_checkpoint, load_training_state, resume_problem, save_training_state,
                                         training_identity)
from finetune_launcher.config import ConfigError, RunConfig
from finetune_launcher.console import Progress, say, warn
from finetune_launcher.distributed import RankContext, all_reduce_max, all_reduce_sum, barrier, reduced_tensor
from finetune_launcher.engines import engine_facts
from finetune_launcher.exit_codes import OK
from finetune_launcher.guards import (TrainingError, Watchers, fp16_loss_scale, fp16_skipped_step, is_finite,
                                     nonfinite, nothing_to_learn, with_debug_faults)
from finetune_launcher.history import History, MetricSinks, plot_history
from finetune_launcher.profiling import StepProfiler
from finetune_launcher.schedule import EvalTracker, LRSchedule
from finetune_launcher.schedule import total_steps as total_steps_for
from finetune_launcher.task import Engine, StepBatches, Task


@dataclass(frozen=True)
class Outcome:
    code: int
    preempted: bool = False


def train(cfg: RunConfig, ctx: RankContext, task: Task, engine: Engine, watch: Watchers,
          params: tuple[int, int]) -> Outcome:
    """Run the task to its end (or a stop rule, a guard, a preemption); returns the Outcome. `watch`: the run's
    guards.Watchers; `params`: (trainable, total) parameter counts for the history."""
    total_steps = total_steps_for(cfg, task.steps_per_epoch)
    schedule = LRSchedule(cfg, total_steps)
    tracker = EvalTracker(cfg, schedule)
    metadata = run_metadata(cfg, ctx, task, engine, params, total_steps)
    history = History(cfg.run_dir / "training_history.json", metadata, enabled=ctx.is_main)
    start_step = resume(engine, cfg, ctx, schedule, tracker, history, total_steps)
    sinks = MetricSinks(cfg.run_dir / "tensorboard", cfg.report_to, cfg.run_name, cfg.as_dict(),
                        enabled=ctx.is_main)
    try:
        outcome = Trainer(cfg, ctx, task, engine, schedule, tracker, history, sinks, total_steps, watch).run(start_step)
        barrier()  # no rank closes its connections while another still talks to it
    finally:
        sinks.close()
    return outcome


def run_metadata(cfg: RunConfig, ctx: RankContext, task: Task, engine: Engine, params: tuple[int, int],
                 total_steps: int) -> dict:
    import deepspeed
    import peft
    import transformers

    trainable, total = params
    return {
        "run_name": cfg.run_name, "recipe": cfg.recipe, "mode": cfg.mode, "model": cfg.model,
        "precision": cfg.precision, "world_size": ctx.world, "engine": engine_facts(engine),
        "zero_stage": engine_facts(engine)["zero_stage"], "offload": cfg.offload,
        "params_total": total, "params_trainable": trainable,
        "total_steps": total_steps, "steps_per_epoch": task.steps_per_epoch,
        "tokens_per_step_capacity": ctx.world * cfg.micro_batch_size * cfg.gradient_accumulation_steps
        * cfg.max_length,
        "data": task.stats, "config": cfg.as_dict(),
        "versions": {"finetune_launcher": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def resume(engine: Engine, cfg: RunConfig, ctx: RankContext, schedule: LRSchedule, tracker: EvalTracker,
           history: History, total_steps: int) -> int:
    """The step to continue after: 0 for a fresh start, else the step of checkpoints/latest, which is loaded.
    `resume: auto` continues only a checkpoint written with the same training settings (else ConfigError, naming
    each difference); `always` continues it anyway; `never` starts over."""
    checkpoint = latest_checkpoint(cfg.run_dir / "checkpoints")
    if cfg.resume == "never" or (checkpoint is None and cfg.resume == "auto"):
        return 0
    if checkpoint is None:
        raise ConfigError(f"resume: always, but there is no checkpoint in {cfg.run_dir / 'checkpoints'}; run "
                          f"without --resume to start fresh")
    problem = resume_problem(cfg, checkpoint, total_steps)
    if problem and cfg.resume == "auto":
        raise ConfigError(problem)
    if problem:
        warn(problem.rsplit("\n", 1)[0] + "\n-- continuing anyway (resume: always)")
    client = load_training_state(engine, checkpoint, ctx.rank, cfg.lora)
    schedule.load_state_dict(client["schedule"])
    tracker.load_state_dict(client["tracker"])
    history.resume_from(client["step"])
    say(f"resumed from {checkpoint} at step {client['step']}")
    return client["step"]


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: RankContext, task: Task, engine: Engine, schedule: LRSchedule,
                 tracker: EvalTracker, history: History, sinks: MetricSinks, total_steps: int,
                 watch: Watchers) -> None:
        self.c, self.ctx, self.task, self.engine = cfg, ctx, task, engine
        self.schedule, self.tracker, self.history, self.sinks = schedule, tracker, history, sinks
        self.total_steps, self.stop, self.estimate_log = total_steps, watch.stop, watch.estimate
        self.saved_state_at = None  # the step of the last training-state checkpoint
        self.prefetched = None  # (step, StepBatches) built ahead of that step
        self.profiler = StepProfiler.from_env(ctx.is_main)  # only when a benchmark asks (FTL_PROFILE_JSON)

    # ------------------------------------------------------------ the loop

    def run(self, start_step: int) -> Outcome:
        progress = Progress(self.total_steps, start_step, every=self.c.logging_steps)
        say(f"training {self.total_steps - start_step} steps ({self.task.steps_per_epoch} per epoch) -> "
            f"{self.c.run_dir}")
        estimate_log = self.estimate_log.attach(self.history)
        stop_reason, step = None, start_step
        if start_step == 0:
            self.evaluate_baseline()
        try:
            for step in range(start_step + 1, self.total_steps + 1):
                with self.profiler.step(step):
                    record = self.train_step(step)
                estimate_log.observe(step, record)
                progress.update(step, {"loss": f"{record['loss']:.4f}", "lr": f"{record['learning_rate']:.2e}",
                                       "s/step": f"{record['step_time_s']:.2f}"})
                self.log_step(step, record)
                if step % self.c.eval_steps == 0:
                    stop_reason = self.evaluate_and_track(step)
                preempted = self.stop_requested()
                if step % self.c.save_steps == 0 or stop_reason or preempted:
                    self.save_state(step)
                self.history.save()
                if preempted:
                    return self.finish_preempted(step, progress)
                if stop_reason:
                    break
        except TrainingError as error:
            progress.close()
            self.history.set("status", "failed")
            self.history.set("stop_reason", str(error))
            self.history.save()
            raise
        progress.close()
        return self.finish(step, stop_reason)

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        if step % self.c.logging_steps == 0 or step == 1 or step == self.total_steps:
            record.update(self.peak_memory())
            record.update(self.task.step_metrics(step))
            self.history.log_step(record)
            self.sinks.log(step, {f"train/{k}": v for k, v in record.items() if k != "step"})

    def train_step(self, step: int) -> dict[str, Any]:
        engine, task = self.engine, self.task
        t0 = time.time()
        lr = self.schedule.lr_at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        micro = self.batches_of(step)
        units, real, padded = all_reduce_sum([micro.units, micro.real_tokens, micro.padded_tokens], self.ctx.device)
        if units == 0:
            raise nothing_to_learn(step, task.unit)
        # Each micro-batch's loss is its unit-sum divided by the step's average units per micro-batch, so that
        # DeepSpeed's 1/accumulation and 1/world averaging leave sum(all unit losses) / (all units).
        normaliser = units / (self.ctx.world * len(micro.batches))
        engine.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for batch in micro.batches:
            loss = with_debug_faults(task.loss(engine, batch, normaliser), self.c, step)
            engine.backward(loss)
            loss_sum += loss.detach().double() * normaliser
            engine.step()
        if step < self.total_steps:  # collated and copied while the GPU still works on this step
            self.prefetched = (step + 1, self.batches_of(step + 1))
        mean_loss, grad_norm = self.step_values(loss_sum, units)
        # Checked after the optimizer step, in the step's one host sync: a failed step is never saved (the run
        # stops here and the last good checkpoint stays as it was).
        if not math.isfinite(mean_loss):
            raise nonfinite(step, "loss", mean_loss, self.last_checkpoint())
        if not is_finite(grad_norm) and not fp16_skipped_step(engine):
            raise nonfinite(step, "grad norm", grad_norm, self.last_checkpoint())
        step_time = time.time() - t0
        record = {"step": step, "epoch": round(step / task.steps_per_epoch, 4), "loss": mean_loss,
                  "learning_rate": lr, "grad_norm": grad_norm, f"{task.throughput}_per_s": real / step_time,
                  "step_time_s": step_time, f"supervised_{task.unit}s": int(units)}
        if task.throughput == "tokens":
            record["nonpad_fraction"] = real / max(1.0, padded)
        scale = fp16_loss_scale(engine)
        if scale is not None:  # fp16: the scale this step left, and whether an overflow skipped it
            record.update(loss_scale=scale, step_skipped=fp16_skipped_step(engine))
        return record

    def batches_of(self, step: int) -> StepBatches:
        """This rank's micro-batches of `step` (a pure function of the step: prefetched ones are reused)."""
        prefetched, self.prefetched = self.prefetched, None
        if prefetched and prefetched[0] == step:
            return prefetched[1]
        epoch, step_in_epoch = divmod(step - 1, self.task.steps_per_epoch)
        return self.task.micro_batches(epoch, step_in_epoch)

    def step_values(self, loss_sum: torch.Tensor, units: float) -> tuple[float, float | None]:
        """(mean loss over all ranks, grad norm or None) with one device-to-host copy: the step's only sync."""
        grad_norm = self.engine.get_global_grad_norm()
        loss_total = reduced_tensor([loss_sum], self.ctx.device)[0]
        norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64,
                               device=self.ctx.device)
        total, norm = torch.stack([loss_total, norm]).tolist()
        return total / units, None if grad_norm is None else norm

    def peak_memory(self) -> dict[str, float]:
        """The largest GPU memory peak over the ranks since the run started (GiB), on CUDA; on logged steps only
        (a collective and a host sync)."""
        if self.ctx.device.type != "cuda":
            return {}
        allocated, reserved = all_reduce_max([torch.cuda.max_memory_allocated(self.ctx.device) / 2**30,
                                              torch.cuda.max_memory_reserved(self.ctx.device) / 2**30],
                                             self.ctx.device)
        return {"peak_memory_allocated_gib": round(allocated, 3), "peak_memory_reserved_gib": round(reserved, 3)}

    def last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.c.run_dir / "checkpoints")

    # ------------------------------------------------------------ evaluation and stopping rules

    def evaluate_baseline(self) -> None:
        loss = self.task.evaluate(self.engine)
        if loss is None:
            return
        self.history.log_eval(0, loss, {"baseline": True, **self.eval_extras(0)})
        say(f"eval step 0 (before training): loss {loss:.4f} (the base model; best/ is the best eval after it)")

    def evaluate_and_track(self, step: int) -> str | None:
        eval_loss = self.task.evaluate(self.engine)
        if eval_loss is None:
            return None
        event = self.tracker.on_eval(eval_loss, step)
        extras = self.eval_extras(step)
        self.history.log_eval(step, eval_loss, {"learning_rate_scale": self.schedule.scale,
                                                "improved": event["improved"], **extras})
        self.sinks.log(step, {"eval/loss": eval_loss})
        note = f" ({self.best_note(eval_loss)})" if event["improved"] else ""
        if event["lr_reduced"]:
            note += f", plateau: LR x{self.c.plateau_factor} -> scale {self.schedule.scale:.3g}"
        say(f"\neval step {step}: loss {eval_loss:.4f}{note}")
        if event["improved"]:
            self.save_weights("best", step, eval_loss)
            self.history.set("best", {"step": step, "eval_loss": eval_loss, "path": str(self.c.run_dir / "best")})
        if event["stop_reason"]:
            say(f"stopping: {event['stop_reason']}")
        return event["stop_reason"]

    def best_note(self, eval_loss: float) -> str:
        """best/ is chosen among the evals of trained weights: the step-0 eval is the base model's, shown beside."""
        baseline = next((e["eval_loss"] for e in self.history.data["evals"] if e.get("baseline")), None)
        if baseline is not None and baseline < eval_loss:
            return f"best since training started -> best/; the base model's {baseline:.4f} at step 0 is lower"
        return "best since training started -> best/"

    def eval_extras(self, step: int) -> dict[str, Any]:
        """What the task adds at an eval (e.g. sample images): pictures go to tensorboard, the rest to the history."""
        extras = dict(self.task.after_eval(self.engine, step))
        for tag, image in extras.pop("images", {}).items():
            self.sinks.log_image(step, f"eval/{tag}", image)
        return extras

    # ------------------------------------------------------------ saving

    def save_weights(self, name: str, step: int, eval_loss: float | None = None) -> None:
        info = {"step": step, "eval_loss": eval_loss, "mode": self.c.mode, "recipe": self.c.recipe,
                "base_model": self.c.model, "run_name": self.c.run_name, "max_length": self.c.max_length,
                "dataset_format": self.task.stats.get("format")}
        with self.timed_save(step, name):
            self.task.save_weights(self.engine, self.c.run_dir / name, info)

    @contextlib.contextmanager
    def timed_save(self, step: int, what: str) -> Iterator[None]:
        t0 = time.time()
        yield
        self.history.log_save(step, what, time.time() - t0)

    def save_state(self, step: int) -> None:
        """A training-state checkpoint of `step`, once: a stop rule or a signal on a save step does not save it
        again (a ZeRO-3 save of a 32B model takes minutes)."""
        if self.saved_state_at == step:
            return
        client = {"step": step, "schedule": self.schedule.state_dict(), "tracker": self.tracker.state_dict()}
        with self.timed_save(step, "checkpoint"):
            save_training_state(self.engine, self.c.run_dir / "checkpoints", step, client, self.ctx.rank,
                                self.c.save_total_limit, adapters_only=self.c.lora,
                                identity=training_identity(self.c))
        self.saved_state_at = step

    def finish(self, step: int, stop_reason: str | None) -> Outcome:
        evals = self.history.data["evals"]
        if not any(e["step"] == step for e in evals):
            stop_reason = self.evaluate_and_track(step) or stop_reason
        last_eval = self.history.data["evals"][-1]["eval_loss"] if self.history.data["evals"] else None
        self.save_weights("final", step, last_eval)
        self.save_state(step)
        self.history.set("stop_reason", stop_reason or f"completed {step} steps")
        self.history.set("stopped_early_at", step if stop_reason else None)
        self.history.set("status", "completed")
        self.history.set("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.history.save()
        if self.ctx.is_main:
            plot_history(self.history.data, self.c.run_dir / "training_curves.png")
        best = self.history.data.get("best")
        say(f"done: {self.history.data['stop_reason']}. final/ and "
            f"{'best/ (step %d, eval loss %.4f)' % (best['step'], best['eval_loss']) if best else 'no best/'} "
            f"in {self.c.run_dir}")
        return Outcome(OK)

    # ------------------------------------------------------------ preemption (SIGTERM / SIGUSR1)

    def stop_requested(self) -> bool:
        """Every rank must agree to stop at the same step (a signal may reach one rank first)."""
        flag, = all_reduce_sum([1.0 if self.stop.received else 0.0], self.ctx.device)
        return flag > 0

    def finish_preempted(self, step: int, progress: Progress) -> Outcome:
        progress.close()
        self.history.set("status", "preempted")
        self.history.set("stop_reason", f"signal received: checkpoint saved at step {step}; resume continues it")
        self.history.save()
        say(f"preempted: checkpoint saved at step {step} in {self.c.run_dir / 'checkpoints'}")
        return Outcome(OK, preempted=True)
