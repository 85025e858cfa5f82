"""The router's balance in an MoE run: the load-balancing auxiliary loss in each micro-batch's training loss, and
each layer's expert load over a logging interval (the busiest and the idlest expert's share of the tokens the
layer routed) for the history and tensorboard, with a warning for experts that got no token at all.

The loop normalises a micro-batch's token loss by the supervised tokens of the whole step (`num_items_in_batch`)
and the engine then averages micro-batches and ranks, so the step's loss is sum(token losses) / (all tokens).
The auxiliary loss is a mean over the micro-batch's routed tokens already: it is added to each micro-batch's loss
once, times the coefficient, and not divided by the token count, so the step optimises the token-mean loss plus
coefficient x the mean of the micro-batches' auxiliary losses (what transformers' own loss does per forward)."""
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.console import warn

if TYPE_CHECKING:
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    from finetune_launcher.config.settings import RunConfig
    from finetune_launcher.distributed import RankContext


class RouterBalance:
    def __init__(self, coefficient: float, num_experts: int, top_k: int, device: torch.device,
                 is_main: bool) -> None:
        self.coefficient, self.num_experts, self.top_k = coefficient, num_experts, top_k
        self.device, self.is_main = device, is_main
        self.counts = None  # [layers, experts] tokens routed since the last log, on the device (no host sync)
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.forwards = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, cfg: "RunConfig", ctx: "RankContext") -> "RouterBalance | None":
        """The balance of `model`'s routers, or None for a dense model. Takes the coefficient from the run config
        (router_aux_loss_coef), else from the model's config, and stops transformers from adding the auxiliary
        loss itself (it is added here, kept out of the logged loss)."""
        config = model.config
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        if not experts or not hasattr(config, "output_router_logits"):
            return None
        coefficient = cfg.router_aux_loss_coef
        if coefficient is None:
            coefficient = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
        for module in model.modules():  # the CausalLM under peft and DeepSpeed wrappers
            if hasattr(module, "router_aux_loss_coef"):
                module.router_aux_loss_coef = 0.0
        return cls(coefficient, int(experts), int(config.num_experts_per_tok), ctx.device, ctx.is_main)

    def loss(self, output: "MoeCausalLMOutputWithPast") -> torch.Tensor:
        """The micro-batch's training loss from the model's output (run with output_router_logits=True): the token
        loss plus coefficient x the auxiliary loss. Its value is the token loss alone (what the history logs and
        eval measures); its gradient has both."""
        self.record(output.router_logits, output.aux_loss)
        aux = output.aux_loss.to(output.loss.dtype)
        return output.loss + self.coefficient * (aux - aux.detach())

    @torch.no_grad()
    def record(self, router_logits: Sequence[torch.Tensor], aux_loss: torch.Tensor) -> None:
        logits = torch.stack([layer.to(self.device) for layer in router_logits])  # [layers, tokens, experts]
        chosen = logits.topk(self.top_k, dim=-1).indices.reshape(len(router_logits), -1)
        if self.counts is None:
            self.counts = torch.zeros(len(router_logits), self.num_experts, dtype=torch.float64, device=self.device)
        self.counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=torch.float64))
        self.aux_sum += aux_loss.detach().double()
        self.forwards += 1

    def metrics(self, step: int) -> dict[str, Any]:
        """aux_loss (mean over the interval's forwards) and expert_load {busiest, idlest} per layer (shares of the
        layer's routed tokens: 1/experts each when balanced), summed over all ranks since the last call; warns
        about experts that got no token. Every rank calls it (a collective)."""
        import torch.distributed as dist

        if self.counts is None:
            return {}
        totals = torch.cat([self.counts.flatten(), self.aux_sum.reshape(1),
                            torch.tensor([float(self.forwards)], dtype=torch.float64, device=self.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        counts = totals[:-2].reshape(self.counts.shape).cpu()
        aux_mean = float(totals[-2] / totals[-1])
        self.counts.zero_()
        self.aux_sum.zero_()
        self.forwards = 0
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        if self.is_main:
            warn_idle(counts, step)
        return {"aux_loss": aux_mean,
                "expert_load": {"busiest": [round(v, 4) for v in share.max(dim=1).values.tolist()],
                                "idlest": [round(v, 4) for v in share.min(dim=1).values.tolist()]}}


def warn_idle(counts: torch.Tensor, step: int) -> None:
    idle = {layer: [e for e in range(counts.shape[1]) if counts[layer, e] == 0] for layer in range(counts.shape[0])}
    idle = {layer: experts for layer, experts in idle.items() if experts}
    if idle:
        layers = "; ".join(f"layer {layer}: expert{'s' if len(e) > 1 else ''} {', '.join(map(str, e))}"
                           for layer, e in idle.items())
        warn(f"step {step}: experts that got no token since the last log ({layers}). A router that stops using "
             f"experts wastes them; raise router_aux_loss_coef to push tokens back to them")
