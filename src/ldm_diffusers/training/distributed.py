"""Training on several processes with FSDP: what the stage-2 loop needs beyond ``accelerator.prepare``.

Under DDP (and on one process) every process holds the whole model, so diffusers' ``EMAModel`` over
``unet.parameters()`` and ``build_pipeline`` over the unwrapped module just work. Under FSDP (FULL_SHARD, FSDP1
with ``use_orig_params`` or FSDP2) each process holds only its shard of every parameter (FSDP1: a flat 1-D slice,
often empty; FSDP2: a ``DTensor``), and nothing outside FSDP's own forward sees a full parameter. Three things
then break, and this module mends them:

1. **EMA.** ``EMAModel`` clones the tensors it is given and averages them elementwise; it expects full
   parameters, and under FSDP2 it would hold ``DTensor``s that the export cannot copy into a plain UNet.
   :class:`ShardedEMA` keeps the average of *this process's shard* of each UNet parameter (no communication
   per step, 1/N of the memory: the reason to shard at all). Its ``state_dict()`` gathers the full averaged
   tensors and its ``load_state_dict()`` takes full tensors and keeps this process's shard, so an FSDP
   checkpoint's ``custom_checkpoint_0.pkl`` is the same file a DDP run writes (full ``shadow_params`` in
   ``unet.parameters()`` order) and resumes at any process count. Both are collectives: accelerate's
   ``save_state`` / ``load_state`` call them on every process, which is what they need.
2. **Export.** A pipeline needs full, plain modules on the main process, and gathering them is a collective:
   :meth:`ShardedTraining.export` is called by every process, gathers the full state dict (the EMA weights
   swapped into the UNet for the moment of the gather), and loads it on the main process into a copy of the
   module tree taken before ``accelerator.prepare`` on the meta device (no memory until the export).
3. **Launch checks.** accelerate 1.x applies an FSDP launch config only on accelerator devices: with ``--cpu``
   it runs DDP instead, and without ``--cpu`` on a machine with no GPU every process trains alone, all into the
   same output folder. FSDP1 also needs ``use_orig_params`` (a UNet-only EMA needs the UNet's own parameters,
   and the BERT pooler's frozen weights cannot share a flat parameter with trained ones otherwise), and the
   transformer auto-wrap policy raises on a class name the model lacks (a UNet without cross-attention has no
   ``BasicTransformerBlock``): :class:`ShardedTraining` warns, stops, or drops the absent names.
4. **FSDP1 resume.** accelerate 1.15 restores an FSDP1 sharded optimizer checkpoint into a template of the
   optimizer's current state, empty before AdamW's first step, so a resume silently restarts Adam's moments:
   :meth:`ShardedTraining.after_prepare` materialises that state just before ``load_state``. (FSDP2 is unaffected.)

Under DDP / DeepSpeed ZeRO-2 / one process everything here passes through: :meth:`ShardedTraining.make_ema`
returns diffusers' ``EMAModel`` (moved to the device again after a resume, which accelerate loads to the CPU;
float32 averages of bf16 weights) and :meth:`ShardedTraining.export` returns the unwrapped module and that EMA.

The loop's calls (see ``latent_diffusion.train``): ``ShardedTraining(accelerator, denoiser, share=...)`` before
``accelerator.prepare``; ``after_prepare(optimizer)`` and ``make_ema(denoiser, "unet", decay=...)`` after it;
``ema.step(raw.unet.parameters())`` as before; ``model, model_ema = export(denoiser, ema)`` on every process
wherever a pipeline is built (validation, evaluation, the final save), then ``build_pipeline(args, model, vae,
model_ema)`` on the main process. Checkpoints need nothing more: the EMA is registered for accelerate's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterable

import torch
import torch.nn as nn
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _init_optim_state,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

# FSDP units that exist in this package's models (verified against the classes diffusers/transformers build).
WRAP_CANDIDATES = ("BasicTransformerBlock", "ResnetBlock2D")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # FSDP1, checkpointing, compile


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: the local shard of an FSDP2 ``DTensor``; the tensor itself otherwise
    (FSDP1 with ``use_orig_params`` already exposes each parameter as a view of the local flat shard)."""

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of an FSDP1/FSDP2 (or DDP) model, on the CPU: on the main process only (``{}``
    elsewhere) when the model lives on an accelerator; on every process when it lives on the CPU, where torch
    2.13's FSDP1 crashes (SIGSEGV) gathering with ``offload_to_cpu``. Collective: every process calls it."""

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu))


def _set_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (the same on every process) into the listed parameters' shards. Collective."""

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


class ShardedEMA:
    """diffusers' ``EMAModel`` over this process's shards of the tracked parameters (see the module docstring).

    ``step(parameters)`` takes the same iterable the loop gives diffusers' EMA (``raw.unet.parameters()``);
    ``names`` are the tracked parameters' keys in ``full_state_dict(root)``, in that order."""

    def __init__(self, root: nn.Module, parameters: Iterable[torch.Tensor], names: list[str], **ema_kwargs):
        self._root, self._params, self._names = root, list(parameters), list(names)
        if len(self._params) != len(self._names):
            raise ValueError(f"{len(self._params)} parameters but {len(self._names)} names")
        self.ema = EMAModel([_local(p) for p in self._params], **ema_kwargs)

    # the loop's side: the same calls as on diffusers' EMAModel, on the local shards
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        self.ema.step([_local(p) for p in parameters])

    @property
    def optimization_step(self) -> int:
        return self.ema.optimization_step

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """This process's shards of the averages (use ``state_dict()`` for the full tensors)."""
        return self.ema.shadow_params

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged shards in the model's parameters for the duration, the trained ones back after (exactly:
        they are kept aside as copies of the local shards). Local: no communication."""
        live = [_local(p).detach().clone() for p in self._params]
        try:
            with torch.no_grad():
                for param, shadow in zip(self._params, self.ema.shadow_params):
                    _local(param).copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self._params, live):
                    _local(param).copy_(value)

    # accelerate's side (register_for_checkpointing): collectives, called by save_state / load_state everywhere
    def state_dict(self) -> dict:
        """diffusers' EMA state with full ``shadow_params`` (on the main process; ``[]`` on the others)."""
        with self.swapped_in():
            full = full_state_dict(self._root)
        state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        main = torch.distributed.get_rank() == 0
        state["shadow_params"] = [full[name] for name in self._names] if main else []
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state with full ``shadow_params`` (an FSDP or a DDP checkpoint's) and keep this process's shards."""
        shadows = state.get("shadow_params")
        self.ema.load_state_dict({k: v for k, v in state.items() if k != "shadow_params"})
        if shadows is None:
            return
        if len(shadows) != len(self._names):
            raise ValueError(f"The checkpoint's EMA has {len(shadows)} tensors; this model tracks {len(self._names)}.")
        live = [_local(p).detach().clone() for p in self._params]
        try:
            _set_full_state_dict(self._root, dict(zip(self._names, shadows)))
            self.ema.shadow_params = [_local(p).detach().clone() for p in self._params]
        finally:
            with torch.no_grad():
                for param, value in zip(self._params, live):
                    _local(param).copy_(value)


class DeviceEMA(EMAModel):
    """diffusers' ``EMAModel`` (DDP, DeepSpeed ZeRO-2, one process) that moves its averages back to ``device`` after
    ``load_state_dict`` (accelerate's ``load_state`` loads registered objects onto the CPU; the next ``step``
    against GPU parameters would fail), and keeps them in float32 at least: DeepSpeed's bf16 mode trains bf16
    weights, and a 0.9999 average of bf16 values cannot move (1e-4 of a step is below bf16's resolution)."""

    def __init__(self, parameters, device, **ema_kwargs):
        super().__init__(parameters, **ema_kwargs)
        self.device = device
        self.to(device)
        self.shadow_params = [p.float() if p.dtype in (torch.float16, torch.bfloat16) else p for p in self.shadow_params]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.to(self.device)


class ShardedTraining:
    """Create before ``accelerator.prepare(model, ...)`` (it copies the module tree onto the meta device under
    FSDP, checks the launch and fixes the auto-wrap class list); then :meth:`make_ema` after ``prepare`` and
    :meth:`export` (on every process) wherever a pipeline is built.

    ``share``: objects the copy keeps by reference instead of copying (the ``Denoiser``'s frozen parts and mode).
    """

    def __init__(self, accelerator, model: nn.Module, share: Iterable = ()):
        self.accelerator = accelerator
        self.fsdp = is_fsdp(accelerator)
        self._share = [obj for obj in share if obj is not None]
        self._template = None
        check_launch(accelerator)
        if self.fsdp:
            _fit_wrap_policy(accelerator.state.fsdp_plugin, model)
            memo = self._memo()
            for param in model.parameters():
                memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            for module in model.modules():  # torch.compile's wrapper is bound to the original module
                compiled = module.__dict__.get("_compiled_call_impl")
                if compiled is not None:
                    memo[id(compiled)] = None
            self._template = copy.deepcopy(model, memo)

    def _memo(self) -> dict:
        return {id(obj): obj for obj in self._share}

    def after_prepare(self, optimizer) -> None:
        """Call once after ``accelerator.prepare`` (before resuming). FSDP1: accelerate (1.15) loads a sharded optimizer
        checkpoint into a template made from the optimizer's current state, which AdamW creates only at its first
        step: resuming would silently restart Adam's moments. Materialise the state (torch's zero-gradient, zero-lr
        step) just before any ``load_state``; a run that does not resume is untouched. No-op otherwise."""
        if not (self.fsdp and self.accelerator.state.fsdp_plugin.fsdp_version == 1):
            return

        load_state = self.accelerator.load_state

        def load_state_into_materialised_optimizer(*args, **kwargs):
            _init_optim_state(getattr(optimizer, "optimizer", optimizer))
            return load_state(*args, **kwargs)

        self.accelerator.load_state = load_state_into_materialised_optimizer

    def make_ema(self, prepared: nn.Module, submodule: str, **ema_kwargs):
        """The EMA of ``unwrap(prepared).<submodule>``, registered for checkpointing. ``ema_kwargs`` go to
        diffusers' ``EMAModel`` (``decay``, ...). Call after ``accelerator.prepare``."""
        raw = self.accelerator.unwrap_model(prepared)
        tracked = raw.get_submodule(submodule)
        if self.fsdp:
            template = self._template.get_submodule(submodule)
            names = [f"{submodule}.{name}" for name, _ in template.named_parameters()]
            live = [f"{submodule}.{_clean_name(name)}" for name, _ in tracked.named_parameters()]
            if live != names:
                raise RuntimeError(f"FSDP reordered or renamed the parameters of {submodule}: {live[:3]}... vs {names[:3]}...")
            ema = ShardedEMA(prepared, tracked.parameters(), names, model_cls=type(template), model_config=template.config,
                             **ema_kwargs)
        else:
            ema = DeviceEMA(tracked.parameters(), self.accelerator.device, model_cls=type(tracked),
                             model_config=tracked.config, **ema_kwargs)
        self.accelerator.register_for_checkpointing(ema)
        return ema

    def export(self, prepared: nn.Module, ema=None):
        """``(module, ema)`` to build a pipeline from on the main process. DDP / one process: the unwrapped module
        and ``ema`` as they are. FSDP: a plain copy of the module with the full weights, the EMA ones already in
        the tracked submodule, and ``None`` for the EMA; ``(None, None)`` on the other processes.
        Collective under FSDP: every process must call it, at the same point."""
        if not self.fsdp:
            return self.accelerator.unwrap_model(prepared), ema
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            state = full_state_dict(prepared)
        if not self.accelerator.is_main_process:
            return None, None
        module = copy.deepcopy(self._template, self._memo())
        module.load_state_dict(state, strict=True, assign=True)
        return module.to(self.accelerator.device), None


def check_launch(accelerator) -> None:
    """Stop a launch that would not do what it asks for (see the module docstring); warn where accelerate
    silently runs DDP instead of the FSDP the launch config asks for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise SystemExit(
            f"{world} processes were launched but accelerate set up none of them for distributed training (no "
            "accelerator found): each would train alone into the same --output_dir. On CPUs launch with --cpu "
            "(or ACCELERATE_USE_CPU=1) for DDP over gloo; FSDP and DeepSpeed need GPUs with accelerate."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not is_fsdp(accelerator):
        logger.warning("The launch config asks for FSDP but accelerate runs %s (it applies FSDP on accelerators "
                       "only): the model is replicated, not sharded.", accelerator.distributed_type)
    if is_fsdp(accelerator):
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise SystemExit("FSDP1 needs fsdp_use_orig_params: true here (the EMA tracks the UNet's own parameters "
                             "and frozen weights share a module with trained ones); or use fsdp_version: 2.")


def _fit_wrap_policy(plugin, model: nn.Module) -> None:
    """Keep only the auto-wrap class names the model has (accelerate raises on an absent one); with none given,
    wrap the :data:`WRAP_CANDIDATES` it has. One config then serves every conditioning mode."""

    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    present = {type(module).__name__ for module in model.modules()}
    wanted = plugin.transformer_cls_names_to_wrap or list(WRAP_CANDIDATES)
    kept = [name for name in wanted if name in present]
    dropped = sorted(set(wanted) - set(kept))
    if dropped:
        logger.info("FSDP auto-wrap: this model has no %s; wrapping %s.", ", ".join(dropped), ", ".join(kept) or "the root only")
    plugin.transformer_cls_names_to_wrap = kept
