"""One configuration type, read from JSON, overridable with ``key=value`` pairs.

The config is a tree of dataclasses (``Config.model``, ``Config.data``, ``Config.train``).
It travels inside every checkpoint and export, so a model can always be rebuilt from it.
Unknown keys and bad values raise :class:`~stepwise.errors.ConfigError` with a one-line
message naming the key (``model.d_model: must be divisible by model.n_heads (8)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape of the encoder-decoder (paper section 3; base model: 512/8/6/2048)."""

    vocab_size: int = 8000
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    positional_encoding: str = "sinusoidal"
    max_positions: int = 512
    activation: str = "relu"
    norm_placement: str = "post"
    share_embeddings: bool = True
    tie_output: bool = True
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        for name in ("vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers",
                     "d_ff", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model: must be divisible by model.n_heads ({self.n_heads}), got {self.d_model}"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")
        _choice("model.positional_encoding", self.positional_encoding, ("sinusoidal", "learned"))
        _choice("model.activation", self.activation, ("relu", "gelu"))
        _choice("model.norm_placement", self.norm_placement, ("post", "pre"))
        ids = {"pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        if len(set(ids.values())) != 4:
            raise ConfigError(f"model.pad_id/unk_id/bos_id/eos_id: must be distinct, got {ids}")
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name}: must be in [0, vocab_size), got {value}")


@dataclass
class DataConfig:
    """Which corpus, which language pair, how it is split and tokenized."""

    corpus: str = "bible"
    # a ClearML dataset version holding train.tsv/valid.tsv/test.tsv (``stepwise corpus --upload``):
    # "PROJECT/NAME" (its latest version) or a dataset id; when set it replaces ``corpus``
    dataset: str = ""
    source_lang: str = "e"
    target_lang: str = "4"
    language_pair: str = "de-en"
    train_path: str = ""
    valid_path: str = ""
    test_path: str = ""
    # more training pairs from other translations of the Bible, "SOURCE-TARGET" codes (e.g. "s-4": a
    # second German source for the same English); the held-out books stay out, evaluation stays
    # source_lang -> target_lang
    extra_translations: list[str] = field(default_factory=list)
    test_books: list[int] = field(default_factory=lambda: [8, 31, 48, 57, 63, 64])
    valid_books: list[int] = field(default_factory=lambda: [32, 56])
    max_length: int = 256
    max_train_pairs: int = 0
    tokenizer_model_type: str = "bpe"
    character_coverage: float = 1.0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        _choice("data.corpus", self.corpus, ("bible", "tsv", "files"))
        _choice("data.tokenizer_model_type", self.tokenizer_model_type, ("bpe", "unigram", "char", "word"))
        if self.dataset and "/" not in self.dataset and not re.fullmatch(r"[0-9a-f]{32}", self.dataset):
            raise ConfigError(f"data.dataset: give PROJECT/NAME or a dataset id, got {self.dataset!r}")
        if self.corpus != "bible" and not self.train_path and not self.dataset:
            raise ConfigError(f"data.train_path: required when data.corpus is {self.corpus!r}")
        for pair in self.extra_translations:
            if not re.fullmatch(r"[^-\s]+-[^-\s]+", str(pair)):
                raise ConfigError(f"data.extra_translations: give SOURCE-TARGET translation codes like 's-4', "
                                  f"got {pair!r}")
        if self.extra_translations and self.corpus != "bible":
            raise ConfigError("data.extra_translations: only the bible corpus has other translations")
        if set(self.test_books) & set(self.valid_books):
            raise ConfigError("data.valid_books: must not overlap data.test_books")
        if self.max_train_pairs < 0:
            raise ConfigError(f"data.max_train_pairs: must be >= 0 (0 = all), got {self.max_train_pairs}")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length: must be >= 2, got {self.max_length}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"data.character_coverage: must be in (0, 1], got {self.character_coverage}")


@dataclass
class TrainConfig:
    """Optimisation (paper section 5.3-5.4: Adam, warmup schedule, label smoothing)."""

    lr_schedule: str = "noam"
    lr: float = 1.0
    warmup_steps: int = 4000
    warmup_minutes: float = 0.0  # linear/cosine: warm up over training minutes instead of warmup_steps
    min_lr_ratio: float = 0.0  # linear/cosine: the final learning rate, as a fraction of lr
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    batch_tokens: int = 4096
    grad_clip: float = 1.0
    max_steps: int = 100000
    max_minutes: float = 0.0
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    eval_sentences: int = 200
    eval_beam_size: int = 1
    heatmap_sentences: int = 2
    keep_checkpoints: int = 3
    average_last: int = 0  # at the end, average the last N saves into one more version (0 = off)
    export_onnx: bool = True  # register each saved version's ONNX export beside it (off: checkpoints only)
    export_parity_sentences: int = 8  # validation sentences each save's export is parity-checked on
    # guided alignment (Garg et al. 2019): weight of the loss pulling one cross-attention head towards
    # eflomal's word alignments of the training corpus (0 = off); the head: decoder layer (negative
    # counts from the last) and head index
    guided_alignment_weight: float = 0.0
    guided_alignment_layer: int = -2
    guided_alignment_head: int = 0
    precision: str = "fp32"
    seed: int = 1234

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        _choice("train.lr_schedule", self.lr_schedule, ("noam", "inverse_sqrt", "constant", "linear", "cosine"))
        _choice("train.precision", self.precision, ("fp32", "bf16"))
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas: must be two numbers in [0, 1), got {self.adam_betas}")
        if self.max_minutes < 0:
            raise ConfigError(f"train.max_minutes: must be >= 0 (0 = no limit), got {self.max_minutes}")
        for name in ("warmup_steps", "batch_tokens", "max_steps", "eval_every", "save_every", "log_every",
                     "eval_sentences", "eval_beam_size", "keep_checkpoints", "export_parity_sentences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip: must be >= 0, got {self.grad_clip}")
        if self.warmup_minutes < 0:
            raise ConfigError(f"train.warmup_minutes: must be >= 0 (0 = count warmup_steps), got {self.warmup_minutes}")
        if self.warmup_minutes and self.lr_schedule not in ("linear", "cosine"):
            raise ConfigError(f"train.warmup_minutes: only for lr_schedule linear or cosine, got {self.lr_schedule!r}")
        if self.warmup_minutes and self.max_minutes and self.warmup_minutes >= self.max_minutes:
            raise ConfigError(f"train.warmup_minutes: must be < train.max_minutes ({self.max_minutes:g}), "
                              f"got {self.warmup_minutes:g}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.average_last < 0 or self.average_last == 1:
            raise ConfigError(f"train.average_last: must be 0 (off) or >= 2, got {self.average_last}")
        if self.guided_alignment_weight < 0:
            raise ConfigError(f"train.guided_alignment_weight: must be >= 0 (0 = off), got "
                              f"{self.guided_alignment_weight}")
        if self.average_last > self.keep_checkpoints:
            raise ConfigError(f"train.average_last: must be <= train.keep_checkpoints ({self.keep_checkpoints}), "
                              f"got {self.average_last}")


@dataclass
class Config:
    """The whole configuration: a model name for the registry plus the three sections."""

    name: str = "transformer-de-en"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        """Check every section; returns self so calls can be chained."""
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("name: must be a non-empty string")
        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.train.guided_alignment_weight > 0:
            layers, heads = self.model.n_decoder_layers, self.model.n_heads
            if not -layers <= self.train.guided_alignment_layer < layers:
                raise ConfigError(f"train.guided_alignment_layer: must be in [-{layers}, {layers}) "
                                  f"(model.n_decoder_layers), got {self.train.guided_alignment_layer}")
            if not 0 <= self.train.guided_alignment_head < heads:
                raise ConfigError(f"train.guided_alignment_head: must be in [0, {heads}) (model.n_heads), "
                                  f"got {self.train.guided_alignment_head}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, JSON-serialisable."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), the form stored in checkpoints."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def hash(self) -> str:
        """Short stable hash of the config, recorded in registry metadata."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build and validate a config from nested dicts; unknown keys are errors."""
        return _build(cls, data, prefix="").validate()

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        """Read a JSON file; a missing file or bad JSON is a one-line ConfigError."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: top level must be a JSON object")
        return cls.from_dict(data)

    def override(self, assignments: list[str]) -> Config:
        """Return a copy with ``section.key=value`` assignments applied (values parsed as JSON)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.d_model=512")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # bare strings need no quotes: model.activation=gelu
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{key}: unknown key")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"{key}: unknown key")
            node[parts[-1]] = value
        return Config.from_dict(data)


PRESETS = Path(__file__).resolve().parent / "presets"  # tiny.json (quick) and default.json; ``config/`` in a checkout


def preset_path(path: str | Path) -> Path:
    """A preset's name (``tiny``, ``default``) or a JSON file's path, as a path.

    A name is looked up in the package's presets, so ``--config tiny`` works from an installed wheel;
    a path is used as given (``config/tiny.json`` in a checkout is the same file).
    """
    text = str(path)
    if "/" not in text and not text.endswith(".json") and (PRESETS / f"{text}.json").is_file():
        return PRESETS / f"{text}.json"
    return Path(path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (a JSON file or a preset's name; default: the built-in defaults) and apply ``overrides``."""
    config = Config.from_json(preset_path(path)) if path else Config().validate()
    return config.override(overrides) if overrides else config


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Recursively turn dicts into dataclasses, checking keys and types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")
