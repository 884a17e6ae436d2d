"""Eager PyTorch models behind a model source, wrapped so that every task has the same traced
signature: ``forward(input_ids, attention_mask) -> Tensor``.

``embedding`` models return L2-normalised mean-pooled vectors (the sentence-transformers recipe);
``sequence-classification`` models return logits.
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from packing.contracts import ModelSpec
from serving import settings
from serving.build.sources import (
    SYNTHETIC_ARCHITECTURES,
    ResolvedSource,
    SourceError,
    download_s3_directory,
    synthetic_seed,
)

# TorchScript is the artifact format the design fixes (Neuron traces are TorchScript too); torch
# 2.13 warns on every torch.jit.save/load that it is deprecated, once per model, in every server.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
)
# transformers 5 itself calls its own deprecated property while building models.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole-word entries of the synthetic vocabularies, as a real WordPiece vocabulary has them: a
# sentence of common words then costs about a token a word (as with bert-base's vocabulary), not
# one per character, so synthetic models see the sequence lengths real ones would.
COMMON_WORDS = tuple(
    """
    the of and to a in is it you that he was for on are as with his they i at be this have
    from or one had by word but not what all were we when your can said there use an each which
    she do how their if will up other about out many then them these so some her would make like
    him into time has look two more write go see number no way could people my than first water
    been call who oil its now find long down day did get come made may part over new sound take
    only little work know place year live me back give most very after thing our just name good
    sentence man think say great where help through much before line right too mean old any same
    tell boy follow came want show also around form three small set put end does another well
    large must big even such because turn here why ask went men read need land different home us
    move try kind hand picture again change off play spell air away animal house point page
    letter mother answer found study still learn should world service quick staff friendly order
    arrived late box damaged reset password best purchase all year meeting moved thursday weather
    forecast says rain tomorrow afternoon please send invoice price product customer support
    account delivery refund great bad happy sad love hate today week month morning night
    """.split()
)

# Seeding goes through torch's global generator; traces run in worker threads, so building a
# synthetic model must not interleave with another one or its weights would depend on timing.
_SYNTHETIC_INIT_LOCK = threading.Lock()


class MeanPoolEmbedding(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


class ClassificationLogits(torch.nn.Module):
    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids=input_ids, attention_mask=attention_mask)[0]


class EagerModel:
    """An eager model, its tokenizer and the files needed to rebuild it."""

    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer: Tokenizer,
        config_json: str,
        labels: list[str],
    ) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.config_json = config_json
        self.labels = labels


def load_eager(spec: ModelSpec, source: ResolvedSource) -> EagerModel:
    """Build the eager model of ``spec``; no network access (HF offline)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig
    from transformers.utils import logging as hf_logging

    # Per-model progress bars and notices drown the pipeline's own log over thousands of models.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if source.kind == "synthetic":
        shape = SYNTHETIC_ARCHITECTURES[source.location]
        config = BertConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.num_attention_heads,
            intermediate_size=shape.intermediate_size,
            max_position_embeddings=shape.max_position_embeddings,
            num_labels=spec.num_labels,
        )
        config.return_dict = False
        tokenizer = synthetic_tokenizer(shape.vocab_size)
        with _SYNTHETIC_INIT_LOCK:
            generator_state = torch.random.get_rng_state()
            try:
                torch.manual_seed(synthetic_seed(spec.id))
                if spec.task == "embedding":
                    module: torch.nn.Module = MeanPoolEmbedding(AutoModel.from_config(config))
                else:
                    module = ClassificationLogits(
                        AutoModelForSequenceClassification.from_config(config)
                    )
            finally:
                torch.random.set_rng_state(generator_state)
        return EagerModel(module, tokenizer, config.to_json_string(), _labels(config, spec))

    if source.kind == "hf-s3":
        with tempfile.TemporaryDirectory(prefix="myriad-src-") as tmp:
            return _load_hf_directory(spec, download_s3_directory(source.location, Path(tmp)))
    return _load_hf_directory(spec, Path(source.location))


def _load_hf_directory(spec: ModelSpec, directory: Path) -> EagerModel:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        config.return_dict = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.task == "embedding":
                module = MeanPoolEmbedding(
                    AutoModel.from_pretrained(directory, config=config, local_files_only=True)
                )
            else:
                if config.num_labels != spec.num_labels and not config.id2label:
                    config.num_labels = spec.num_labels
                module = ClassificationLogits(
                    AutoModelForSequenceClassification.from_pretrained(
                        directory, config=config, local_files_only=True
                    )
                )
    except (OSError, ValueError) as exc:
        raise SourceError(f"model {spec.id}: cannot load {directory}: {exc}") from None
    return EagerModel(
        module, _hf_tokenizer(spec, directory), config.to_json_string(), _labels(config, spec)
    )


def _hf_tokenizer(spec: ModelSpec, directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(directory, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise SourceError(f"model {spec.id}: no usable tokenizer in {directory}: {exc}") from None
    return fast.backend_tokenizer


def _labels(config: object, spec: ModelSpec) -> list[str]:
    if spec.task != "sequence-classification":
        return []
    id2label = getattr(config, "id2label", None) or {}
    count = getattr(config, "num_labels", spec.num_labels)
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A WordPiece tokenizer that fills exactly ``vocab_size`` ids.

    Synthetic models have no vocabulary of their own and no hub is reachable, so every printable
    ASCII character (and its ``##`` continuation) gets an id, then as many of
    :data:`COMMON_WORDS` as fit (whole words, one token each), and the rest are unused slots:
    any text tokenises, common words as a real vocabulary would.
    """
    characters = [chr(c) for c in range(33, 127)]
    vocab_tokens = SPECIAL_TOKENS + characters + [f"##{c}" for c in characters]
    if vocab_size < len(vocab_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than {len(vocab_tokens)}")
    known = set(vocab_tokens)
    words = [w for w in dict.fromkeys(COMMON_WORDS) if w not in known]
    vocab_tokens += words[: vocab_size - len(vocab_tokens)]
    vocab_tokens += [f"[unused{i}]" for i in range(vocab_size - len(vocab_tokens))]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def configure_tokenizer(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """Truncate and pad to exactly ``max_length``: traced graphs (and Neuron) need fixed shapes."""
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(
        length=max_length, pad_id=pad_id if pad_id is not None else 0, pad_token="[PAD]"
    )
    return tokenizer


def encodings_of(tokenizer: Tokenizer, texts: list[str]) -> list:
    """The tokenizer's encodings of ``texts``, without the character offsets nothing here
    reads (``encode_batch_fast``: a fifth less CPU for a short text). While the tokenizers'
    thread pool is on (not in servers: :func:`serving.settings.use_serial_tokenizers`), a lone
    text skips it: the hand-off costs more than the text."""
    if len(texts) == 1 and settings.tokenizers_parallel():
        return [tokenizer.encode(texts[0])]
    return tokenizer.encode_batch_fast(texts)


def encode(
    tokenizer: Tokenizer, texts: list[str], trim_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to the tokenizer's length. ``trim_to``: cut the
    padding past the batch's longest text, rounded up to a multiple of ``trim_to`` (few
    distinct shapes for TorchScript's executor): the answers are the same, masked positions
    attend to nothing, and short texts cost a fraction of a full-length forward."""
    # numpy builds the arrays at a fraction of torch.tensor's cost over lists.
    encodings = encodings_of(tokenizer, texts)
    input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    if trim_to:
        longest = int(attention_mask.sum(axis=1).max())
        keep = min(input_ids.shape[1], -(-longest // trim_to) * trim_to)
        input_ids = np.ascontiguousarray(input_ids[:, :keep])
        attention_mask = np.ascontiguousarray(attention_mask[:, :keep])
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
