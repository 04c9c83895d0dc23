"""The frozen target: tokenizer and config (cheap, before any weights), the model, and one
supervised forward per batch.

Aux states are captured with forward hooks on the chosen decoder layers (the layer
*output*, HF `hidden_states[i + 1]` but for the last layer, which HF gives after the final norm),
so no other layer's states are kept. Logits are
computed only at loss-masked positions, in fixed-size row chunks: a 128k vocabulary never
materialises `[B, T, V]`, and because every chunk has the same shape a row's logits do not
depend on which other rows share its chunk (matmul kernels are chosen by shape).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import HeadMismatch, InputError
from .formats import head_transform_from, logits_from_hidden
from .supervision import chunked_logits, compute_target_distribution, logit_chunks

AUX_CONVENTION = "decoder_layer_output"  # layer i's output, before the final norm (transformers' hidden_states[i + 1], except
# for the last layer, whose hidden_states[N] transformers gives after the final norm; NeMo hooks the layer too)


def load_tokenizer(model_path: str, revision: str | None, trust_remote_code: bool, config=None):
    """`config`: the target's config when already loaded, so that transformers does not read it again."""
    from transformers import AutoTokenizer

    local = Path(model_path)
    if local.is_dir() and not any(
        p.name.startswith(("tokenizer", "vocab", "spiece", "sentencepiece", "merges")) or p.suffix == ".tiktoken" for p in local.iterdir()
    ):  # checked here: transformers would blame a missing sentencepiece install
        raise InputError(
            f"--target-model: {model_path!r} has no tokenizer files (found {sorted(p.name for p in local.iterdir())}); "
            "expected tokenizer.json and tokenizer_config.json beside config.json: copy them from the model the "
            "weights came from"
        )
    from .tokenize import note_loaded_settings

    try:
        extra = {"config": config} if config is not None else {}
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(
            f"--target-model: no usable tokenizer at {model_path!r} ({type(err).__name__}: {' '.join(str(err).split())}); "
            "expected tokenizer files (tokenizer.json / tokenizer_config.json) beside the model"
        ) from None
    note_loaded_settings(tokenizer)  # before any encode call turns them off: see recorded_tokenizer_hashes
    return tokenizer


def load_config(model_path: str, revision: str | None, trust_remote_code: bool):
    from huggingface_hub import is_offline_mode
    from transformers import AutoConfig

    local = Path(model_path)
    if local.is_dir() and not (local / "config.json").is_file():  # transformers would ask for a `model_type` key
        raise InputError(
            f"--target-model: {model_path!r} has no config.json (found {sorted(p.name for p in local.iterdir())}); "
            "expected a model directory with config.json, weights and tokenizer files"
        )
    try:
        return AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        found = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        if Path(model_path).exists():
            raise InputError(
                f"--target-model: cannot read a model config from the local path {model_path!r} ({found}); "
                "expected a model directory with its config.json"
            ) from None
        hint = (
            "HF_HUB_OFFLINE is set, so only models already in the local cache load: unset it, download the model "
            "first, or give a local model directory"
            if is_offline_mode()
            else "check the id, --target-revision and your access, or give a local model directory"
        )
        raise InputError(
            f"--target-model: {model_path!r} is not a local path, and as a Hub model id its config could not be loaded ({found}); {hint}"
        ) from None


EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")  # routed experts, by config family


def text_config(config):
    """The language-model settings, also for multimodal wrappers that keep them in `text_config`."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolved_revision(model_path: str, revision: str | None) -> str | None:
    """The commit a Hub id's files load from: the name of the local Hub cache's snapshot folder that
    holds the config `load_config` just read. No request is made, so an offline build (HF_HUB_OFFLINE,
    the model already downloaded) records it as an online one does. None for a local directory (its
    files are hashed instead)."""
    if Path(model_path).exists():
        return None
    from transformers.utils.hub import cached_file

    try:
        commit = Path(cached_file(model_path, "config.json", revision=revision, local_files_only=True)).parent.name
        found = f"the snapshot folder {commit!r}"
    except (OSError, ValueError) as err:
        commit, found = None, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    if not is_commit(commit):
        raise InputError(
            f"--target-model: expected {model_path!r} (revision {revision or 'main'}) in the local Hub cache, in a snapshot "
            f"folder named by its commit, which the build records; found {found}. Load the model with transformers or "
            "`hf download` into the default Hub cache (HF_HOME or HF_HUB_CACHE), or give a local model directory"
        )
    return commit


def is_commit(name: str | None) -> bool:
    return name is not None and len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def compute_device() -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU, fp32 on CPU (CPUs are slow in bf16 and tests want exact fp32)."""
    from accelerate import PartialState

    device = PartialState().device
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    model_path: str, revision: str | None, trust_remote_code: bool, device, dtype, *, device_map=None, max_memory=None, config=None
):
    """On one device, or placed over several with a `device_map` ("auto" with `max_memory`, or explicit).
    `config`: the target's config when already loaded (`load_config`), so it is not read and parsed again."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            **({"config": config} if config is not None else {}),
        )
    except (OSError, SafetensorError) as err:  # weight files missing, truncated or not downloadable
        raise InputError(weights_unloadable(model_path, err)) from None
    if device_map is None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def weights_unloadable(model_path: str, err: Exception) -> str:
    found = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    if Path(model_path).is_dir():
        return (
            f"--target-model: cannot load the weights in {model_path!r} ({found}); expected its complete weight files beside "
            "config.json (model.safetensors, or the index and every shard it names, or pytorch_model.bin): copy or download "
            "them again from the model's source"
        )
    return (
        f"--target-model: cannot load the weights of {model_path!r} from the Hub or the local Hub cache ({found}); check "
        "your network and access to the model, or download it first (`hf download`) and build with HF_HUB_OFFLINE=1"
    )


def decoder_layers(model, num_layers: int) -> torch.nn.ModuleList:
    """The decoder's layer list, found by its structure wherever the architecture keeps it: a ModuleList
    of `num_layers` modules under the base model, whatever its name (`layers` for Llama and most others,
    `language_model.layers` in multimodal wrappers, `h` for GPT-2, Falcon, Bloom, GPT-J and GPT-BigCode,
    `blocks` for MPT). A list named `layers` comes first, as one of another name may be something else
    kept per layer; then the shortest path, so that a vision encoder's list comes after the decoder's."""
    base = model.base_model
    found = [
        (name, module) for name, module in base.named_modules() if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
    ]
    if not found:
        lists = {name: len(module) for name, module in base.named_modules() if isinstance(module, torch.nn.ModuleList)}
        raise InputError(
            f"--target-model: expected the {num_layers} decoder layers of {type(model).__name__} (its config's num_hidden_layers) "
            f"as one torch.nn.ModuleList of {num_layers} modules under its base model {type(base).__name__}, "
            f"found {'ModuleLists ' + str(lists) if lists else 'no ModuleList'}: the builder hooks the aux layers there. "
            "Use a target whose decoder keeps its layers in one list, as transformers' decoder-only models do"
        )
    return min(found, key=lambda item: (item[0].split(".")[-1] != "layers", item[0].count("."), len(item[0])))[1]


# The logit terms transformers' *ForCausalLM.forward applies after lm_head, by the config key holding
# them: logit_scale multiplies (Cohere), logits_scaling divides (Granite, MiniCPM3), lm_head_multiplier
# multiplies (Falcon-H1), final_logit_softcapping caps (Gemma 2/3). Any other term is caught by
# `Target.check_head` at start-up, before anything is written.
HEAD_TERMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})  # muP: logits * logits_scaling, where Granite divides
HEAD_PROBE_TOKENS = 64


def head_spec(config, *, lm_head_bias: bool = False) -> dict:
    """Logit post-processing some families apply after `lm_head` (None when absent); recorded in the
    manifest so that a reader of `hidden` caches applies it exactly as the build did. `lm_head_bias`:
    the cache's head file holds a bias the reader must add first."""
    cfg = text_config(config)
    spec = {k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else getattr(config, k, None) for k in HEAD_TERMS}
    if getattr(cfg, "model_type", None) in LOGITS_SCALING_MULTIPLIES and spec["logits_scaling"] is not None:
        spec["logit_scale"], spec["logits_scaling"] = spec["logits_scaling"], None
    return spec | ({"lm_head_bias": True} if lm_head_bias else {})


def head_tolerance(dtype: torch.dtype) -> float:
    """Largest difference, relative to the largest |logit| (at least 1), between two computations of
    the same logits: a few roundings in half precision, matmul blocking in fp32."""
    return max(4 * torch.finfo(dtype).eps, 1e-5)


def architecture_name(model) -> str:
    return f"{text_config(model.config).model_type} ({type(model).__name__})"


class Target:
    """A loaded target with aux-layer hooks; `supervise` runs one batch."""

    def __init__(self, model, aux_layer_ids: list[int]):
        cfg = text_config(model.config)
        self.model = model
        self.aux_layer_ids = list(aux_layer_ids)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.head = model.get_output_embeddings()
        self.transform = head_transform_from(head_spec(model.config)) or (lambda logits: logits)
        self._logits_dtype: torch.dtype | None = None
        self.embedding_rows = model.get_input_embeddings().weight.shape[0]
        self._captured: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model, cfg.num_hidden_layers)
        self._hooks = [layers[i].register_forward_hook(self._capture_hook(i)) for i in self.aux_layer_ids]

    def _capture_hook(self, layer_id: int):
        def hook(_module, _inputs, output):
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()

    @property
    def device(self) -> torch.device:
        """Where outputs are gathered (the head's device); inputs go to `input_device`."""
        return self.head.weight.device

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aux states `[B, T, A*H]` (concatenated in aux-id order) and the final hidden state `[B, T, H]`."""
        self._captured.clear()
        input_ids = padding_in_table(input_ids, attention_mask, self.embedding_rows)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        # Layers may sit on different devices (a placed target): gather on the head's device.
        aux = torch.cat([self._captured[i].to(self.device) for i in self.aux_layer_ids], dim=-1)
        self._captured.clear()
        return aux, out.last_hidden_state.to(self.device)

    @property
    def logits_dtype(self) -> torch.dtype:
        """The dtype of the target's own forward logits. Some widen the head's output before their logit
        terms (Beam softcaps in fp32): the head path must widen too, or it rounds the terms' result to the
        head's half precision, which the live target never does. Found once, from a one-token forward."""
        if self._logits_dtype is None:
            if self.head.weight.dtype == torch.float32:
                self._logits_dtype = torch.float32  # nothing wider to widen to
            else:
                with torch.inference_mode():
                    ids = torch.zeros(1, 1, dtype=torch.long, device=self.input_device)
                    self._logits_dtype = self.model(input_ids=ids, use_cache=False).logits.dtype
                self._captured.clear()
        return self._logits_dtype

    def head_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit terms, applied in the dtype the target's own forward applies them in."""
        return self.transform(logits.to(self.logits_dtype))

    @torch.inference_mode()
    def logits_at(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits `[n, V]` for `[n, H]` rows, in fixed-shape chunks."""
        return chunked_logits(hidden_rows, self.head, self.head_transform, width=self.vocab_size)

    @torch.inference_mode()
    def check_head(self, probe_ids: torch.Tensor, draft: tuple | None = None) -> float:
        """Refuse (HeadMismatch) a target whose own `forward` logits on `probe_ids` `[1, T]` differ from the
        head path's beyond the dtype's rounding; `draft` = (selected ids, head rows, transform) also checks
        how `hidden` caches rebuild the draft-vocab logits. Returns the largest relative difference."""
        ids = probe_ids.to(self.input_device)
        attention = torch.ones_like(ids)
        live = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        live = live.flatten(0, 1).to(self.device).float()
        rows = self.forward(ids, attention)[1].flatten(0, 1)
        finite = live.isfinite().all(-1)  # a NaN weight is --strict's business, not the head's
        live, rows = live[finite], rows[finite]
        if not len(rows):
            return 0.0
        spec = {k: v for k, v in head_spec(self.model.config).items() if v is not None}
        checks = [(" + ".join(["lm_head", *(f"{k} {v}" for k, v in spec.items())]), self.logits_at(rows).float(), live)]
        if draft is not None:
            selected, draft_rows, transform = draft
            checks.append(
                (
                    "the hidden format's rebuild: lm_head rows + bias + terms",
                    logits_from_hidden(rows, draft_rows, transform),
                    live.index_select(-1, selected),
                )
            )
        dtype, scale = self.head.weight.dtype, max(1.0, live.abs().max().item())
        worst = 0.0
        for path, ours, want in checks:
            diff = (ours - want).abs().max().item() / scale
            if not diff <= head_tolerance(dtype):  # NaN included
                raise HeadMismatch(
                    architecture_name(self.model), path, diff * scale, head_tolerance(dtype) * scale, str(dtype).removeprefix("torch.")
                )
            worst = max(worst, diff)
        return worst

    @torch.inference_mode()
    def supervise(self, input_ids, attention_mask, loss_mask, selected_token_ids, *, log_draft_mass: bool = True) -> dict:
        """One padded batch -> the live outputs every format is encoded from:
        `aux` `[B, T, A*H]`, `final_hidden` `[B, T, H]`, and at the `n` loss-masked positions
        (row-major) `probs` `[n, Vd]` fp32, full-vocab `argmax` `[n]` and `log_draft_mass` `[n]`
        (two log-sum-exps over every logit: only when asked for, as `topk` caches store it),
        and `loss_positions` `[n]`, their flat indices into `B * T`.

        Give `loss_mask` on the host: the loss rows are then counted there, and nothing in the
        batch waits for the GPU (a mask on the device is counted by the device, which waits)."""
        aux, final_hidden = self.forward(input_ids, attention_mask)
        positions = loss_mask.reshape(-1).nonzero().squeeze(1).to(self.device, non_blocking=True)
        rows = final_hidden.flatten(0, 1).index_select(0, positions)  # = final_hidden[loss_mask], row-major
        probs, argmax, log_mass = [], [], []
        # Each fixed-shape chunk's [chunk, V] logits are used up while they are still in cache; only the
        # [n, Vd] results are joined. Zero rows pad the last chunk and are cut off after the join.
        for logits in logit_chunks(rows, self.head, self.head_transform):
            sup = compute_target_distribution(logits, None, selected_token_ids)  # every row is a loss position
            probs.append(sup.target_probs)
            argmax.append(sup.argmax)
            if log_draft_mass:
                full = logits.float()
                log_mass.append(torch.logsumexp(full.index_select(-1, selected_token_ids), -1) - torch.logsumexp(full, -1))
        n = len(positions)
        live = {
            "aux": aux,
            "final_hidden": final_hidden,
            "loss_positions": positions,
            "probs": _joined(probs, n, rows.new_zeros(0, len(selected_token_ids), dtype=torch.float32)),
            "argmax": _joined(argmax, n, rows.new_zeros(0, dtype=torch.long)),
        }
        if log_draft_mass:
            live["log_draft_mass"] = _joined(log_mass, n, rows.new_zeros(0, dtype=torch.float32))
        return live


def padding_in_table(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int) -> torch.Tensor:
    """`input_ids` with every padded position past the embedding table set to id 0. Batches are padded
    with the tokenizer's pad id, which lies past the table when a pad token was added to the tokenizer
    without resizing the model's embeddings; padded positions are masked out, so any row serves, and
    the build and `verify --recompute` both pass here, so both feed the same ids. Real tokens were
    checked against the vocabulary before the weights loaded (`vocab.count_loss_tokens`)."""
    return input_ids.masked_fill(attention_mask.eq(0) & input_ids.ge(rows), 0)


def _joined(chunks: list[torch.Tensor], n: int, empty: torch.Tensor) -> torch.Tensor:
    """The head chunks' results as one tensor of the `n` real rows (a view when there is one chunk)."""
    if not chunks:
        return empty
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks))[:n]
