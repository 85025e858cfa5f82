"""`engine: fsdp2`: torch's FSDP2 (`fully_shard`) for the runs that must shard, instead of DeepSpeed ZeRO-3, whose
gather, release and re-partition hooks run in Python around every module. Each transformer block (decoder layers,
vision blocks, the CLIP text encoder's layers), each UNet down/mid/up block, the input embeddings and the output
head are sharded units, the root last: a unit's parameters are all-gathered in one collective just before it runs
and freed after, its gradients reduce-scattered in one.

What trains is sharded in fp32 (the master weights the optimizer steps); frozen weights (a LoRA base, NF4 weights
stored in the compute dtype) stay in the compute dtype. The gathered copy computes in the run's precision and the
gradients are reduced in fp32 (MixedPrecisionPolicy). LoRA's accumulation reduces only on the last micro-batch of a
step (set_requires_gradient_sync; a full fine-tune reduces every micro-batch into its sharded gradients, as ZeRO-3
does); the clip runs over the sharded gradients and leaves the norm on the device for the loop's one host sync.

Checkpoints go through torch.distributed.checkpoint (DCP), which reshards on load: a run saved on 2 processes
resumes on 1 and the reverse. best/ and final/ get whole tensors from `full_state_dict` (gathered to rank 0)."""
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from finetune_launcher.console import say
from finetune_launcher.distributed import all_reduce_sum
from finetune_launcher.engines.torch_engine import TorchEngine
from finetune_launcher.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    from finetune_launcher.config.settings import RunConfig

STATE_FILE = "fsdp2_engine.pt"  # beside DCP's files: the loop's client state
DCP_METADATA = ".metadata"


class FSDP2Engine(TorchEngine):
    kind = "fsdp2"

    def __init__(self, model: torch.nn.Module, cfg: "RunConfig",
                 make_optimizer: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer], device: torch.device,
                 world_size: int, same_start_everything: bool = False) -> None:
        """`same_start_everything`: broadcast every weight from rank 0, not only the trainable ones (a random-init
        model differs by rank; under models.references.loads_on_rank0 the other ranks hold meta tensors)."""
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(model, cfg, device, world_size)
        # Skipping the reduce-scatter keeps a micro-batch's gradients unsharded (fp32) until the step's last one:
        # a few MB of adapters, but for a full fine-tune the whole model's, which sharding exists to avoid.
        self.reduce_every_micro_batch = cfg.mode == "full"
        mesh = init_device_mesh(device.type, (world_size,))
        quantized = four_bit_states(model)
        on_meta = 0
        if same_start_everything and world_size > 1:
            on_meta = int(all_reduce_sum([sum(p.is_meta for p in model.parameters())], device)[0])
            same_buffers(model, mesh.device_type)
        units = sharding_units(model)
        kinds = Counter(type(unit).__name__ for unit in units)
        for unit in [*units, model]:
            shard_unit(unit, model, mesh, self.dtype, same_start_everything)
        prepare_4bit_weights(model, quantized)
        say(f"fsdp2: {len(units)} units and the root sharded over {world_size} process"
            f"{'es' if world_size > 1 else ''} ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})")
        if on_meta:
            say(f"fsdp2: the weights were loaded by rank 0 only; the other ranks built the model on the meta device "
                f"and got rank 0's values for their {on_meta} weight tensors as each unit was sharded")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)

    # ------------------------------------------------------------ the step

    def backward(self, loss: torch.Tensor) -> None:
        self.module.set_requires_gradient_sync(self.reduce_every_micro_batch or self.at_boundary())
        (loss / self.accumulation).backward()  # DeepSpeed's 1/accumulation (the reduce-scatter averages over ranks)

    def step(self) -> None:
        if self.at_boundary():
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm(), foreach=True)
            self._global_grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1

    def zero_optimization_stage(self) -> int:
        return 3  # parameters, gradients and optimizer states sharded, as ZeRO-3 shards them

    # ------------------------------------------------------------ weights and checkpoints

    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Whole tensors in the run's precision on rank 0 (None on the others), gathered one at a time: the
        trainable weights only, or the whole state dict. Every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.module, options=options)
        if dist.get_rank() != 0:
            return None
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def save_checkpoint(self, save_dir: str | Path, tag: str, client_state: dict[str, Any], save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> None:
        import torch.distributed.checkpoint as dcp

        path = Path(save_dir) / tag
        dcp.save(self.sharded_state(exclude_frozen_parameters), checkpoint_id=str(path))
        if dist.get_rank() == 0:
            torch.save({"format": "finetune-launcher fsdp2 engine 1", "client_state": client_state}, path / STATE_FILE)

    def load_checkpoint(self, load_dir: str | Path, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = False,
                        load_module_strict: bool = False) -> tuple[str, dict[str, Any]]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = Path(load_dir) / tag
        if not (path / DCP_METADATA).is_file() or not (path / STATE_FILE).is_file():
            raise ConfigError(f"{path}: not a checkpoint of the fsdp2 engine (no DCP {DCP_METADATA} and "
                              f"{STATE_FILE}); resume it with the engine that wrote it, or start fresh with "
                              f"--resume never")
        adapters_only = not load_module_strict
        state = self.sharded_state(adapters_only)
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self.state_options(adapters_only))
        return str(path), torch.load(path / STATE_FILE, weights_only=False)["client_state"]

    def sharded_state(self, adapters_only: bool) -> dict[str, dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.module, self.optimizer, options=self.state_options(adapters_only))
        return {"model": model, "optimizer": optimizer}

    @staticmethod
    def state_options(adapters_only: bool) -> "StateDictOptions":
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)


# ---------------------------------------------------------------- the units

def sharding_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules sharded as units of their own (the caller shards the root last): transformer blocks, a UNet's
    down, mid and up blocks, and each transformers model's input embeddings and output head (both left to the root
    when they share one weight)."""
    from finetune_launcher.models.compiled_layers import decoder_layers

    units = decoder_layers(model)
    for module in model.modules():
        if all(hasattr(module, name) for name in ("down_blocks", "mid_block", "up_blocks")):
            units += [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []),
                      *module.up_blocks]
    for pretrained in outermost_transformers_models(model):
        units += embeddings_and_head(pretrained)
    return units


def outermost_transformers_models(model: torch.nn.Module) -> list["PreTrainedModel"]:
    from transformers import PreTrainedModel

    found = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(outer + ".") or outer == ""
                                                           for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def embeddings_and_head(pretrained: "PreTrainedModel") -> list[torch.nn.Module]:
    try:
        embeddings, head = pretrained.get_input_embeddings(), pretrained.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if embeddings is not None and head is not None and head.weight is embeddings.weight:
        return []  # tied: one parameter, one unit (the root's)
    return [m for m in (embeddings, head) if m is not None and next(m.parameters(), None) is not None]


def shard_unit(unit: torch.nn.Module, model: torch.nn.Module, mesh: "DeviceMesh", dtype: torch.dtype,
               same_start_everything: bool) -> None:
    """Bring the unit's own weights (those no inner unit holds yet) to the same start on every rank and to their
    dtypes -- fp32 what trains, the compute dtype what is frozen -- then shard it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    materialize_meta_parameters(unit, mesh.device_type)
    own = [p for p in unit.parameters() if not is_sharded(p)]
    for param in own:
        if (param.requires_grad or same_start_everything) and not is_4bit(param):
            param.data = param.data.to(mesh.device_type)
            if mesh.size() > 1:
                dist.broadcast(param.data, src=0)  # LoRA adapters are initialised with a per-rank seed
        wanted = torch.float32 if param.requires_grad else dtype
        if param.is_floating_point() and param.dtype != wanted and not is_4bit(param):
            param.data = param.data.to(wanted)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # The root's weights are needed again as soon as the backward starts: kept gathered after the forward.
    fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=unit is not model)


def materialize_meta_parameters(unit: torch.nn.Module, device_type: str) -> None:
    """Memory on the device for the meta-device parameters of `unit` (a rank that built the model on the meta
    device, models.references.loads_on_rank0): new Parameters, a tied one shared as before; their values come from
    rank 0's broadcast in shard_unit."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in unit.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device=device_type),
                                                     requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]


def same_buffers(model: torch.nn.Module, device_type: str) -> None:
    """Every buffer (RoPE's inv_freq, ...) on the device with rank 0's values; a meta buffer (a rank that built the
    model on the meta device) gets its memory here."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            value = torch.empty_like(buffer, device=device_type) if buffer.is_meta else buffer.to(device_type)
            dist.broadcast(value, src=0)
            module._buffers[name] = value


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


# ---------------------------------------------------------------- bitsandbytes 4-bit weights (QLoRA)

def is_4bit(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


def four_bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]


def four_bit_states(model: torch.nn.Module) -> dict[torch.nn.Module, tuple[int, Any]]:
    """{module: (a checksum of its packed NF4 bytes, its quantization state)} before sharding. The storage dtype is a
    float type only so FSDP can shard it: its bytes are not numbers. Sharding turns the weight into a plain tensor
    without bitsandbytes' quantization state."""
    return {m: (bytes_checksum(m.weight.data), m.weight.quant_state) for m in four_bit_modules(model)}


def bytes_checksum(tensor: torch.Tensor) -> int:
    return int(tensor.detach().contiguous().view(torch.uint8).sum(dtype=torch.int64))


def prepare_4bit_weights(model: torch.nn.Module, states: Mapping[torch.nn.Module, tuple[int, Any]]) -> None:
    """Gather each unit holding NF4 weights once: check that sharding kept their bytes (bitsandbytes #1945 reports
    NaN bit patterns of packed bf16 storage rewritten on some paths), and give the gathered parameter -- FSDP keeps
    that object for the whole run -- its quantization state, so bitsandbytes does not wrap it anew at every forward
    (which would also defeat compiled layers)."""
    if not states:
        return
    from torch.distributed.fsdp import FSDPModule

    owners = owning_units(model)
    for unit in [m for m in model.modules() if isinstance(m, FSDPModule)]:
        mine = [m for m in states if owners[m] is unit]
        if not mine:
            continue
        unit.unshard()
        for module in mine:
            checksum, quant_state = states[module]
            if bytes_checksum(module.weight.data) != checksum:
                raise ConfigError("key 'engine': fsdp2 changed the bytes of a 4-bit weight while sharding it "
                                  "(bitsandbytes #1945); run this QLoRA with engine: deepspeed")
            quant_state.to(module.weight.device)  # in place
            module.weight.quant_state = module.quant_state = quant_state
        unit.reshard()


def owning_units(model: torch.nn.Module) -> dict[torch.nn.Module, "FSDPModule"]:
    """{module: the innermost FSDP unit whose subtree holds it} (outer units come first in modules())."""
    from torch.distributed.fsdp import FSDPModule

    owners: dict[torch.nn.Module, FSDPModule] = {}
    for unit in [m for m in model.modules() if isinstance(m, FSDPModule)]:
        owners.update({sub: unit for sub in unit.modules()})
    return owners
