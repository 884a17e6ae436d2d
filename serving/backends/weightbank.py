"""Cross-model execution: one forward pass for a batch of requests to *different* BERT models.

When traffic spreads over thousands of models, each model sees a request or two at a time,
so batching inside one model leaves the device idle. Models of one architecture share every
shape, so their weights are stacked per layer into slots (``[slots, in, out]``; query, key
and value as one ``[h, 3h]`` linear) and a batch of requests to different models runs as one
grouped GEMM per linear layer (``torch._grouped_mm``,
which has a CPU fallback, so the same code runs in CI), per-request gathers for embeddings and
layer-norm parameters, and attention per sequence with padding masks.

:class:`WeightBank` holds the stacked weights (fp32, fp16, bf16, or int8 per output channel
with scales); :class:`CrossModelExecutor` runs the forward; :class:`ModelPool` keeps more
models than slots in host memory (pinned when CUDA is present) and swaps them in on demand,
evicting by demand against reload cost and never a model in use.

One module past 500 lines on purpose: the bank's layout (slots, int8 scales, padded heads), the
executor that reads it and the pool that fills it change together.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from packing.contracts import ENGINE_PRECISIONS
from packing.errors import MyriadError
from serving.backends.ondemand import Demand

# Query, key and value are one ``[h, 3h]`` linear ("qkv"): one GEMM per model instead of three
# (with the bias in the GEMM, 8-12% of a bert-mini forward on a CPU; two launches fewer per
# layer on a GPU).
LINEARS = ("qkv", "attention_out", "intermediate", "output")


@dataclass(frozen=True)
class BertShape:
    """What models must share to run together: the encoder shape and the head."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    task: str  # "embedding" | "sequence-classification"
    num_labels: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class CrossModelError(MyriadError, ValueError):
    """A model does not fit the engine's shape (another shape or head) or the pool is misused."""


def bert_weights(module: torch.nn.Module, task: str) -> tuple[BertShape, dict[str, torch.Tensor]]:
    """Shape and normalised weights of an eager HF BERT (bare, in a MeanPoolEmbedding or a
    ClassificationLogits wrapper); every linear weight is stored as ``[in, out]``."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    anchor = next((k for k in state if k.endswith("embeddings.word_embeddings.weight")), None)
    if anchor is None:
        raise CrossModelError("not a BERT model: no embeddings.word_embeddings.weight")
    prefix = anchor.removesuffix("embeddings.word_embeddings.weight")
    base = prefix.removesuffix("bert.") if prefix.endswith("bert.") else prefix

    def get(name: str) -> torch.Tensor:
        try:
            return state[prefix + name]
        except KeyError:
            raise CrossModelError(f"BERT weight {name} is missing") from None

    layers = 1 + max(int(k[len(prefix) :].split(".")[2]) for k in state if ".layer." in k)
    config = _find_config(module)
    if config is None or not getattr(config, "num_attention_heads", None):
        raise CrossModelError("the model carries no config with num_attention_heads")
    heads = int(config.num_attention_heads)
    # The executor implements exact GELU and absolute positions; anything else would give
    # silently different outputs.
    activation = getattr(config, "hidden_act", "gelu")
    positions = getattr(config, "position_embedding_type", "absolute")
    if activation != "gelu" or positions != "absolute":
        raise CrossModelError(
            f"the cross-model engine runs BERT with hidden_act 'gelu' and absolute positions, "
            f"not {activation!r} / {positions!r}"
        )
    eps = float(getattr(config, "layer_norm_eps", 1e-12))
    word = get("embeddings.word_embeddings.weight")
    weights: dict[str, torch.Tensor] = {
        "word": word,
        "position": get("embeddings.position_embeddings.weight"),
        "token_type": get("embeddings.token_type_embeddings.weight"),
        "emb_ln.w": get("embeddings.LayerNorm.weight"),
        "emb_ln.b": get("embeddings.LayerNorm.bias"),
    }
    names = {
        "attention_out": "attention.output.dense",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    }
    for i in range(layers):
        attention = [f"encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")]
        weights[f"{i}.qkv.w"] = torch.cat([get(f"{n}.weight").t() for n in attention], dim=1)
        weights[f"{i}.qkv.b"] = torch.cat([get(f"{n}.bias") for n in attention])
        for short, long in names.items():
            weights[f"{i}.{short}.w"] = get(f"encoder.layer.{i}.{long}.weight").t().contiguous()
            weights[f"{i}.{short}.b"] = get(f"encoder.layer.{i}.{long}.bias")
        weights[f"{i}.ln1.w"] = get(f"encoder.layer.{i}.attention.output.LayerNorm.weight")
        weights[f"{i}.ln1.b"] = get(f"encoder.layer.{i}.attention.output.LayerNorm.bias")
        weights[f"{i}.ln2.w"] = get(f"encoder.layer.{i}.output.LayerNorm.weight")
        weights[f"{i}.ln2.b"] = get(f"encoder.layer.{i}.output.LayerNorm.bias")
    num_labels = 0
    if task == "sequence-classification":
        weights["pooler.w"] = get("pooler.dense.weight").t().contiguous()
        weights["pooler.b"] = get("pooler.dense.bias")
        classifier = state.get(base + "classifier.weight")
        if classifier is None:
            raise CrossModelError("a classification model needs classifier.weight")
        weights["classifier.w"] = classifier.t().contiguous()
        weights["classifier.b"] = state[base + "classifier.bias"]
        num_labels = classifier.shape[0]
    shape = BertShape(
        layers=layers,
        hidden=word.shape[1],
        heads=heads,
        intermediate=weights["0.intermediate.w"].shape[1],
        vocab=word.shape[0],
        max_positions=weights["position"].shape[0],
        type_vocab=weights["token_type"].shape[0],
        eps=eps,
        task=task,
        num_labels=num_labels,
    )
    return shape, weights


def _find_config(module: torch.nn.Module) -> object | None:
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None:
            return config
    return None


class WeightBank:
    """Stacked weights of ``slots`` models on one device.

    With ``int8``, each linear weight is stored as int8 per output channel with a scale
    (weight-only quantisation); embeddings, biases and norms stay in ``dtype``.
    """

    def __init__(
        self,
        shape: BertShape,
        slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        int8: bool = False,
    ) -> None:
        if slots < 1:
            raise CrossModelError(f"a weight bank needs at least one slot, got {slots}")
        self.shape, self.slots, self.dtype, self.int8 = shape, slots, dtype, int8
        self.device = torch.device(device)
        self.tensors: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        for name, example in _example_shapes(shape).items():
            if int8 and _quantized(name):
                # Linear weights: a scale per output channel; word embeddings: one per row.
                scale_shape = (slots, example[0] if name == "word" else example[1])
                self.tensors[name] = torch.zeros((slots, *example), dtype=torch.int8, device=device)
                self.scales[name] = torch.ones(scale_shape, dtype=dtype, device=device)
            else:
                self.tensors[name] = torch.zeros((slots, *example), dtype=dtype, device=device)

    def write(self, slot: int, weights: dict[str, torch.Tensor]) -> None:
        """Copy one model's weights into ``slot`` (non-blocking from pinned host memory)."""
        for name, tensor in self.tensors.items():
            source = _fit(name, weights[name], tuple(tensor.shape[1:]))
            if source.shape != tensor.shape[1:]:
                raise CrossModelError(
                    f"weight {name} has shape {tuple(source.shape)}, the engine's shape "
                    f"{tuple(tensor.shape[1:])}"
                )
            if name in self.scales:
                quantized, scale = (
                    quantize_int8(source.t()) if name == "word" else quantize_int8(source)
                )
                quantized = quantized.t() if name == "word" else quantized
                tensor[slot].copy_(quantized, non_blocking=True)
                self.scales[name][slot].copy_(scale.to(self.dtype), non_blocking=True)
            else:
                tensor[slot].copy_(source.to(self.dtype), non_blocking=True)

    def linear_weights(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        if slots.numel() == 1 and name not in self.scales:
            index = int(slots[0])
            return self.tensors[name][index : index + 1]  # a view, no copy
        stacked = self.tensors[name].index_select(0, slots.to(self.device))
        if name in self.scales:
            return stacked.to(self.dtype) * self.scales[name].index_select(0, slots).unsqueeze(1)
        return stacked

    @property
    def bytes_per_slot(self) -> int:
        total = sum(t[0].numel() * t.element_size() for t in self.tensors.values())
        return total + sum(s[0].numel() * s.element_size() for s in self.scales.values())


# Per engine precision: bytes per element, and whether linear weights are int8.
BANK_LAYOUTS = {"fp32": (4, False), "bf16": (2, False), "fp16": (2, False), "int8": (2, True)}
assert tuple(BANK_LAYOUTS) == ENGINE_PRECISIONS


def planned_bytes(shape: BertShape) -> dict[str, int]:
    """Bytes one model takes in a weight bank at each engine precision ("int8": int8 linear
    weights with bf16 scales, embeddings and norms), for the packer's profiles."""
    sizes = {}
    for precision, (width, int8) in BANK_LAYOUTS.items():
        total = 0
        for name, dims in _example_shapes(shape).items():
            count = math.prod(dims)
            if int8 and _quantized(name):
                total += count + (dims[0] if name == "word" else dims[1]) * width
            else:
                total += count * width
        sizes[precision] = total
    return sizes


def _quantized(name: str) -> bool:
    """Stored as int8 in an int8 bank: linear weights and the word embeddings (the largest
    tensors); position embeddings, biases and norms stay in the bank's dtype."""
    return name == "word" or (name.endswith(".w") and name.split(".")[1] in LINEARS)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of an ``[in, out]`` weight."""
    w = weight.float()
    scale = w.abs().amax(dim=0).clamp(min=1e-12) / 127.0
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def _padded(labels: int) -> int:
    return -(-labels // 8) * 8


def _fit(name: str, source: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The classifier's label dimension padded with zeros to the bank's aligned width."""
    if name.startswith("classifier.") and source.shape[-1] < dims[-1]:
        return F.pad(source, (0, dims[-1] - source.shape[-1]))
    return source


def _example_shapes(shape: BertShape) -> dict[str, tuple[int, ...]]:
    h, i = shape.hidden, shape.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "word": (shape.vocab, h),
        "position": (shape.max_positions, h),
        "token_type": (shape.type_vocab, h),
        "emb_ln.w": (h,),
        "emb_ln.b": (h,),
    }
    dims = {
        "qkv": (h, 3 * h),
        "attention_out": (h, h),
        "intermediate": (h, i),
        "output": (i, h),
    }
    for layer in range(shape.layers):
        for name, (n_in, n_out) in dims.items():
            shapes[f"{layer}.{name}.w"] = (n_in, n_out)
            shapes[f"{layer}.{name}.b"] = (n_out,)
        for norm in ("ln1", "ln2"):
            shapes[f"{layer}.{norm}.w"] = (h,)
            shapes[f"{layer}.{norm}.b"] = (h,)
    if shape.task == "sequence-classification":
        shapes["pooler.w"] = (h, h)
        shapes["pooler.b"] = (h,)
        # Grouped GEMM wants 16-byte-aligned rows: the label dimension is padded with zeros.
        shapes["classifier.w"] = (h, _padded(shape.num_labels))
        shapes["classifier.b"] = (_padded(shape.num_labels),)
    return shapes


class CrossModelExecutor:
    """The forward pass of a batch whose requests each name a slot of the bank."""

    def __init__(
        self,
        bank: WeightBank,
        grouped: bool = True,
        full_bank: bool = False,
        views: bool | None = None,
    ) -> None:
        self.bank = bank
        self.shape = bank.shape
        # full_bank: hand the grouped GEMM the whole bank with empty groups for the slots not
        # in the batch, instead of a copy of the batch's groups (saves a weight copy per layer;
        # an older torch hung on empty groups on CUDA, so it is opt-in until measured there).
        self.full_bank = full_bank and not bank.int8
        # torch._grouped_mm: one kernel for all groups on CUDA (bf16). On CPU it is a loop of
        # GEMMs after a copy of the batch's weights out of the bank, and that copy cost more
        # than the GEMMs (37% of a forward of 16 bert-mini models); there, as without it
        # (older torch), one GEMM per model runs on its view of the bank. int8 weights need
        # the dequantising copy either way. ``views`` None: that choice; True/False forces it.
        self.grouped = grouped and hasattr(torch, "_grouped_mm")
        if views is None:
            views = not self.grouped or bank.device.type == "cpu"
        self.views = views and not bank.int8

    @torch.inference_mode()
    def forward(
        self, slots: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``slots`` [B], ``input_ids`` and ``attention_mask`` [B, T] → [B, hidden] L2-normed
        mean-pooled vectors (embedding) or [B, num_labels] logits (classification)."""
        bank, shape = self.bank, self.shape
        device = bank.device
        order = torch.argsort(slots, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        slots = slots[order].to(device)
        ids = input_ids[order].to(device)
        mask = attention_mask[order].to(device)
        batch, length = ids.shape
        unique, counts = torch.unique_consecutive(slots, return_counts=True)
        if self.full_bank and self.grouped:
            counts = torch.bincount(slots, minlength=bank.slots)
            unique = torch.arange(bank.slots, device=device)
        token_offsets = (counts * length).cumsum(0).to(torch.int32)
        request_offsets = counts.cumsum(0).to(torch.int32)
        token_groups = list(zip(unique.tolist(), token_offsets.tolist(), strict=True))
        request_groups = list(zip(unique.tolist(), request_offsets.tolist(), strict=True))

        t = bank.tensors
        positions = torch.arange(length, device=device)
        words = t["word"][slots.unsqueeze(1), ids]
        if "word" in bank.scales:
            scale = bank.scales["word"][slots.unsqueeze(1), ids]
            words = words.to(bank.dtype) * scale.unsqueeze(-1)
        x = (
            words
            + t["position"][slots.unsqueeze(1), positions.unsqueeze(0)]
            + t["token_type"][slots, 0].unsqueeze(1)
        )
        x = self._norm(x, "emb_ln", slots)
        keep = mask.bool()[:, None, None, :]
        for layer in range(shape.layers):

            def linear(z: torch.Tensor, name: str, layer: int = layer) -> torch.Tensor:
                return self._linear(
                    z, f"{layer}.{name}", slots, unique, token_offsets, token_groups
                )

            q, k, v = (self._heads(z) for z in linear(x, "qkv").split(shape.hidden, dim=-1))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            context = context.transpose(1, 2).reshape(batch, length, shape.hidden)
            x = self._norm(linear(context, "attention_out") + x, f"{layer}.ln1", slots)
            inner = F.gelu(linear(x, "intermediate"))
            x = self._norm(linear(inner, "output") + x, f"{layer}.ln2", slots)
        if shape.task == "embedding":
            weights = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            result = F.normalize(pooled.float(), p=2.0, dim=1)
        else:
            first = x[:, :1, :]
            pooled = torch.tanh(
                self._linear(first, "pooler", slots, unique, request_offsets, request_groups)
            )
            logits = self._linear(
                pooled, "classifier", slots, unique, request_offsets, request_groups
            )[:, 0]
            result = logits[:, : shape.num_labels].float()
        return result[inverse].cpu()

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        batch, length, _ = z.shape
        return z.view(batch, length, self.shape.heads, self.shape.head_dim).transpose(1, 2)

    def _norm(self, x: torch.Tensor, name: str, slots: torch.Tensor) -> torch.Tensor:
        t = self.bank.tensors
        x = F.layer_norm(x, (self.shape.hidden,), eps=self.shape.eps)
        return x * t[f"{name}.w"][slots].unsqueeze(1) + t[f"{name}.b"][slots].unsqueeze(1)

    def _linear(
        self,
        x: torch.Tensor,
        name: str,
        slots: torch.Tensor,
        unique: torch.Tensor,
        offsets: torch.Tensor,
        groups: list[tuple[int, int]],
    ) -> torch.Tensor:
        """``x`` [B, T, in] sorted by slot → [B, T, out], one group per distinct model;
        ``groups``: (slot, end row) per group, the same as ``unique`` and ``offsets``."""
        batch, length, n_in = x.shape
        flat = x.reshape(batch * length, n_in)
        if self.views:
            # One GEMM per model straight from its view of the bank, its bias added by the
            # GEMM, into its rows of y.
            bank, biases = self.bank.tensors[f"{name}.w"], self.bank.tensors[f"{name}.b"]
            y = flat.new_empty((batch * length, bank.shape[-1]))
            start = 0
            for slot, end in groups:
                torch.addmm(biases[slot], flat[start:end], bank[slot], out=y[start:end])
                start = end
            return y.view(batch, length, -1)
        if self.grouped:
            # [G, in, out] for the models in the batch (or the whole bank), one grouped GEMM.
            weights = (
                self.bank.tensors[f"{name}.w"]
                if self.full_bank
                else self.bank.linear_weights(f"{name}.w", unique)
            )
            y = torch._grouped_mm(flat, weights, offs=offsets)
        else:
            pieces, start = [], 0
            for slot, end in groups:
                weight = self.bank.linear_weights(f"{name}.w", torch.tensor([slot]))[0]
                pieces.append(flat[start:end] @ weight)
                start = end
            y = torch.cat(pieces)
        y = y.view(batch, length, -1)
        return y + self.bank.tensors[f"{name}.b"][slots].unsqueeze(1)


class PoolFull(RuntimeError):
    """A batch names more distinct models than the bank has slots, or all are in use."""


class ModelPool:
    """Models beyond the device's slots wait in host memory and swap in on demand.

    Eviction weighs each resident model's demand (requests per second, decayed: the rule of
    :class:`serving.backends.ondemand.Demand`, which the on-demand tier evicts by too) against
    its reload cost (bytes over the measured copy bandwidth): the one whose eviction costs least
    expected reload time goes. A model in use by a running batch is never evicted, and a slot
    is published only after its copy completes, so no forward sees half-written weights.
    """

    def __init__(self, bank: WeightBank, half_life_s: float = 10.0) -> None:
        self.bank = bank
        self.host: dict[str, dict[str, torch.Tensor]] = {}
        self.resident: dict[str, int] = {}
        self.slot_owner: dict[int, str] = {}
        self.in_use: dict[int, int] = {}
        self.demand = Demand(half_life_s)
        self.half_life_s = half_life_s
        self.swaps = 0
        self.swap_seconds = 0.0
        self._lock = threading.Lock()

    def add(self, model_id: str, weights: dict[str, torch.Tensor]) -> None:
        expected = _example_shapes(self.bank.shape)
        for name, dims in expected.items():
            if name not in weights or tuple(_fit(name, weights[name], dims).shape) != dims:
                got = tuple(weights[name].shape) if name in weights else "missing"
                raise CrossModelError(
                    f"model {model_id}: weight {name} is {got}, the engine's shape {dims}"
                )
        pin = self.bank.device.type == "cuda"
        self.host[model_id] = {
            n: (w.contiguous().pin_memory() if pin else w.contiguous()) for n, w in weights.items()
        }

    def remove(self, model_id: str) -> None:
        with self._lock:
            slot = self.resident.get(model_id)
            if slot is not None and self.in_use.get(slot):
                raise CrossModelError(f"model {model_id} is in use and cannot be removed")
            if slot is not None:
                del self.resident[model_id]
                del self.slot_owner[slot]
            self.host.pop(model_id, None)
            self.demand.forget(model_id)

    def acquire(self, model_ids: list[str]) -> list[int]:
        """Slots for ``model_ids`` (in order), swapping in what is not resident; hold them
        until :meth:`release`."""
        wanted = list(dict.fromkeys(model_ids))
        unknown = [m for m in wanted if m not in self.host]
        if unknown:
            raise CrossModelError(f"models {unknown[:5]} are not in the pool")
        if len(wanted) > self.bank.slots:
            raise PoolFull(f"{len(wanted)} distinct models in one batch, {self.bank.slots} slots")
        with self._lock:
            now = time.monotonic()
            for model_id in model_ids:
                self.demand.touch(model_id, now)
            for model_id in wanted:
                if model_id not in self.resident:
                    slot = self._free_slot(set(wanted))
                    started = time.perf_counter()
                    self.bank.write(slot, self.host[model_id])
                    if self.bank.device.type == "cuda":
                        torch.cuda.synchronize(self.bank.device)
                    self.swap_seconds += time.perf_counter() - started
                    self.swaps += 1
                    self.resident[model_id] = slot
                    self.slot_owner[slot] = model_id
            slots = [self.resident[m] for m in model_ids]
            for slot in {self.resident[m] for m in wanted}:
                self.in_use[slot] = self.in_use.get(slot, 0) + 1
            return slots

    def release(self, slots: list[int]) -> None:
        with self._lock:
            for slot in set(slots):
                self.in_use[slot] -= 1

    def _free_slot(self, keep: set[str]) -> int:
        for slot in range(self.bank.slots):
            if slot not in self.slot_owner:
                return slot
        now = time.monotonic()
        candidates = [
            (self.demand.score(m, now), m, slot)
            for m, slot in self.resident.items()
            if m not in keep and not self.in_use.get(slot)
        ]
        if not candidates:
            raise PoolFull("every slot holds a model in use")
        # Every model of one shape costs the same bytes to reload, so the least expected demand
        # is the least expected reload time.
        _, victim, slot = min(candidates)
        del self.resident[victim]
        del self.slot_owner[slot]
        return slot

    @property
    def mean_swap_seconds(self) -> float:
        return self.swap_seconds / self.swaps if self.swaps else math.nan
