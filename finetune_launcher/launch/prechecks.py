"""What the launcher checks before any rank starts, so a mistake is one message and exit 2 instead of a traceback per
rank: the dataset as the ranks will read it (records, fields, labels left after truncation, enough rows for one
step) and the checkpoint an automatic resume would continue."""
from finetune_launcher.checkpoint import latest_checkpoint, resume_problem
from finetune_launcher.config import ConfigError
from finetune_launcher.schedule import total_steps


def check_before_launch(cfg):
    rows = check_dataset(cfg)
    check_resume(cfg, rows)


def check_dataset(cfg):
    """Prepare the data exactly as the ranks will (same tokenizer or processor, same functions), require one step's
    rows; returns the number of training rows."""
    from finetune_launcher.data.text import require_one_step

    rows = training_rows(cfg)
    require_one_step(rows, cfg.world_size, cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.dataset)
    return rows


def training_rows(cfg):
    if cfg.recipe == "diffusion":
        from finetune_launcher.recipes.diffusion.data import run_pictures

        return len(run_pictures(cfg)[0])
    if cfg.recipe == "vision_language":
        from finetune_launcher.recipes.vision_language.data import prepare_vl_data
        from finetune_launcher.recipes.vision_language.model import load_processor

        return len(prepare_vl_data(cfg, load_processor(cfg)).train_rows)
    from finetune_launcher.data.text import prepare_data
    from finetune_launcher.recipes.causal_lm.model import load_tokenizer

    return len(prepare_data(cfg, load_tokenizer(cfg)).train_rows)


def check_resume(cfg, rows):
    """A checkpoint that `resume: auto` would continue must have been trained with this run's settings."""
    from finetune_launcher.data.text import steps_per_epoch

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
