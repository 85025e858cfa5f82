"""The language-model task the shared loop trains (causal LMs; vision-language rows carry image tensors too): the
token-normalised loss of the model's own forward, an eval loss over the whole eval split, adapters or full weights
saved to best/ and final/ with the tokenizer (or processor) beside them."""
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.checkpoint import save_weights
from finetune_launcher.data.prepared import row_length
from finetune_launcher.data.text import IGNORE_INDEX, supervised_tokens
from finetune_launcher.distributed import RankContext, all_reduce_sum
from finetune_launcher.task import Engine, Sampler, StepTask

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig


class LanguageModelTask(StepTask):
    unit = "token"
    throughput = "tokens"

    def __init__(self, cfg: "RunConfig", ctx: RankContext, model: torch.nn.Module, saver: Any, sampler: Sampler,
                 rows: Sequence[dict[str, Any]], eval_rows: Sequence[dict[str, Any]],
                 collate_rows: Callable[[list[dict[str, Any]]], dict], stats: dict) -> None:
        """`sampler` deals indices of `rows`; `collate_rows(rows)` -> a batch dict; `saver`: the tokenizer or
        processor saved beside the weights."""
        super().__init__(cfg, ctx, sampler, stats)
        self.model, self.saver, self.collate_rows = model, saver, collate_rows
        self.rows, self.eval_rows = rows, eval_rows

    def collate(self, group: Sequence[int], epoch: int, step_in_epoch: int, micro: int) -> dict:
        return self.collate_rows([self.rows[i] for i in group])

    def count(self, group: Sequence[int], batch: dict) -> tuple[int, int, int]:
        return supervised_tokens(batch), sum(row_length(self.rows, i) for i in group), int(batch["input_ids"].numel())

    def loss(self, engine: Engine, batch: dict, normaliser: float) -> torch.Tensor:
        return engine(**batch, num_items_in_batch=normaliser, use_cache=False).loss

    def evaluate(self, engine: Engine) -> float | None:
        """Token-weighted eval loss over the whole eval split; every rank runs the same number of forwards (ZeRO-3
        gathers are collective), padding its share with fully masked copies of a row."""
        if not self.eval_rows:
            return None
        engine.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for chunk in eval_row_groups(self.eval_rows, self.ctx.rank, self.ctx.world, self.c.micro_batch_size):
                batch = self.to_device(self.collate_rows(chunk))
                n = supervised_tokens(batch)
                loss = engine(**batch, num_items_in_batch=1.0, use_cache=False).loss
                loss_sum += float(loss) if n else 0.0
                tokens += n
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens], self.ctx.device)
        return loss_sum / max(tokens, 1.0)

    def save_weights(self, engine: Engine, out_dir: Path, info: dict) -> None:
        save_weights(engine, self.model, self.saver, out_dir, self.c.mode, self.ctx.rank, info)


def eval_row_groups(rows: Sequence[dict[str, Any]], rank: int, world_size: int,
                    micro_batch_size: int) -> list[list[dict[str, Any]]]:
    """This rank's eval micro-batches (lists of rows, neighbours in length), the same number on every rank: a rank
    short of rows gets a copy of a row with every label masked (it contributes no loss but runs the same modules:
    ZeRO-3 gathers are collective)."""
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))
    mine = ordered[rank::world_size]
    n_batches = math.ceil(math.ceil(len(rows) / world_size) / micro_batch_size)
    groups = []
    for i in range(n_batches):
        chunk = mine[i * micro_batch_size:(i + 1) * micro_batch_size]
        groups.append(chunk or [dict(ordered[0], labels=[IGNORE_INDEX] * len(ordered[0]["labels"]))])
    return groups
