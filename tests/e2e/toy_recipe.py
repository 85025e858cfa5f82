"""A fourth recipe kept outside the package, as docs/design.md says one is added: the recipe-table entry (with a key
of its own and a claim on its models) and the parts the table names by role (`train`, `rows`, `model_facts`),
built from the shared parts only. It fits y = x . w on rows of a JSONL file of {"x": [...], "y": ...} with a linear
model named `toy:linear-N`. Registered by importing this module (FTL_RECIPES=tests.e2e.toy_recipe)."""
import json
from pathlib import Path

import torch

from finetune_launcher import recipe_table
from finetune_launcher.data.prepared import PreparedData, rank_rows
from finetune_launcher.data.sampling import ShardedSampler
from finetune_launcher.distributed import all_reduce_sum
from finetune_launcher.engines import build_engine
from finetune_launcher.loop import train
from finetune_launcher.models.prepare import count_parameters
from finetune_launcher.task import StepTask

RECIPE = recipe_table.register(recipe_table.Recipe(
    name="toy_regression", package="tests.e2e", summary="linear regression on JSONL rows (a test recipe)",
    modes=("full",), engines=("deepspeed", "ddp"), compile_layers="a linear model has no decoder layers",
    unit="sample",
    keys=(recipe_table.Key("target_scale", 1.0, {"type": "number", "exclusiveMinimum": 0}, identity=True,
                           help="y is multiplied by this before training"),),
    modules={"train": "toy_recipe:run", "rows": "toy_recipe:prepare_rows", "model_facts": "toy_recipe:facts"}))


def facts(values, require_model=True):
    if not str(values["model"]).startswith("toy:"):
        return None
    width = int(values["model"].rpartition("-")[2])
    return recipe_table.ModelFacts(model_type="toy", hidden_size=width, widest=width)


def prepare_rows(cfg):
    rows = [json.loads(line) for line in Path(cfg.dataset).read_text().splitlines() if line.strip()]
    rows = [{"x": row["x"], "y": row["y"] * cfg.target_scale} for row in rows]
    held = max(1, int(len(rows) * cfg.eval_fraction))
    return PreparedData(rows[held:], rows[:held], {"format": "toy", "train_rows": len(rows) - held})


class ToyTask(StepTask):
    unit = "sample"
    throughput = "images"

    def __init__(self, cfg, ctx, model, data):
        sampler = ShardedSampler(len(data.train_rows), ctx.rank, ctx.world, cfg.micro_batch_size,
                                 cfg.gradient_accumulation_steps, cfg.seed)
        super().__init__(cfg, ctx, sampler, data.stats)
        self.model, self.rows, self.eval_rows = model, data.train_rows, data.eval_rows

    def collate(self, group, epoch, step_in_epoch, micro):
        return tensors([self.rows[i] for i in group])

    def count(self, group, batch):
        return len(group), len(group), len(group)

    def loss(self, engine, batch, normaliser):
        return ((engine(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum() / normaliser

    def evaluate(self, engine):
        batch = tensors(self.eval_rows[self.ctx.rank::self.ctx.world] or self.eval_rows[:1])
        with torch.no_grad():
            total = float(((engine(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum())
        total, count = all_reduce_sum([total, len(batch["y"])], self.ctx.device)
        return total / count

    def save_weights(self, engine, out_dir, info):
        if self.ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, out_dir / "model.pt")


def tensors(rows):
    return {"x": torch.tensor([row["x"] for row in rows], dtype=torch.float32),
            "y": torch.tensor([row["y"] for row in rows], dtype=torch.float32)}


def run(cfg, ctx, watch):
    data = rank_rows(cfg, prepare_rows)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = torch.nn.Linear(int(cfg.model.rpartition("-")[2]), 1)
    engine = build_engine(model, cfg, ctx.device, ctx.world)
    return train(cfg, ctx, ToyTask(cfg, ctx, model, data), engine, watch, count_parameters(model))
