"""Per-GPU memory plan for a training config: will it fit, and if not, what to change.

    python -m apex_ray.plan --config configs/sana_600m.yaml --gpus 8 [--gpu-memory-gib 80] [key=value ...]

The model is built on the ``meta`` device (no allocation) with LoRA applied when the config asks
for it, so parameter counts are exact. Each row is what one worker holds at the step's peak:

- sharded states (FSDP2: divided by the worker count): fp32 master weights of what trains, the
  frozen base under LoRA (in ``model.lora.base_dtype``: bf16 where FSDP2 computes in bf16, as the
  trainer stores it), fp32 gradients, AdamW's two fp32 moments, the fp32 EMA (a full copy, or only
  the EMA adapter under LoRA);
- gathered weights: FSDP2 keeps the root's parameters gathered through the step and gathers a
  block at a time with one block prefetched, in the compute dtype (bf16 on GPUs); the full EMA is
  a second FSDP root, gathered while its forward runs;
- block gradient buffers: a block's unsharded compute-dtype gradients plus their fp32 copy for
  the reduce-scatter;
- activations of the with-gradient forward (micro-batch rows plus APEX's ``adv_frac`` share of
  shifted rows): ``rows * hidden * (k_img * image_tokens + k_txt * text_tokens)`` elements per
  layer, with image tokens ``(latent side / patch)^2``. With activation checkpointing a layer
  keeps only its inputs (constants ``c_img``, ``c_txt``) and one block is recomputed in backward.

The constants are elements per token per hidden unit per layer, measured on the tiny presets
(CPU, fp32) from the allocations live at the end of a with-gradient forward, as the difference
between 4- and 2-layer models (so embeddings and output layers cancel): see
:func:`measure_activation_constants` and ``--calibrate``. They transfer to the real presets
because the tiny ones keep the block structure (mlp ratio, attention kind); the element size is
the compute dtype's. Not counted: the CUDA context, NCCL buffers and allocator fragmentation
(``RESERVED_FRACTION`` of the GPU is held back for them), the text encoder (prepared data carries
embeddings) and the fake-sample buffer (host memory).

Load peak: the trainer builds the model on ``meta``, shards it, allocates each rank's shards and
fills them block by block from the safetensors files (``apex_ray.models.loading``), so while it
loads a GPU holds its sharded weights, base and EMA plus one tensor's block in flight; the plan's
peak is the larger of that and the step's. The output also gives what loading the whole fp32
model onto each GPU before sharding would need (what a plain ``from_pretrained(...).to(device)``
costs), the reason the load path exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from apex_ray.config import Config
from apex_ray.models import build_backbone

GIB = 1024**3
RESERVED_FRACTION = 0.10
"""Share of GPU memory held back for the CUDA context, NCCL buffers and allocator fragmentation."""


@dataclass(frozen=True)
class ActivationConstants:
    """Saved elements per token per hidden unit per layer (``c_*``: with activation checkpointing)."""

    k_img: float
    k_txt: float
    c_img: float
    c_txt: float


ACTIVATION_CONSTANTS: dict[str, ActivationConstants] = {
    # Measured with measure_activation_constants (torch 2.13 CPU, diffusers 0.42): SANA's text
    # enters only through cross-attention keys/values and checkpointed blocks keep the image
    # stream only; Qwen-Image's joint blocks carry both streams alike.
    "sana": ActivationConstants(k_img=38.4, k_txt=2.0, c_img=1.0, c_txt=0.0),
    "qwen-image": ActivationConstants(k_img=25.2, k_txt=25.2, c_img=1.0, c_txt=1.0),
}


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a (meta-device) model and the shapes that set activation memory."""

    total: int  # the trained model's parameters (under LoRA: base and both adapters)
    trainable: int
    frozen: int  # the frozen base under LoRA, else 0
    ema: int  # the EMA's parameters: a full copy, or the EMA adapter under LoRA
    root: int  # parameters outside the transformer blocks (gathered for the whole step)
    largest_block: int
    largest_block_trainable: int
    largest_tensor: int  # elements of the largest single parameter (one block of it is in flight at load)
    constant_bytes: int  # buffers and tensor attributes (positional tables): whole on every GPU
    layers: int
    hidden: int
    image_tokens: int
    text_tokens: int
    family: str



@dataclass(frozen=True)
class MemoryPlan:
    rows: list[tuple[str, float]]  # (what, bytes per GPU)
    gpus: int
    capacity: float  # usable bytes per GPU
    sizes: ModelSizes
    micro_batch: int
    load: float = 0.0  # bytes per GPU while the model loads (meta init, per-shard fill)
    whole_model_load: float = 0.0  # bytes per GPU if the whole fp32 model were moved to it before sharding

    @property
    def step(self) -> float:
        """Bytes per GPU at the training step's peak (the sum of :attr:`rows`)."""
        return sum(value for _, value in self.rows)

    @property
    def total(self) -> float:
        """The peak: the larger of the step and the load."""
        return max(self.step, self.load)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def part(self, name: str) -> float:
        return dict(self.rows)[name]


def model_sizes(config: Config) -> ModelSizes:
    """Parameter counts and activation shapes for ``config``'s backbone (built on ``meta``)."""
    from apex_ray.engine.build import build_model
    from apex_ray.models.lora import EMA_ADAPTER, adapter_of

    with torch.device("meta"):
        model, _, _ = build_model(config, pretrained=False)  # the same model (and adapters) training builds
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ema_adapter = sum(p.numel() for n, p in model.named_parameters() if adapter_of(n) == EMA_ADAPTER)
    blocks = model.blocks()
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    largest = max(range(len(blocks)), key=block_sizes.__getitem__)
    transformer_config = model.transformer.config
    patch = transformer_config.patch_size
    return ModelSizes(
        total=total,
        trainable=trainable,
        frozen=total - trainable - ema_adapter,
        ema=ema_adapter if config.model.lora.enabled else trainable,
        root=total - sum(block_sizes),
        largest_block=block_sizes[largest],
        largest_block_trainable=sum(p.numel() for p in blocks[largest].parameters() if p.requires_grad),
        largest_tensor=max(p.numel() for p in model.parameters()),
        constant_bytes=sum(t.numel() * t.element_size() for t in _constants(model)),
        layers=len(blocks),
        hidden=transformer_config.num_attention_heads * transformer_config.attention_head_dim,
        image_tokens=(model.sample_size // patch) ** 2,
        text_tokens=config.model.max_text_length,
        family=model.family,
    )


def _constants(model: torch.nn.Module) -> list[torch.Tensor]:
    """Buffers and plain tensor attributes of ``model``'s modules (each counted once)."""
    found = {id(t): t for t in model.buffers()}
    for module in model.modules():
        found.update({id(v): v for v in vars(module).values() if isinstance(v, torch.Tensor)})
    return list(found.values())


def compute_bytes(config: Config) -> int:
    """Element size of gathered weights and activations: bf16 on GPUs unless fp32 is asked for."""
    bf16 = config.distributed.use_gpu and config.distributed.mixed_precision != "fp32"
    return 2 if bf16 else 4


def frozen_base_bytes(config: Config) -> int:
    """Element size of the frozen LoRA base as the trainer stores it (:func:`frozen_base_dtype`)."""
    from apex_ray.engine.build import frozen_base_dtype

    device = "cuda" if config.distributed.use_gpu else "cpu"
    return torch.empty((), dtype=frozen_base_dtype(config, device)).element_size()


def grad_rows(config: Config, micro_batch: int) -> int:
    """Rows through the with-gradient forward: the micro-batch plus APEX's shifted L_adv rows."""
    if config.objective.kind != "apex" or config.objective.apex.lambda_endpoint == 0:
        return micro_batch
    return micro_batch + math.ceil(config.objective.apex.adv_frac * micro_batch)


def activation_bytes(sizes: ModelSizes, rows: int, checkpointing: bool, element: int) -> float:
    k = ACTIVATION_CONSTANTS[sizes.family]
    per_layer = rows * sizes.hidden * (k.k_img * sizes.image_tokens + k.k_txt * sizes.text_tokens) * element
    if not checkpointing:
        return sizes.layers * per_layer
    kept = rows * sizes.hidden * (k.c_img * sizes.image_tokens + k.c_txt * sizes.text_tokens) * element
    return sizes.layers * kept + per_layer  # one block is recomputed at a time in backward


def plan(config: Config, gpu_memory_gib: float = 80.0, sizes: ModelSizes | None = None) -> MemoryPlan:
    """The per-GPU memory of one training step of ``config`` on ``config.world_size`` workers."""
    sizes = sizes or model_sizes(config)
    fsdp = config.distributed.strategy == "fsdp"
    shards = config.world_size if fsdp else 1
    element = compute_bytes(config)
    lora = config.model.lora.enabled
    from apex_ray.engine.reference import keeps_frozen_reference  # here: engine.reference imports the models
    frozen_copy = not lora and keeps_frozen_reference(config)
    base = frozen_base_bytes(config) if lora else 4
    base_name = f"frozen base ({'bf16' if base == 2 else 'fp32'}{', sharded' if fsdp else ''})"
    rows = [
        ("master weights (fp32, sharded)" if fsdp else "master weights (fp32)", 4 * sizes.trainable / shards),
        (base_name, base * sizes.frozen / shards),
        ("gradients (fp32)", 4 * sizes.trainable / shards),
        ("AdamW moments (2 x fp32)", 8 * sizes.trainable / shards),
        ("EMA adapter (fp32)" if lora else "EMA (fp32)", 4 * sizes.ema / shards),
        # engine.reference: a full fine-tune's no-grad copy of the starting weights (LoRA: the base, free)
        ("frozen starting model (fp32)", 4 * sizes.trainable / shards if frozen_copy else 0),
        ("buffers and constants", sizes.constant_bytes),
    ]
    if fsdp:
        ema_root = 0 if lora else sizes.root  # the full EMA is its own FSDP root
        ema_root += sizes.root if frozen_copy else 0  # and so is a frozen copy
        rows.append((f"gathered root + 2 blocks ({'bf16' if element == 2 else 'fp32'})",
                     element * (sizes.root + ema_root + 2 * sizes.largest_block)))
        rows.append(("block gradient buffers", (element + 4) * sizes.largest_block_trainable))
    elif element == 2:
        rows.append(("bf16 weight copies (autocast cache)", element * sizes.total))
    micro = config.micro_batch
    rows.append((f"activations (micro-batch {micro}, {grad_rows(config, micro)} rows"
                 f"{', checkpointed' if config.distributed.activation_checkpointing else ''})",
                 activation_bytes(sizes, grad_rows(config, micro), config.distributed.activation_checkpointing,
                                  element)))
    rows = [(name, value) for name, value in rows if value > 0]
    # Load: the states above that exist before the first step (weights, base, EMA), each rank its
    # shards, plus one parameter's block being filled (read in fp32 at most).
    resident = sum(value for name, value in rows
                   if name.startswith(("master weights", "frozen base", "frozen starting", "EMA", "buffers")))
    load = resident + 4 * sizes.largest_tensor / shards
    whole = 4 * (sizes.total + (0 if lora else sizes.ema) + (sizes.trainable if frozen_copy else 0))
    return MemoryPlan(rows, config.world_size, gpu_memory_gib * GIB * (1 - RESERVED_FRACTION), sizes, micro,
                      load=load, whole_model_load=whole)


def suggestions(config: Config, result: MemoryPlan, gpu_memory_gib: float) -> list[str]:
    """Changes that make an over-budget config fit, each checked with :func:`plan`."""
    found = []

    def fits(changes: dict) -> MemoryPlan | None:
        try:
            changed = config.with_changes(changes, check_files=False)
        except ValueError:  # e.g. a batch the new worker count does not divide
            return None
        same_model = changed.model == config.model
        candidate = plan(changed, gpu_memory_gib, result.sizes if same_model else None)
        return candidate if candidate.fits else None

    if config.distributed.strategy == "fsdp":
        for gpus in (2, 4, 8, 16, 32, 64, 128, 256):
            if gpus > config.world_size and (better := fits({"distributed.num_workers": gpus})):
                found.append(f"more GPUs: distributed.num_workers={gpus} ({better.total / GIB:.1f} GiB per GPU)")
                break
    if not config.distributed.activation_checkpointing and (
            better := fits({"distributed.activation_checkpointing": True})):
        found.append(f"activation checkpointing: distributed.activation_checkpointing=true "
                     f"({better.total / GIB:.1f} GiB per GPU)")
    if not config.model.lora.enabled and (better := fits({"model.lora.enabled": True})):
        found.append(f"LoRA: model.lora.enabled=true, rank {config.model.lora.rank} "
                     f"({better.total / GIB:.1f} GiB per GPU)")
    for micro in range(config.micro_batch - 1, 0, -1):
        if (config.train.global_batch % (micro * config.world_size) == 0
                and (better := fits({"train.micro_batch": micro}))):
            found.append(f"smaller micro-batch: train.micro_batch={micro}, with gradient accumulation "
                         f"({better.total / GIB:.1f} GiB per GPU)")
            break
    return found


def format_plan(result: MemoryPlan, gpu_memory_gib: float) -> str:
    sizes = result.sizes
    lines = [
        f"model: {sizes.total / 1e9:.2f}B parameters, {sizes.trainable / 1e9:.3f}B trainable; "
        f"{sizes.layers} blocks of {sizes.largest_block / 1e6:.1f}M (largest), {sizes.root / 1e6:.1f}M outside "
        f"blocks; hidden {sizes.hidden}; {sizes.image_tokens} image + {sizes.text_tokens} text tokens",
        f"per GPU, {result.gpus} GPUs:",
    ]
    width = max(len(name) for name, _ in result.rows)
    lines += [f"  {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in result.rows]
    lines.append(f"  {'training step':<{width}}  {result.step / GIB:8.2f} GiB")
    lines.append(f"  {'load (meta init, own shards)':<{width}}  {result.load / GIB:8.2f} GiB")
    lines.append(f"  {'peak (step or load)':<{width}}  {result.total / GIB:8.2f} GiB")
    lines.append(f"  {'usable (' + str(gpu_memory_gib) + ' GiB less ' + f'{RESERVED_FRACTION:.0%})':<{width}}  "
                 f"{result.capacity / GIB:8.2f} GiB")
    lines.append("fits" if result.fits else "does NOT fit")
    lines.append(f"load counted: each GPU allocates and fills only its shards; moving the whole fp32 model onto "
                 f"each GPU before sharding would need {result.whole_model_load / GIB:.1f} GiB")
    return "\n".join(lines)


def measure_activation_constants(family: str, batch: int = 2, latent_side: int = 32) -> ActivationConstants:
    """Measure :data:`ACTIVATION_CONSTANTS` for ``family`` on its tiny preset (CPU, fp32).

    Allocations live at the end of a with-gradient forward are read from the profiler's memory
    events; the difference between 4- and 2-layer models is two layers' worth, with and without
    activation checkpointing, at two text lengths (to separate image and text tokens).
    """
    from apex_ray.method.conditioning import Conditioning

    preset = {"sana": "sana-tiny", "qwen-image": "qwen-image-tiny"}[family]
    short, long = 8, 40

    def per_layer(checkpointing: bool, text: int) -> tuple[float, int]:
        live = {}
        for layers in (2, 4):
            torch.manual_seed(0)
            model = build_backbone(preset, num_layers=layers)
            if checkpointing:
                model.transformer.enable_gradient_checkpointing()
            x = torch.randn(batch, model.latent_channels, latent_side, latent_side)
            cond = Conditioning(torch.randn(batch, text, model.text_embed_dim),
                                torch.ones(batch, text, dtype=torch.long))
            live[layers] = allocated_by(lambda: model(x, torch.rand(batch), cond))[1]
        config = model.transformer.config
        hidden = config.num_attention_heads * config.attention_head_dim
        tokens = (latent_side // config.patch_size) ** 2
        return (live[4] - live[2]) / 2 / (batch * hidden * 4), tokens

    values = {}
    for name, checkpointing in (("k", False), ("c", True)):
        (a, tokens), (b, _) = per_layer(checkpointing, short), per_layer(checkpointing, long)
        text = (b - a) / (long - short)
        values[f"{name}_txt"] = round(max(text, 0.0), 1)
        values[f"{name}_img"] = round((a - text * short) / tokens, 1)
    return ActivationConstants(**values)


def allocated_by(fn) -> tuple[int, int]:
    """(peak, still live at the end) bytes that ``fn`` allocates on the CPU, from the profiler's
    memory events; the result of ``fn`` is kept alive until the end is read."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    del result
    return peak, live
