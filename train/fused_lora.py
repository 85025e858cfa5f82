"""LoRA's output in one GEMM: `base(x) + scale * (x A^T) B^T` as torch.addmm, instead of peft's B-matmul, multiply
and add as three passes over the full-width output (forward and backward). Same function, fewer bytes moved; the
unfused path rounds to 16 bits three times, this one once.

Applied to peft's plain and bitsandbytes-4-bit LoRA linears with one adapter, no dropout and no variant (DoRA);
anything else (adapters disabled or merged, mixed-adapter batches) falls back to peft's own forward at call time.
"""
from types import MethodType

import torch


def _eligible(module):
    adapters = list(module.lora_A.keys())
    if len(adapters) != 1:
        return False
    name = adapters[0]
    return (isinstance(module.lora_dropout[name], torch.nn.Identity) and name not in getattr(module, "lora_variant", {})
            and not getattr(module, "lora_bias", {}).get(name, False))


def _fused_forward(self, x, *args, **kwargs):
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A:
        return self._peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    flat = x.reshape(-1, x.shape[-1]).to(weight_a.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]).to(weight_b.dtype), flat @ weight_a.t(), weight_b.t(),
                      alpha=self.scaling[name])
    return out.view(*result.shape[:-1], out.shape[-1]).to(result.dtype)


def fuse_lora_layers(model):
    """Patch every eligible LoRA linear of a peft model in place; returns how many were patched."""
    from peft.tuners.lora import layer

    classes = [layer.Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except (ImportError, AttributeError):  # bitsandbytes missing
        pass
    patched = 0
    for module in model.modules():
        if isinstance(module, tuple(classes)) and _eligible(module):
            module._peft_forward = module.forward
            module.forward = MethodType(_fused_forward, module)
            patched += 1
    return patched
