"""Targets larger than one GPU: which GPUs a process's target replica spans, how its layers
are placed, and whether it fits — decided from the config alone, before any weights load.

Under `accelerate launch --num_processes GPUS/N`, process with local rank r owns GPUs
[r*N, (r+1)*N) of its node and places one target replica over them with a `device_map`;
processes still work data parallel on shards exactly like single-GPU ranks.

`load_placed_model` puts the weights there: on one device, an explicit --device-map, or this
process's GPU group.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError
from .target import compute_device, load_model

if TYPE_CHECKING:
    from .config import BuildConfig
    from .prepare import Prepared

GiB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context, allocator slack and kernels' workspaces, per GPU
# Over several GPUs the loader places whole layers and keeps one layer's room free on the first GPU,
# so an even share of the weights leaves the last layers over; each GPU gets this many largest
# layers more, as accelerate's balanced placement itself budgets.
LAYER_SLACK = 1.25


def parse_bytes(text: str) -> int:
    """'70GiB', '80GB', '512MiB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError("--max-memory-per-gpu", text, "a size like 70GiB, 80GB or 512MiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    return int(number * scale[unit])


def group_gpus(local_rank: int, gpus_per_target: int, visible_gpus: int) -> list[int]:
    gpus = list(range(local_rank * gpus_per_target, (local_rank + 1) * gpus_per_target))
    if gpus[-1] >= visible_gpus:
        raise ConfigError(
            "--gpus-per-target",
            gpus_per_target,
            f"a group that fits the node's {visible_gpus} GPUs (local rank {local_rank} would need GPUs {gpus})",
            f"Launch with --num_processes {max(1, visible_gpus // gpus_per_target)} per node.",
        )
    return gpus


def meta_model(config, trust_remote_code: bool = False):
    """The target's module tree on the meta device: exact parameter counts, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # init_empty_weights moves each parameter to meta as it is set, which makes a tied head a copy of the
    # embedding; tied again, it counts once, as in the loaded target, and placements keep the pair together
    model.tie_weights()
    return model


@dataclass
class MemoryPlan:
    gpus_per_target: int
    parameters: int
    weights_per_gpu: int
    layer_slack: int
    activations: int
    attention_masks: int
    aux_capture: int
    head_chunks: int
    outputs: int
    overhead: int
    head_rows: int = 0  # a `hidden` build's fp32 copy of the head's draft rows (forward.HeadRows)

    @property
    def per_gpu(self) -> int:
        # Weights are split over the group; a batch's activations live on one GPU at a time.
        return (
            self.weights_per_gpu
            + self.layer_slack
            + self.activations
            + self.attention_masks
            + self.aux_capture
            + self.head_chunks
            + self.outputs
            + self.overhead
            + self.head_rows
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"per_gpu": self.per_gpu}

    def describe(self) -> str:
        parts = [
            f"weights {self.weights_per_gpu / GiB:.1f}",
            *([f"room for whole layers {self.layer_slack / GiB:.1f}"] if self.layer_slack else []),
            f"activations {self.activations / GiB:.1f}",
            *([f"attention masks {self.attention_masks / GiB:.1f}"] if self.attention_masks else []),
            f"aux {self.aux_capture / GiB:.1f}",
            f"head {self.head_chunks / GiB:.1f}",
            f"outputs {self.outputs / GiB:.1f}",
            *([f"head rows {self.head_rows / GiB:.1f}"] if self.head_rows else []),
            f"overhead {self.overhead / GiB:.1f}",
        ]
        return (
            f"{self.per_gpu / GiB:.1f} GiB per GPU over {self.gpus_per_target} GPU(s) "
            f"({', '.join(parts)}; {self.parameters / 1e9:.2f}B parameters)"
        )


def plan_memory(
    config,
    *,
    gpus_per_target: int,
    max_tokens: int,
    num_aux_layers: int,
    dtype_bytes: int = 2,
    draft_vocab_size: int | None = None,
    aux_dtype: str = "bf16",
    model=None,
    longest_row: int | None = None,
    padded: bool = False,
    hidden_format: bool = False,
) -> MemoryPlan:
    """`dtype_bytes`: 2 where the target computes in bf16 (a GPU), 4 in fp32 (CPU); `aux_dtype`: how the
    cache stores aux states; `model`: the target on the meta device when already built (`meta_model`);
    `longest_row`: tokens of a batch's longest row (default: `max_tokens`, one row); `padded`: whether a
    batch can hold rows of different lengths (more than one row per batch); `hidden_format`: the build
    keeps an fp32 copy of the head's draft rows to rebuild probs from (--target-format hidden)."""
    from .formats import encoded_aux_bytes
    from .supervision import HEAD_CHUNK_ROWS
    from .target import text_config

    cfg = text_config(config)
    model = model if model is not None else meta_model(config)
    parameters = sum(p.numel() for p in model.parameters())
    hidden = cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    # Residual stream and norms (4H), the MLP's working set, q/k/v (the attention kernel itself is fused; the
    # masks it is given are `attention_masks`).
    activations = max_tokens * dtype_bytes * (4 * hidden + mlp_width(cfg) + (heads + 2 * kv_heads) * head_dim)
    # Head rows budgeted at once, fp32 logits and their softmax. `Target.supervise` holds at most two
    # HEAD_CHUNK_ROWS chunks; the budget keeps 8 until a GPU peak shows the margin is not needed.
    head_rows = HEAD_CHUNK_ROWS * 8
    return MemoryPlan(
        gpus_per_target=gpus_per_target,
        parameters=parameters,
        weights_per_gpu=-(-parameters * dtype_bytes // gpus_per_target),
        layer_slack=int(LAYER_SLACK * largest_layer(model) * dtype_bytes) if gpus_per_target > 1 else 0,
        activations=activations,
        attention_masks=attention_mask_bytes(cfg, max_tokens, longest_row or max_tokens, padded, dtype_bytes),
        # The aux states and the final hidden state a batch holds after its forward, and its encoded aux columns.
        aux_capture=max_tokens * (num_aux_layers + 1) * hidden * dtype_bytes
        + encoded_aux_bytes(max_tokens, num_aux_layers * hidden, aux_dtype, torch.bfloat16 if dtype_bytes == 2 else torch.float32),
        head_chunks=head_rows * cfg.vocab_size * 4 * 2,
        # A batch's supervision before the copy: fp32 probs per block, their concatenation, the cast.
        outputs=max_tokens * (draft_vocab_size or cfg.vocab_size) * (4 * 2 + dtype_bytes),
        overhead=CUDA_CONTEXT_BYTES,
        head_rows=(draft_vocab_size or cfg.vocab_size) * hidden * 4 if hidden_format else 0,
    )


def mlp_width(cfg) -> int:
    """Values per token the MLP holds at its peak: gate, up and their product of a gated MLP (3I); c_fc's
    output and gelu_new's temporaries of GPT-2's (4I: 0.5x, x^3 and 0.044715x^3 alive with x at once); of a
    mixture of experts, whichever is larger, the dense layers' or the routed experts' (`moe_width`)."""
    dense = (4 if hasattr(cfg, "n_inner") else 3) * dense_mlp_width(cfg)
    return max(dense, moe_width(cfg))


def dense_mlp_width(cfg) -> int:
    """I, a dense MLP's width: `intermediate_size`, or where the config names it `n_inner` (GPT-2 and the
    configs modelled on it), which transformers reads as 4H when it is None."""
    if hasattr(cfg, "n_inner"):
        return cfg.n_inner if cfg.n_inner is not None else 4 * cfg.hidden_size
    return getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size


def expert_width(cfg) -> int:
    """I of one routed expert: `moe_intermediate_size` where the config has one (Qwen MoE), else the
    dense width, which Mixtral's experts have."""
    return getattr(cfg, "moe_intermediate_size", None) or dense_mlp_width(cfg)


def moe_width(cfg) -> int:
    """Values per token of transformers' grouped experts path, where each token is k rows (k =
    num_experts_per_tok) sorted by expert: with I the width of one expert, the sorted inputs [kT, H] stay
    alive throughout, beside either the gate-up output [kT, 2I], the activated gate [kT, I] and its
    product with up [kT, I] (4I), or the down output [kT, H], its routing-weighted copy and that copy put
    back in token order (3H). A shared expert, when there is one, adds a dense MLP of its own width (3I)."""
    from .target import EXPERT_COUNT_FIELDS

    k = getattr(cfg, "num_experts_per_tok", None)
    if not k or not any(getattr(cfg, field, None) for field in EXPERT_COUNT_FIELDS):
        return 0
    hidden, expert = cfg.hidden_size, expert_width(cfg)
    shared = getattr(cfg, "shared_expert_intermediate_size", None) or (getattr(cfg, "n_shared_experts", None) or 0) * expert
    return k * (hidden + max(4 * expert, 3 * hidden)) + 3 * shared


def attention_mask_bytes(cfg, tokens: int, longest_row: int, padded: bool, dtype_bytes: int) -> int:
    """The masks SDPA is given. transformers passes no mask when attention is plainly causal; it builds a
    boolean [rows, 1, T, T] mask for a batch with padding (any row shorter than the longest), and for
    sliding-window layers also once T reaches the window, and keeps each kind of mask through the whole
    forward. Each layer's SDPA call turns its mask into an additive one in the compute dtype, which
    memory-efficient attention copies to an aligned stride when T is not a multiple of 8: two such
    copies at a time. rows x T^2 is at most `tokens` x `longest_row`."""
    window = getattr(cfg, "sliding_window", None)
    kinds = set(getattr(cfg, "layer_types", None) or ()) or {"sliding_attention" if window else "full_attention"}
    masks = sum(padded or (kind == "sliding_attention" and window is not None and longest_row >= window) for kind in kinds)
    return tokens * longest_row * (masks + 2 * dtype_bytes) if masks else 0


def largest_layer(model) -> int:
    """Parameters of the largest block the loader places whole: a module of the model's
    `_no_split_modules` classes (a decoder layer), or a module without children (the embedding)."""
    whole = set(getattr(model, "_no_split_modules", None) or ())
    blocks = (m for m in model.modules() if type(m).__name__ in whole or next(m.children(), None) is None)
    return max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)


def check_fits(plan: MemoryPlan, available_per_gpu: int) -> None:
    if plan.per_gpu > available_per_gpu:
        raise ConfigError(
            "--gpus-per-target",
            plan.gpus_per_target,
            f"a placement that fits {available_per_gpu / GiB:.1f} GiB per GPU; the target needs {plan.describe()}",
            "Raise --gpus-per-target, lower --batch-size or --max-tokens-per-batch (a batch holds at most the smaller of "
            "--max-tokens-per-batch and --batch-size x --seq-length tokens), or raise --max-memory-per-gpu if the GPUs have more.",
        )


def max_memory_map(gpus: list[int], per_gpu: int, plan: MemoryPlan) -> dict:
    """`max_memory` for `from_pretrained(device_map="auto")`: weights only, leaving room for the batch."""
    room = plan.per_gpu - plan.weights_per_gpu - plan.layer_slack
    return {gpu: max(per_gpu - room, 0) for gpu in gpus} | {"cpu": 0}


def device_map_summary(model) -> dict:
    """{device: parameter count} of where the weights actually are, for the manifest."""
    summary: dict[str, int] = {}
    for p in model.parameters():
        summary[str(p.device)] = summary.get(str(p.device), 0) + p.numel()
    return summary


def load_placed_model(prep: Prepared):
    """One device, an explicit --device-map, or this process's GPU group (--gpus-per-target)."""
    cfg = prep.cfg
    device, dtype = compute_device()
    load = partial(load_model, prep.model_path, cfg.target_revision, cfg.trust_remote_code, device, dtype, config=prep.model_config)
    if cfg.device_map is not None:
        return kept_in_memory(load(device_map=read_device_map(cfg.device_map)), "--device-map", cfg.device_map)
    if cfg.gpus_per_target > 1:
        from accelerate import PartialState

        gpus = group_gpus(PartialState().local_process_index, cfg.gpus_per_target, torch.cuda.device_count())
        torch.cuda.set_device(gpus[0])  # not another group's GPU
        plan = memory_plan(prep)
        per_gpu = available_per_gpu(cfg, gpus)
        model = load(device_map="auto", max_memory=max_memory_map(gpus, per_gpu, plan))
        return kept_in_memory(model, "--gpus-per-target", cfg.gpus_per_target)
    return load()


def kept_in_memory(model, flag: str, value):
    """`model`, refused where the loader put weights on disk: the last guard, for placements decided
    only as the weights load (accelerate's strategies) and anything the start-up check missed."""
    device_map = getattr(model, "hf_device_map", None) or {}
    on_disk = [module for module, device in device_map.items() if device == "disk"]
    if on_disk:
        names = ", ".join(on_disk[:4]) + (f" and {len(on_disk) - 4} more" if len(on_disk) > 4 else "")
        raise ConfigError(
            flag,
            value,
            "a placement that keeps every weight in memory",
            f"The loader put {names} on disk, where the build cannot run them (it reads every weight on every batch, the "
            "head's directly). Give the weights more room: raise --gpus-per-target, lower --batch-size or "
            '--max-tokens-per-batch, raise --max-memory-per-gpu if the GPUs have more, or pass a --device-map on GPUs and "cpu".',
        )
    return model


def memory_plan(prep: Prepared, dtype_bytes: int | None = None, model=None):
    """The planner's per-GPU estimate for this build; `dtype_bytes` of the weights and activations
    (default: as this machine computes, bf16 on a GPU and fp32 on CPU); `model`: the target on the
    meta device when already built."""
    return plan_memory(
        prep.model_config,
        gpus_per_target=prep.cfg.gpus_per_target,
        max_tokens=largest_batch_tokens(prep.cfg),
        num_aux_layers=len(prep.aux_layer_ids),
        dtype_bytes=dtype_bytes or (2 if torch.cuda.is_available() else 4),
        draft_vocab_size=len(prep.selected_token_ids),
        aux_dtype=prep.cfg.storage_aux_dtype,
        model=model,
        longest_row=min(prep.cfg.seq_length, largest_batch_tokens(prep.cfg)),
        padded=prep.cfg.batch_size > 1,
        hidden_format=prep.cfg.target_format == "hidden",
    )


def largest_batch_tokens(cfg: BuildConfig) -> int:
    """Tokens of the largest batch the build can form, padding included: --batch-size rows of at most
    --seq-length tokens, within --max-tokens-per-batch (batching.plan_batches)."""
    return min(cfg.token_budget, cfg.batch_size * cfg.seq_length)


def available_per_gpu(cfg: BuildConfig, gpus: list[int]) -> int | None:
    if cfg.max_memory_per_gpu is not None:
        return parse_bytes(cfg.max_memory_per_gpu)
    if gpus and torch.cuda.is_available():
        return min(torch.cuda.get_device_properties(g).total_memory for g in gpus)
    return None  # CPU: no budget to check against


def check_placement(prep: Prepared) -> None:
    """Refuse a target that cannot fit before any weights load (not for explicit --device-map)."""
    from accelerate import PartialState

    cfg = prep.cfg
    if cfg.device_map is not None:
        device_map = read_device_map(cfg.device_map)
        if device_map not in DEVICE_MAP_STRATEGIES:
            check_device_map(cfg.device_map, device_map, meta_model(prep.model_config, cfg.trust_remote_code))
        return
    gpus = []
    if cfg.gpus_per_target > 1 and not torch.cuda.is_available():
        raise ConfigError(
            "--gpus-per-target",
            cfg.gpus_per_target,
            "1 on a machine where no GPU is visible (CUDA is not available)",
            "Drop --gpus-per-target, or run where the GPUs are visible (check CUDA_VISIBLE_DEVICES).",
        )
    if torch.cuda.is_available():
        gpus = group_gpus(PartialState().local_process_index, cfg.gpus_per_target, torch.cuda.device_count())
    budget = available_per_gpu(cfg, gpus)
    if budget is not None:
        check_group(prep, gpus, budget)


def check_group(prep: Prepared, gpus: list[int], budget: int) -> None:
    """The planner's estimate, then, over several GPUs, where the loader itself will put each module
    with the max_memory `load_placed_model` gives it: every weight must land on the group's GPUs."""
    model = meta_model(prep.model_config, prep.cfg.trust_remote_code)
    plan = memory_plan(prep, model=model)
    check_fits(plan, budget)
    if len(gpus) > 1:
        check_weights_on_gpus(model.to(weights_dtype()), gpus, max_memory_map(gpus, budget, plan), plan)


def weights_dtype() -> torch.dtype:
    """The dtype the weights load in (`target.compute_device`), as `memory_plan` counts them."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def check_weights_on_gpus(model, gpus: list[int], max_memory: dict, plan: MemoryPlan) -> None:
    """Refuse a group where `from_pretrained(device_map="auto")` would offload weights to "cpu" or
    "disk" (it does so silently, and the build cannot run a head it offloaded); `model`: the target
    on the meta device, in the dtype the weights load in."""
    device_map = loaders_device_map(model, max_memory)
    offloaded = [module for module, device in device_map.items() if device not in gpus]
    if not offloaded:
        return
    sizes = dict(model.named_parameters())
    offloaded_bytes = sum(
        p.numel() * p.element_size() for name, p in sizes.items() if any(name == m or name.startswith(m + ".") for m in offloaded)
    )
    names = ", ".join(offloaded[:4]) + (f" and {len(offloaded) - 4} more" if len(offloaded) > 4 else "")
    places = " and ".join(sorted({str(device_map[m]) for m in offloaded}))
    raise ConfigError(
        "--gpus-per-target",
        plan.gpus_per_target,
        f"a placement that keeps every weight on the group's GPUs {gpus}",
        f"The plan ({plan.describe()}) leaves {readable(max_memory[gpus[0]])} for weights on each GPU, and the loader, "
        f"which places whole layers, would put {names} ({readable(offloaded_bytes)} of weights) on {places}, where the "
        "build cannot run them. Raise --gpus-per-target, lower --batch-size or --max-tokens-per-batch (more of each GPU for "
        "weights), or raise --max-memory-per-gpu if the GPUs have more.",
    )


def readable(size: int) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB // 10 else f"{size / (1 << 20):.2f} MiB"


def loaders_device_map(model, max_memory: dict) -> dict:
    """{module: device} as `from_pretrained(device_map="auto", max_memory=...)` computes it, run on
    the meta model: transformers' own function where it has one, else accelerate's, which it calls."""
    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:  # transformers 4 plans with accelerate's balanced memory and device map
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = model._no_split_modules
        balanced = get_balanced_memory(model, dict(max_memory), no_split_module_classes=no_split)
        return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    return _get_device_map(model, "auto", dict(max_memory), None)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate plans these itself
DEVICE_MAP_EXPECTED = (
    '"auto", "balanced", "balanced_low_0", "sequential", a JSON object {module name: device}, or a path to a JSON file holding one'
)
DEVICE_EXAMPLE = '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}'


def read_device_map(spec: str) -> dict | str:
    """--device-map: one of accelerate's strategies ("auto", ...), a JSON object, or a path to a JSON
    file ({module name: device}); a device is a GPU index, "cpu" or "cuda:N" (any torch device). Not
    "disk": the build reads every weight on every batch, and the head's rows directly, not through
    the hooks that bring offloaded weights back."""
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    is_file = not spec.lstrip().startswith("{") and Path(spec).is_file()
    try:
        device_map = json.loads(Path(spec).read_text() if is_file else spec)
    except ValueError:
        found = f"The file {spec} does not hold valid JSON." if is_file else "It is neither a JSON object nor an existing file."
        raise ConfigError("--device-map", spec, DEVICE_MAP_EXPECTED, found) from None
    if not isinstance(device_map, dict) or not device_map:
        found = "an empty object" if device_map == {} else f"a JSON {type(device_map).__name__}"
        raise ConfigError("--device-map", spec, DEVICE_MAP_EXPECTED, f"It holds {found}; write one like {DEVICE_EXAMPLE}.")
    on_disk = [module for module, device in device_map.items() if device == "disk"]
    if on_disk:
        raise ConfigError(
            "--device-map",
            spec,
            'a device that holds each module\'s weights in memory: a GPU index, "cpu" or "cuda:N"',
            f'It puts {on_disk} on "disk", where the build cannot run them (it reads every weight on every batch, '
            'the head\'s directly); place them on a GPU, or on "cpu" if the GPUs have no room.',
        )
    bad = {module: device for module, device in device_map.items() if not is_device(device)}
    if bad:
        raise ConfigError("--device-map", spec, DEVICE_MAP_EXPECTED, f'Not a device: {bad}; use a GPU index, "cpu" or "cuda:N".')
    return device_map


def is_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    if not isinstance(device, str):
        return False
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return False
    return True


def gpu_index(device) -> int | None:
    if isinstance(device, int):
        return device
    parsed = torch.device(device)
    return None if parsed.type != "cuda" else parsed.index or 0


def check_device_map(spec: str, device_map: dict, model) -> None:
    """An explicit map must name this machine's GPUs and modules of the target, and place every
    weight: checked on `model`, the target on the meta device, before anything is written."""
    count = torch.cuda.device_count()
    missing_gpus = sorted({i for i in map(gpu_index, device_map.values()) if i is not None and i >= count})
    if missing_gpus:
        raise ConfigError(
            "--device-map", spec, f"devices of this machine, which shows {count} GPU(s)", f"GPU(s) {missing_gpus} do not exist here."
        )
    names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    unknown = sorted(set(device_map) - names)
    if unknown:
        raise ConfigError(
            "--device-map", spec, "module names of the target", f"It has no module {unknown[:5]}; its top modules are {top_modules(model)}."
        )

    def placed(name: str) -> bool:
        return any(module == "" or name == module or name.startswith(module + ".") for module in device_map)

    unplaced = [name for name, _ in model.named_parameters() if not placed(name)]
    if unplaced:
        raise ConfigError(
            "--device-map",
            spec,
            "a device for every weight of the target",
            f"{len(unplaced)} weight(s) have none, such as {unplaced[:3]}; add their modules to the map.",
        )


def top_modules(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.count(".") <= 1 and name][:8]
