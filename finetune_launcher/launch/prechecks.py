"""What the launcher checks and prepares before any rank starts, so a mistake is one message and exit 2 instead of a
traceback per rank: the dataset, prepared once for the whole launch exactly as the ranks will use it (the recipe
table's `rows` part: records, fields, labels left after truncation, enough rows for one step; the ranks then load
it instead of preparing it again), and the checkpoint an automatic resume would continue."""
from finetune_launcher import recipe_table
from finetune_launcher.checkpoint import latest_checkpoint, resume_problem, training_identity
from finetune_launcher.config import ConfigError
from finetune_launcher.data.prepared import prepare_once, require_one_step
from finetune_launcher.data.sampling import steps_per_epoch
from finetune_launcher.schedule import total_steps


def check_before_launch(cfg):
    """Check the run; returns the directory of its prepared data (for the ranks)."""
    prepared, directory = prepare_once(cfg, training_identity(cfg), recipe_table.part(cfg.recipe, "rows"))
    require_one_step(len(prepared.train_rows), cfg, prepared.stats)
    check_resume(cfg, len(prepared.train_rows))
    return directory


def check_resume(cfg, rows):
    """A checkpoint that `resume: auto` would continue must have been trained with this run's settings."""
    checkpoint = latest_checkpoint(cfg.run_dir / "checkpoints")
    if checkpoint is None:
        if cfg.resume == "always":
            raise ConfigError(f"resume: always, but there is no checkpoint in {cfg.run_dir / 'checkpoints'}; run "
                              f"without --resume to start fresh")
        return
    if cfg.resume != "auto":
        return
    per_epoch = steps_per_epoch(rows, cfg.world_size, cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    problem = resume_problem(cfg, checkpoint, total_steps(cfg, per_epoch))
    if problem:
        raise ConfigError(problem)
