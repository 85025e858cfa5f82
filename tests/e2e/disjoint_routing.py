"""Routing that differs by rank, for the MoE tests: imported by every process of a run (FTL_RECIPES names this
module; the launcher imports it before it forks the ranks), it makes rank r's Qwen3-MoE routers choose among experts
3r, 3r+1 and 3r+2 only, as data would whose ranks meet different experts. With 2 ranks and 8 experts, rank 0 uses
experts 0-2, rank 1 experts 3-5, and experts 6 and 7 get no token at all. Both ZeRO stages see the same routing, so
their losses must agree; under ZeRO-3 the ranks compute with different experts at every MoE block."""
import os

import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

EXPERTS_PER_RANK = 3
_original_forward = Qwen3MoeTopKRouter.forward


def rank_bias(num_experts, device):
    rank = int(os.environ.get("RANK", "0"))
    bias = torch.full((num_experts,), -30.0, device=device)
    bias[EXPERTS_PER_RANK * rank:EXPERTS_PER_RANK * (rank + 1)] = 0.0
    return bias


def routed_by_rank(self, hidden_states):
    """Qwen3MoeTopKRouter.forward with the rank's bias on the router logits (transformers 5.23's code otherwise)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states, self.weight)
    router_logits = router_logits + rank_bias(self.num_experts, router_logits.device).to(router_logits.dtype)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    return router_logits, router_top_value.to(router_logits.dtype), router_indices


Qwen3MoeTopKRouter.forward = routed_by_rank
