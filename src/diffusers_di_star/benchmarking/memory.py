"""Training memory, computed without allocating it (docs/benchmarks.md, "Training memory, computed").

ONE module for every memory figure the package computes:

* :func:`estimate_iteration_memory` — the PEAK of one DI* iteration (``di-star bench memory``): the training
  benchmark's iteration (:class:`~.training.DIStarIteration`: ``encode_prompts``, ``assistant_loss`` → backward →
  clip → optimiser step, ``generator_loss`` → backward → clip → step) runs on full-size SDXL made of fake tensors
  (``FakeTensorMode``: shapes, dtypes and storages, no data), while :class:`LiveMemory` adds up the bytes of every live
  storage by part (weights, gradients, optimiser states, activations) and keeps the peak, per GPU for FSDP2 over N
  GPUs. Checked against a real CPU run at a small size (:func:`measure_cpu_peak`; the stated tolerance is
  :data:`CPU_AGREEMENT`).
* :func:`static_training_memory` and :func:`fsdp_full_finetuning_memory_gb` — what a layout keeps resident before any
  activation, counted from the modules built on the meta device.

torch's own ``MemTracker`` (torch.distributed._tools) cannot run the DI* iteration: it installs gradient hooks on every
parameter of a module at its first call (``RuntimeError`` on the frozen reference) and refuses a module called twice
per iteration (``NotImplementedError``; one UNet plays three roles here). :class:`~.live_memory.LiveMemory` keeps its
method without the per-module bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._pytree import tree_leaves

from ..training.engine import all_finite
from ..weights import DTYPES
from .components import SIZES, ModelSize, build_pickscore_reward, build_text_encoders, build_unet, build_vae
from .live_memory import PARTS, LiveMemory
from .report import SuiteResult, markdown_table
from .settings import TRAINING_LAYOUTS, BenchSettings

__all__ = [
    "ADAM_STATES",
    "CPU_AGREEMENT",
    "OPTIMIZERS",
    "PARTS",
    "LiveMemory",
    "MemoryEstimate",
    "MemorySetting",
    "estimate_iteration_memory",
    "fsdp_full_finetuning_memory_gb",
    "measure_cpu_peak",
    "run_memory_benchmark",
    "sdxl_parameter_counts",
    "static_training_memory",
]

#: AdamW keeps two float32 moments (exp_avg, exp_avg_sq) per trainable parameter.
ADAM_STATES = 2
_META, _CPU = torch.device("meta"), torch.device("cpu")


def _bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def static_training_memory(layout: str, settings: BenchSettings) -> dict[str, int]:
    """Bytes per part for ``layout`` at ``settings.size``: ``weights``, ``adam_states``, ``gradients``, ``total``,
    plus ``trainable_parameters`` (both roles, a count, not bytes)."""
    from .training import _config, build_networks  # training imports this module's users; keep the cycle lazy

    meta = dataclasses.replace(settings, device=_META)
    networks = build_networks(layout, _config(meta), meta)
    trainable = {role: list(networks.trainable_parameters(role)) for role in ("generator", "assistant")}
    modules = [networks.generator_unet, networks.assistant_unet, networks.reference_unet]
    modules += list(build_text_encoders(meta.size, _META, torch.bfloat16)[1])
    modules.append(build_vae(meta.size, _META, torch.bfloat16))
    if settings.reward:
        modules.append(build_pickscore_reward(meta.size, _META).clip)
    unique = {id(p): p for module in modules for p in module.parameters()}  # one UNet may play several roles
    weights = _bytes(unique.values())
    adam = ADAM_STATES * sum(_bytes(params) for params in trainable.values())
    gradients = max(_bytes(params) for params in trainable.values())
    return {
        "weights": weights,
        "adam_states": adam,
        "gradients": gradients,
        "total": weights + adam + gradients,
        "trainable_parameters": sum(p.numel() for params in trainable.values() for p in params),
    }


def sdxl_parameter_counts() -> dict[str, int]:
    """Parameter counts of full-size SDXL base's UNet, both text encoders and VAE, built on the meta device."""
    full = SIZES["full"]
    modules = {
        "unet": [build_unet(full, _META, torch.float32)],
        "text_encoders": build_text_encoders(full, _META, torch.float32)[1],
        "vae": [build_vae(full, _META, torch.float32)],
    }
    return {name: sum(p.numel() for m in group for p in m.parameters()) for name, group in modules.items()}


def fsdp_full_finetuning_memory_gb(num_gpus: int, counts: dict[str, int] | None = None) -> dict[str, float]:
    """Computed (not measured) GB per GPU of DI* full finetuning under FSDP full sharding over ``num_gpus``.

    Generator and assistant: float32 weights and AdamW's two float32 moments, sharded; float32 gradients of ONE of
    them (each network's are freed after its optimiser step, as in :func:`static_training_memory`), sharded; the
    frozen reference in float32, sharded (the trainer keeps FSDP's units float32); text encoders and VAE in bf16,
    replicated. Excludes activations, FSDP's all-gather buffers, the reward model and allocator overhead.
    """
    counts = counts or sdxl_parameter_counts()
    unet, gb = counts["unet"], 1e9
    rows = {
        "generator + assistant weights": 2 * 4 * unet / num_gpus / gb,
        "one network's gradients": 4 * unet / num_gpus / gb,
        "their AdamW states": 2 * ADAM_STATES * 4 * unet / num_gpus / gb,
        "frozen reference": 4 * unet / num_gpus / gb,
        "text encoders + VAE (bf16, replicated)": 2 * (counts["text_encoders"] + counts["vae"]) / gb,
    }
    rows["total"] = sum(rows.values())
    return rows


# -- the peak of one DI* iteration, computed on fake tensors ---------------------------------------------------------

#: FSDP2 all-gathers each wrapped block's parameters (bf16) around its use: this part of the per-GPU figures.
ALL_GATHER = "FSDP all-gather"
#: ``adamw``: torch's AdamW (two float32 moments). ``adamw8bit``: the trainer's ``--use_8bit_adam``
#: (bitsandbytes' blockwise AdamW8bit), counted by its state tensors (:class:`_AdamW8bitStates`).
OPTIMIZERS = ("adamw", "adamw8bit")
#: The blocks the shipped FSDP2 configs wrap (``fsdp_transformer_layer_cls_to_wrap``).
FSDP_WRAPPED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
#: The estimate's stated agreement with a real CPU run (:func:`measure_cpu_peak`): |estimate / measured − 1| at most
#: this, checked by ``tests/test_memory.py`` at a reduced size.
CPU_AGREEMENT = 0.02
_LEARNING_RATE = 1e-5  # any value: memory does not depend on it
_BNB_MIN_8BIT_SIZE, _BNB_BLOCK = 4096, 256  # bitsandbytes' defaults


@dataclasses.dataclass(frozen=True)
class MemorySetting:
    """One DI* training setting whose peak memory :func:`estimate_iteration_memory` computes.

    Args:
        layout: :data:`~.settings.TRAINING_LAYOUTS` (``three-in-one`` LoRA, ``separate``, ``full``).
        batch_size: images per iteration (per GPU).
        resolution: image size in pixels (square).
        frozen_dtype: ``bf16`` or ``fp32``, the frozen weights (UNet base, text encoders, VAE); trainable weights
            are float32 and compute runs under bf16 autocast either way (``fp32`` is the trainer's policy under
            FSDP2, which keeps its units float32; ``--mixed_precision no``, float32 compute, is not modelled).
        optimizer: :data:`OPTIMIZERS`.
        gradient_checkpointing: on the UNets and the VAE, as ``--gradient_checkpointing``.
        reward: the PickScore reward through the VAE decoder (``reward_scale > 0``); off skips the decode and the
            reward model (the VAE's weights stay).
        size: the SDXL size (:data:`~.components.SIZES`, full by default).
        foreach: the optimiser's multi-tensor update, CUDA's default (one temporary as large as the parameters).
    """

    layout: str = "three-in-one"
    batch_size: int = 1
    resolution: int = 1024
    frozen_dtype: str = "bf16"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    reward: bool = True
    size: ModelSize = SIZES["full"]
    foreach: bool = True

    def __post_init__(self):
        if self.layout not in TRAINING_LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(TRAINING_LAYOUTS)}, got {self.layout!r}.")
        if self.frozen_dtype not in ("bf16", "fp32"):
            raise ValueError(f"frozen_dtype must be bf16 or fp32, got {self.frozen_dtype!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.batch_size < 1 or self.resolution < 8 or self.resolution % 8:
            raise ValueError(
                f"need batch_size >= 1 and a resolution that is a positive multiple of 8, got {self.batch_size} "
                f"and {self.resolution}."
            )

    def describe(self) -> str:
        checkpointing = "checkpointing" if self.gradient_checkpointing else "no checkpointing"
        reward = "reward decode" if self.reward else "no reward"
        return (
            f"{self.layout}, batch {self.batch_size}, {self.resolution}², {self.frozen_dtype} frozen, "
            f"{self.optimizer}, {checkpointing}, {reward}"
        )


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part (:data:`PARTS`, plus :data:`ALL_GATHER` when sharded) at the peak, per number of GPUs."""

    setting: MemorySetting
    per_gpu: dict[int, dict[str, int]]

    def peak(self, gpus: int = 1) -> int:
        return sum(self.per_gpu[gpus].values())


class _AdamW8bitStates(torch.optim.Optimizer):
    """The state tensors bitsandbytes' blockwise AdamW8bit allocates, without its update (a fused kernel that makes no
    large temporaries): two uint8 moments and two float32 absmax per 256-element block for a parameter of at least
    4096 elements, two float32 moments below that (bitsandbytes 0.4x-0.50, ``Optimizer2State.init_state``)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                if p.numel() < _BNB_MIN_8BIT_SIZE:
                    moments = {f"state{i}": torch.zeros_like(p, dtype=torch.float32) for i in (1, 2)}
                else:
                    blocks = -(-p.numel() // _BNB_BLOCK)
                    moments = {f"state{i}": torch.zeros_like(p, dtype=torch.uint8) for i in (1, 2)}
                    moments |= {f"absmax{i}": p.new_zeros(blocks, dtype=torch.float32) for i in (1, 2)}
                self.state[p].update(moments)


def _optimizer(setting: MemorySetting, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if setting.optimizer == "adamw8bit":
        return _AdamW8bitStates(parameters, lr=_LEARNING_RATE)
    return torch.optim.AdamW(parameters, lr=_LEARNING_RATE, foreach=setting.foreach)


def _build(setting: MemorySetting, device: torch.device):
    """``(networks, config, text, vae, reward, settings)`` of ``setting`` on ``device``, as the training benchmark
    builds them (frozen weights in the setting's dtype, checkpointing as set)."""
    from .training import _config, build_networks  # training imports this module's users; keep the cycle lazy

    options = {"reward": setting.reward, "training_batch_sizes": (setting.batch_size,)}
    settings = BenchSettings.resolve(device="cpu", size="reduced", resolution=setting.resolution, **options)
    settings = dataclasses.replace(settings, device=device, size=setting.size)
    config, dtype = _config(settings), DTYPES[setting.frozen_dtype]
    networks = build_networks(setting.layout, config, settings, dtype, setting.gradient_checkpointing)
    text = build_text_encoders(setting.size, device, dtype, settings.seed)
    vae = build_vae(setting.size, device, dtype, settings.seed)
    if setting.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    reward = build_pickscore_reward(setting.size, device, settings.seed) if setting.reward else None
    return networks, config, text, vae, reward, settings


def _modules(networks, text, vae, reward) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """``(UNets, the rest)``: what FSDP2 shards and what every GPU holds whole."""
    unets = {id(u): u for u in (networks.generator_unet, networks.assistant_unet, networks.reference_unet)}
    rest = [*text[1], vae] + ([reward.clip] if reward is not None else [])
    return list(unets.values()), rest


def _to_fake(modules: Iterable[torch.nn.Module], mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer (built on the meta device) by a CPU fake tensor of the same shape, in place;
    a tensor shared by several modules stays shared."""
    converter, cpu, memo = mode.fake_tensor_converter, torch.device("cpu"), {}

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return converter.from_meta_and_device(mode, tensor, cpu)
        return mode.from_tensor(tensor)  # peft creates some adapter weights on the CPU

    for module in modules:
        for submodule in module.modules():
            for table, wrap in ((submodule._parameters, True), (submodule._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in memo:  # the original is kept in the memo so that its id is not reused
                        value = fake(tensor.data if wrap else tensor)
                        value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad) if wrap else value
                        memo[id(tensor)] = (tensor, value)
                    table[name] = memo[id(tensor)][1]


def _all_gather_bytes(unets: list[torch.nn.Module]) -> int:
    """FSDP2's unsharded bf16 parameters at a time: the largest wrapped block twice (the one in use and the one
    prefetched) plus the parameters outside any wrapped block (the root unit's, gathered for the whole pass)."""
    blocks = [m for u in unets for m in u.modules() if type(m).__name__ in FSDP_WRAPPED_BLOCKS]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    largest = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    root = max(sum(p.numel() for p in u.parameters() if id(p) not in in_blocks) for u in unets)
    return 2 * (2 * largest + root)


@contextlib.contextmanager
def _tracked(tracker: LiveMemory, trainable: list[torch.nn.Parameter]) -> Iterator[None]:
    """Label gradients as they land in ``.grad``, and tensors made inside an optimiser step (the states exist already:
    :func:`_create_optimizer_states`) as sharded temporaries."""

    def on_gradient(parameter: torch.nn.Parameter) -> None:
        tracker.relabel(parameter.grad, "gradients", sharded=True)

    def set_phase(sharded: bool):
        def hook(*_):
            tracker.phase = ("activations", sharded)

        return hook

    handles = [register_optimizer_step_pre_hook(set_phase(True)), register_optimizer_step_post_hook(set_phase(False))]
    for parameter in trainable:  # peft leaves an inactive adapter's weights without requires_grad for now
        requires_grad = parameter.requires_grad
        handles.append(parameter.requires_grad_(True).register_post_accumulate_grad_hook(on_gradient))
        parameter.requires_grad_(requires_grad)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _iteration(setting: MemorySetting, mode: FakeTensorMode | None = None):
    """``(iteration, UNets, the rest)``: the benchmark's DI* iteration in ``setting`` with the setting's optimiser, on
    the CPU, or made of fake tensors under ``mode``."""
    from .training import DIStarIteration  # training imports this module's users; keep the cycle lazy

    networks, config, text, vae, reward, settings = _build(setting, _CPU if mode is None else _META)
    unets, rest = _modules(networks, text, vae, reward)
    if mode is not None:
        _to_fake(unets + rest, mode)
    finite, settings = all_finite if mode is None else _always_finite, dataclasses.replace(settings, device=_CPU)
    iteration = DIStarIteration(networks, config, text, vae, reward, settings, finite)
    for role, optimisation in iteration.optimisation.items():  # the setting's optimiser (e.g. 8-bit Adam)
        iteration.optimisation[role] = dataclasses.replace(
            optimisation, optimizer=_optimizer(setting, optimisation.parameters)
        )
    with mode or contextlib.nullcontext():
        _create_optimizer_states(iteration)
    return iteration, unets, rest


def _always_finite(accelerator, *values) -> bool:
    """The optimiser step's non-finite check on fake tensors, which have no values to read: always step (the real
    check's few scalars are not counted)."""
    return True


@torch.no_grad()
def _create_optimizer_states(iteration) -> None:
    """One step of each optimiser on zero gradients: from the second iteration on, both roles' states exist (the
    first iteration's peak, in the generator's backward, would miss the generator's)."""
    for optimisation in iteration.optimisation.values():
        for parameter in optimisation.parameters:
            parameter.grad = torch.zeros_like(parameter)
        optimisation.optimizer.step()
        optimisation.optimizer.zero_grad(set_to_none=True)


def estimate_iteration_memory(setting: MemorySetting, gpus: Sequence[int] = (1,)) -> MemoryEstimate:
    """The peak memory of one DI* iteration in ``setting``, per GPU for each count in ``gpus``, without allocating it.

    The networks are built on the meta device and turned into CPU fake tensors; the training benchmark's iteration
    (K_TA = 1) then runs under ``FakeTensorMode`` with :class:`LiveMemory` counting. With N > 1 GPUs it is FSDP2 over
    N: the UNets' weights, every gradient and every optimiser state count 1/N, the text encoders, VAE, reward and all
    activations count whole, and :func:`_all_gather_bytes` is added. Not counted: CUDA's context and workspaces, the
    allocator's fragmentation, the communication buffers of gradient reduction.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the scheduler's alphas_cumprod stays a real tensor
    iteration, unets, rest = _iteration(setting, mode)
    tracker = LiveMemory(gpus)
    for modules, sharded in ((unets, True), (rest, False)):
        for tensor in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules):
            tracker.add(tensor, "weights", sharded=sharded)
    for optimisation in iteration.optimisation.values():
        for tensor in tree_leaves(list(optimisation.optimizer.state.values())):
            if isinstance(tensor, torch.Tensor):
                tracker.add(tensor, "optimizer states", sharded=True)
    trainable = [p for optimisation in iteration.optimisation.values() for p in optimisation.parameters]
    with _tracked(tracker, trainable), mode, tracker:
        iteration(setting.batch_size)
    per_gpu = dict(tracker.peaks)
    gathered = _all_gather_bytes(unets)
    for n in gpus:
        if n > 1:
            per_gpu[n] = per_gpu[n] | {ALL_GATHER: gathered}
    return MemoryEstimate(setting, per_gpu)


def _events(nodes) -> Iterator:
    for node in nodes:
        yield node
        yield from _events(node.children)


def measure_cpu_peak(setting: MemorySetting) -> int:
    """The real peak of one DI* iteration in ``setting`` on the CPU: bytes held by torch's CPU allocator.

    The profiler (``profile_memory=True``) sees every allocation and free of torch's CPU allocator — kernels' internal
    buffers too, which no dispatch-level count sees — with the allocator's running total. Everything is built inside
    the profiled region, so that total is what the iteration holds; the peak is its largest value during the
    iteration. Slow at full size: it allocates everything.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        iteration, _, _ = _iteration(setting)
        gc.collect()  # building leaves garbage in reference cycles; the trainer's would be collected long before
        with torch.profiler.record_function("di-star iteration"):
            iteration(setting.batch_size)
    events = list(_events(profiler.profiler.kineto_results.experimental_event_tree()))
    (window,) = [e for e in events if e.name == "di-star iteration"]
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    # The allocator's running total outlives a profiling session: allocations of an earlier session freed while no
    # profiler listened are still in it. This session's first allocation shows that offset.
    offset = allocations[0].extra_fields.total_allocated - allocations[0].extra_fields.alloc_size
    inside = [
        e.extra_fields.total_allocated
        for e in allocations
        if window.start_time_ns <= e.start_time_ns <= window.end_time_ns
    ]
    return max(inside) - offset


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f}"


def run_memory_benchmark(settings: Sequence[MemorySetting], gpus: Sequence[int] = (1,)) -> SuiteResult:
    """``di-star bench memory``: :func:`estimate_iteration_memory` of each setting, one table row each (GiB)."""
    rows, records = [], []
    for setting in settings:
        estimate = estimate_iteration_memory(setting, gpus)
        parts = estimate.per_gpu[gpus[0]]
        rows.append(
            (setting.describe(), *(_gib(parts[part]) for part in PARTS), *(_gib(estimate.peak(n)) for n in gpus))
        )
        fields = {f.name: getattr(setting, f.name) for f in dataclasses.fields(setting) if f.name != "size"}
        records.append(fields | {"size": setting.size.name, "per_gpu_bytes": estimate.per_gpu})
    shown = "one GPU" if gpus[0] == 1 else f"{gpus[0]} GPUs"
    headers = ("setting", *(f"{part} ({shown})" for part in PARTS))
    headers += tuple("peak, 1 GPU" if n == 1 else f"peak per GPU, FSDP2 × {n}" for n in gpus)
    size = settings[0].size.name if settings else SIZES["full"].name
    notes = [
        "**computed**, not measured: one DI* iteration (K_TA = 1: assistant update, then generator update) on SDXL "
        f"`{size}` modules made of fake tensors (FakeTensorMode), every live storage counted (GiB = 2³⁰ bytes)",
        "activations: everything live besides weights, gradients and optimiser states (saved activations, "
        "temporaries, autocast copies); FSDP2 × N: the UNets' weights, gradients and optimiser states ÷ N, the rest "
        "whole, plus the bf16 all-gather of the wrapped blocks",
        "not counted: the CUDA context (~0.5 GiB), cuDNN/cuBLAS workspaces, the allocator's fragmentation, "
        f"communication buffers; on the CPU the estimate agreed with a real run within {CPU_AGREEMENT:.0%} "
        "(docs/benchmarks.md)",
    ]
    title = f"Training memory, computed: peak of one DI* iteration (GiB), SDXL `{size}`"
    return SuiteResult("memory", title, [markdown_table(headers, rows)], notes, records)
