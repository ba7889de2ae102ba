"""Configuration: the model's and the training run's dataclasses, validated, with named presets.

    cfg = preset("mini", vocab_size=8000)   # a ModelConfig, already validated
    cfg.validate()                          # ValueError with a readable message if a field is wrong
    run = train_preset("tiny", lr=1e-3)     # a TrainConfig (fastmlm.train runs it)

A resumed run keeps its saved TrainConfig; only the RESUMABLE fields (how far it goes,
how it reports) may change then (:func:`resumed_config`).

Attention patterns (issue 9). ``attention_pattern`` is a tuple of pattern strings
applied to the layers in turn and repeated (layer i uses ``pattern[i % len]``):

    "dense"                 full bidirectional attention (fastmlm.ops.attention)
    "window:W"              token i sees tokens j with |i - j| <= W (block-sparse op)
    "global:G"              the first G tokens see and are seen by every token
    "window:W+global:G"     both rules (a pair attends if either rule allows it)

ModernBERT's recipe ("a sliding window of 128 tokens, global attention every third
layer") is ``("dense", "window:64", "window:64")``: 64 tokens on each side, and
layers 0, 3, 6, ... attend densely, as in ModernBERT.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .ops.dispatch import BACKENDS

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
NORM_POSITIONS = ("post", "pre")
BACKEND_CHOICES = ("auto",) + BACKENDS
_PATTERN_PART = re.compile(r"^(window|global):(\d+)$")


def check_known_fields(cls, data: dict, caller: Optional[str] = None) -> None:
    """Refuse keys that are not fields of the dataclass ``cls``, naming them and the known ones.

    The message starts with ``caller`` (default: the class name).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{caller or cls.__name__}: unknown fields {unknown}; known fields are {sorted(known)}")


def from_fields(cls, data: dict, caller: Optional[str] = None):
    """``cls(**data)`` for a config dataclass, from what its ``to_dict`` and JSON gave back.

    Unknown keys are a ValueError naming them (:func:`check_known_fields`), missing ones take
    their defaults, and a list given for a ``tuple`` field is turned back into a tuple (JSON has
    no tuples). Validating the result is the caller's choice.
    """
    check_known_fields(cls, data, caller)
    tuples = {f.name for f in dataclasses.fields(cls) if f.type in (tuple, "tuple")}
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()})

@dataclass(frozen=True)
class AttentionPattern:
    """One layer's attention pattern, parsed: dense when ``window < 0`` and ``num_global == 0``."""

    window: int = -1
    num_global: int = 0

    @property
    def dense(self) -> bool:
        return self.window < 0 and self.num_global == 0


def parse_pattern(text: str) -> AttentionPattern:
    """Parse one pattern string (see the module docstring); ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"attention pattern entries must be strings, got {type(text).__name__} {text!r}")
    if text == "dense":
        return AttentionPattern()
    window, num_global = -1, 0
    for part in text.split("+"):
        match = _PATTERN_PART.match(part.strip())
        if match is None:
            raise ValueError(f"cannot parse attention pattern {text!r}: expected 'dense', 'window:W', "
                             f"'global:G' or 'window:W+global:G' with integer W >= 0, G >= 1")
        kind, value = match.group(1), int(match.group(2))
        if kind == "window":
            if window >= 0:
                raise ValueError(f"attention pattern {text!r} names a window twice")
            window = value
        else:
            if num_global > 0 or value < 1:
                raise ValueError(f"attention pattern {text!r}: give 'global:G' once, with G >= 1")
            num_global = value
    return AttentionPattern(window, num_global)


@dataclass
class ModelConfig:
    """A BERT-style encoder with an MLM head. Defaults are BERT-base."""

    # sizes
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    # regularisation: dropout on embeddings and on both residual branches. The fused
    # attention ops have no dropout on the attention probabilities, so that rate must be 0.
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0
    # numerics and architecture
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # "gelu" (erf, as BERT), "gelu_tanh", "relu"
    norm_position: str = "post"  # "post": LayerNorm after each residual add (BERT); "pre": before each branch
    initializer_range: float = 0.02
    # which kernels run: passed as backend= to fastmlm.ops
    attention_backend: str = "auto"
    loss_backend: str = "auto"
    # per-layer attention pattern, repeated over the layers (module docstring)
    attention_pattern: tuple = ("dense",)
    block_size: int = 64  # tile size of the block-sparse layouts

    def __post_init__(self):
        if isinstance(self.attention_pattern, (list, str)):  # from JSON, or a single string
            self.attention_pattern = (self.attention_pattern,) if isinstance(self.attention_pattern, str) \
                else tuple(self.attention_pattern)

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_patterns(self) -> tuple[AttentionPattern, ...]:
        """The parsed pattern of every layer, ``num_layers`` long."""
        parsed = [parse_pattern(p) for p in self.attention_pattern]
        return tuple(parsed[i % len(parsed)] for i in range(self.num_layers))

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the first wrong field; return self when all is well."""

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive int, got {value!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        need(isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size,
             f"pad_token_id={self.pad_token_id!r} must be a token id in [0, vocab_size={self.vocab_size})")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value!r}")
        need(self.attention_dropout == 0.0,
             f"attention_dropout={self.attention_dropout}: the fused attention ops have no dropout on the "
             f"attention probabilities; set it to 0.0 (hidden_dropout still applies)")
        need(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0,
             f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        need(isinstance(self.initializer_range, (int, float)) and self.initializer_range > 0
             and math.isfinite(self.initializer_range), f"initializer_range must be > 0, got {self.initializer_range!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.norm_position in NORM_POSITIONS,
             f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        for name in ("attention_backend", "loss_backend"):
            need(getattr(self, name) in BACKEND_CHOICES,
                 f"{name} must be one of {BACKEND_CHOICES}, got {getattr(self, name)!r}")
        need(isinstance(self.attention_pattern, tuple) and len(self.attention_pattern) > 0,
             f"attention_pattern must be a non-empty tuple of pattern strings, got {self.attention_pattern!r}")
        try:
            self.layer_patterns()
        except ValueError as exc:
            raise ValueError(f"ModelConfig: attention_pattern: {exc}") from None
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["attention_pattern"] = list(self.attention_pattern)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        return from_fields(cls, data).validate()


# ---------------------------------------------------------------------- presets
# tiny is for tests; mini and small are Google's BERT miniatures (L4/H256, L4/H512);
# base and large are BERT's. The modern-* presets add the ModernBERT-style pattern.
_MODERN = dict(attention_pattern=("dense", "window:64", "window:64"), norm_position="pre",
               max_position_embeddings=1024)
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                 max_position_embeddings=128),
    "mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "modern-small": dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048, **_MODERN),
    "modern-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, **_MODERN),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A validated config from a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    check_known_fields(ModelConfig, overrides, f"preset({name!r})")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()


# ---------------------------------------------------------------------- training
def _arg(default, help: str, choices: Optional[tuple] = None, factory=None, default_text: Optional[str] = None):
    """A TrainConfig field carrying its ``train --help`` text, its choices and (for a default of
    None that means something) the words for its default, in the field's metadata."""
    meta = {"help": help, **({"choices": choices} if choices else {}),
            **({"default_text": default_text} if default_text else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SCHEDULES = ("linear", "cosine")
MIN_VOCAB_SIZE = 105  # fastmlm.tokenizer.train_tokenizer's minimum: its five special tokens and 100 more
LAYOUTS = ("padded", "packed")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MADE_BY = ("train", "demo")


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint. Steps count optimizer updates.

    Each field's ``metadata["help"]`` is its ``fastmlm train --help`` text (and
    ``metadata["choices"]`` its allowed values), so the flags explain themselves.
    """

    # model
    model: str = _arg("mini", "model size: a fastmlm.config preset (--set KEY=VALUE changes single fields)",
                      choices=tuple(PRESETS))
    model_overrides: dict = _arg(None, "ModelConfig fields that override the preset (the --set flags)", factory=dict)
    # data
    data: Optional[list] = _arg(None, "training text: .txt (blank-line separated documents) or .jsonl ({\"text\": "
                                      "...}) files, gzipped or not, or folders of them",
                                default_text="the bundled corpus, fastmlm/corpus/train.txt.gz")
    valid_data: Optional[list] = _arg(None, "validation text, as --data",
                                      default_text="the bundled validation split; with --data, a held-out slice "
                                                   "of it (see --valid-holdout)")
    valid_holdout: float = _arg(0.01, "with --data and no --valid-data: the share of the --data documents held out "
                                      "for validation (the first document, and every document whose 64-bit BLAKE2b "
                                      "hash of its text falls in this lowest share: the same slice on every machine "
                                      "and in every file order); 0 = no validation")
    tokenizer: Optional[str] = _arg(None, "a tokenizer.json or BERT vocab.txt to use",
                                    default_text="train a WordPiece tokenizer of --vocab-size on the training text")
    vocab_size: int = _arg(8000, "vocabulary size of the tokenizer trained when --tokenizer is not given")
    seq_len: int = _arg(128, "tokens per row: documents are packed end to end into rows of exactly this length")
    batch_size: int = _arg(32, "rows per micro-batch per rank")
    grad_accum: int = _arg(1, "micro-batches per optimizer step (gradient accumulation)")
    mask_rate: float = _arg(0.15, "share of the (non-special) tokens chosen for prediction in each batch, in (0, 1)")
    whole_word: bool = _arg(False, "mask whole words (every word piece of a chosen word), not single tokens")
    unigram_bias: bool = _arg(False, "start the MLM head's output bias at the log-frequencies of the training "
                                     "tokens (counted on the first 10,000 documents), so that training starts past "
                                     "the unigram plateau instead of spending its first steps (and its tied word "
                                     "embeddings) learning token frequencies")
    layout: str = _arg("padded", "batch layout: padded = (batch, seq_len) rows, one attention context per row; "
                                 "packed = (tokens,) + cu_seqlens, each document segment attends to itself",
                       choices=LAYOUTS)
    # optimisation
    lr: float = _arg(1e-3, "peak learning rate (AdamW), reached after the warm-up")
    weight_decay: float = _arg(0.01, "AdamW decoupled weight decay (none on biases and LayerNorm weights)")
    betas: tuple = _arg((0.9, 0.98), "AdamW betas (two numbers)")
    eps: float = _arg(1e-6, "AdamW epsilon")
    warmup_steps: int = _arg(100, "steps of linear learning-rate warm-up from 0 to --lr")
    max_steps: int = _arg(1000, "optimizer steps of the run (the schedule decays over them)")
    schedule: str = _arg("linear", "learning-rate decay after the warm-up", choices=SCHEDULES)
    min_lr_ratio: float = _arg(0.0, "the learning rate at the last step, as a share of --lr")
    clip_norm: float = _arg(1.0, "gradient clipping to this global L2 norm; 0 = no clipping")
    precision: str = _arg("auto", "auto = bf16 (or fp16) autocast on GPUs, fp32 on the CPU", choices=PRECISIONS)
    compile: bool = _arg(False, "run the model's training forward and backward under torch.compile (compiles on "
                                "the first step: worth it for long runs; needs a C++ compiler on the CPU)")
    activation_checkpointing: bool = _arg(False, "recompute each encoder layer's activations in the backward "
                                                 "instead of keeping them (less memory, about one more forward of "
                                                 "compute); the fused attention's outputs are kept, so attention "
                                                 "is not recomputed; the gradients are the same")
    fsdp: bool = _arg(False, "shard parameters, gradients and optimizer state over the ranks (FSDP2 per encoder "
                             "layer, then the root; bf16 parameters with fp32 reductions on GPUs); checkpoints "
                             "are sharded (torch.distributed.checkpoint) and resume on any number of ranks")
    dry_run: bool = _arg(False, "print the memory one rank needs (parameters, gradients, optimizer state, "
                                "activations) for these settings, and exit without training")
    memory_gib: Optional[float] = _arg(None, "with --dry-run: the memory of one device in GiB; says whether the "
                                             "run fits", default_text="not compared")
    # bookkeeping
    out_dir: str = _arg("runs/train", "the run folder: checkpoints, log.csv, curves.png, train_config.json")
    seed: int = _arg(0, "seed of the initial weights, the data order, the masks and dropout")
    log_every: int = _arg(10, "steps between log rows (log.csv, and the progress bar or log lines)")
    eval_every: int = _arg(200, "steps between validations (and curves.png refreshes); also after the last step")
    eval_batches: Optional[int] = _arg(None, "validate on at most this many batches",
                                       default_text="the whole validation set")
    save_every: int = _arg(200, "steps between checkpoints; also after the last step")
    keep_checkpoints: int = _arg(2, "how many of the newest checkpoints to keep")
    stop_after: Optional[int] = _arg(None, "stop (and checkpoint) after this step, as if killed; the schedule "
                                           "still runs to --max-steps, so --resume continues it",
                                     default_text="run to --max-steps")
    device: str = _arg("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N")
    progress: bool = _arg(True, "report progress: a bar on a terminal, plain log lines when the output is "
                                "redirected; --no-progress shows only validations and the summary")
    made_by: str = _arg("train", "which command made the run (fastmlm demo replaces only its own runs); not a flag",
                        choices=MADE_BY)

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        def finite(value):
            return isinstance(value, (int, float)) and math.isfinite(value)

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every",
                     "vocab_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        need(self.seq_len >= 8, f"seq_len must be at least 8, got {self.seq_len}")
        # "" is the current folder: a run would write (and on a fresh start clear) its files there
        need(isinstance(self.out_dir, (str, os.PathLike)) and str(self.out_dir).strip() != "",
             f"out_dir (--out-dir) must name the run folder, got {self.out_dir!r}")
        # the smallest vocabulary train_tokenizer trains (the five special tokens + 100): refused here, before
        # a run folder is touched (with --tokenizer, no tokenizer is trained and vocab_size is not used)
        need(self.tokenizer is not None or self.vocab_size >= MIN_VOCAB_SIZE,
             f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {self.vocab_size}")
        # keep_checkpoints 0 would delete every checkpoint a resume needs; eval_batches 0 validates on nothing
        need(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints > 0,
             f"keep_checkpoints must be a positive int, got {self.keep_checkpoints!r}")
        need(self.eval_batches is None or (isinstance(self.eval_batches, int) and self.eval_batches > 0),
             f"eval_batches must be None (the whole validation set) or a positive int, got {self.eval_batches!r}")
        need(0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0.0 < self.mask_rate < 1.0, f"mask_rate must lie in (0, 1), got {self.mask_rate}")
        need(finite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("weight_decay", "clip_norm"):
            need(finite(getattr(self, name)) and getattr(self, name) >= 0,
                 f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        # AdamW's own ranges, checked here so that the message names the field (torch's does not)
        need(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
             and all(finite(b) and 0.0 <= b < 1.0 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas!r}")
        need(finite(self.eps) and self.eps > 0, f"eps must be a finite number > 0, got {self.eps!r}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in SCHEDULES, f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        need(self.layout in LAYOUTS, f"layout must be 'padded' or 'packed', got {self.layout!r}")
        need(self.precision in PRECISIONS,
             f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        need(isinstance(self.valid_holdout, (int, float)) and 0.0 <= self.valid_holdout < 1.0,
             f"valid_holdout must lie in [0, 1), got {self.valid_holdout!r}")
        need(self.made_by in MADE_BY, f"made_by must be one of {MADE_BY}, got {self.made_by!r}")
        need(self.stop_after is None or (isinstance(self.stop_after, int) and self.stop_after > 0),
             f"stop_after must be None or a positive step, got {self.stop_after!r}")
        need(self.memory_gib is None or (finite(self.memory_gib) and self.memory_gib > 0),
             f"memory_gib must be None or a number of GiB > 0, got {self.memory_gib!r}")
        return self

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return from_fields(cls, values).validate()


# Named starting points; any field can be overridden (CLI flags do that).
# The demo recipe (issue 17; every run measured is in the README): what makes a 1M-word corpus and
# a 2-core CPU learn in two minutes is
#   * a local first layer: "window:2" attention (each token sees 2 tokens each side), then dense
#     layers. Dense attention spends its first thousand steps uniform over the row, so a [MASK]
#     sees a bag of 64 tokens and learns nothing from its neighbours (6% accuracy at [MASK] positions
#     after 1000 steps); the window hands it its neighbours from step one (like a CBOW layer);
#   * unigram_bias: the output bias starts at the token frequencies, so the tied word embeddings
#     are not all pushed one way while the model learns frequencies (the collapse that kept
#     --lr 2e-3 at the 5% unigram baseline);
#   * pre-LayerNorm, no dropout, a peak lr of 3e-3 after 30 steps (4e-3 was worse), 30% of the
#     tokens masked (better than 25% and 20% at the same steps), 1500 steps of 16 x 64 tokens;
#   * whole-word masking: a word's pieces cannot be read off its other pieces, so the model learns
#     words from their context. Per-token masking scored higher (1500 steps: 24.5% / perplexity
#     112, against 21.9% / 148 on whole-word masks, which are harder), but its fills were
#     frequent nouns ("A [MASK] is an ordered collection of items." -> exception, result, value);
#     whole-word masking puts "sequence" in that top 5 and "exception" in the other demo sentence's.
# The window makes it a fastmlm model (export-hf writes BERTs only); demo-bert is the best
# BERT-shaped recipe measured, for comparisons with Hugging Face (benchmarks/bench_train_demo).
_DEMO_MODEL = {"hidden_size": 128, "num_heads": 4, "intermediate_size": 512, "hidden_dropout": 0.0}
TRAIN_PRESETS = {
    "demo": dict(model="mini", model_overrides={**_DEMO_MODEL, "norm_position": "pre",
                                                "attention_pattern": ("window:2", "dense", "dense", "dense")},
                 vocab_size=4000, seq_len=64, batch_size=16, mask_rate=0.3, whole_word=True, unigram_bias=True,
                 lr=3e-3, warmup_steps=30, max_steps=1500, min_lr_ratio=0.1, eval_every=750, save_every=750, log_every=20),
    # BERT-shaped (post-LN, dense): what export-hf and Hugging Face take
    "demo-bert": dict(model="mini", model_overrides=dict(_DEMO_MODEL), vocab_size=4000, seq_len=64, batch_size=16,
                      mask_rate=0.15, unigram_bias=True, lr=2e-3, warmup_steps=30, max_steps=1000, min_lr_ratio=0.1,
                      eval_every=250, save_every=250, log_every=20),
    # a GPU's demo: the same recipe on a 256-wide model, longer rows and bigger batches (not measured yet:
    # no GPU run of it exists)
    "demo-gpu": dict(model="mini", model_overrides={"hidden_dropout": 0.0, "norm_position": "pre",
                                                    "attention_pattern": ("window:2", "dense", "dense", "dense")},
                     vocab_size=8000, seq_len=128, batch_size=64, mask_rate=0.25, unigram_bias=True, lr=2e-3,
                     warmup_steps=100, max_steps=3000, min_lr_ratio=0.1, eval_every=500, save_every=1000,
                     log_every=50),
    # seconds: for tests and smoke runs
    "tiny": dict(model="tiny", model_overrides={"hidden_dropout": 0.1}, vocab_size=400, seq_len=32, batch_size=8,
                 lr=2e-3, warmup_steps=2, max_steps=8, eval_every=4, eval_batches=2, save_every=4, log_every=1,
                 out_dir="runs/tiny"),
}


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS[name], **overrides}).validate()


# Fields a resumed run may change: how far it goes and how it reports, not what it computes.
# Any other field given on resume must equal the saved run's (resumed_config refuses it).
RESUMABLE = ("max_steps", "stop_after", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
             "progress", "device", "compile", "out_dir", "activation_checkpointing", "dry_run",
             "memory_gib")


def _flag(name: str) -> str:
    return "--set" if name == "model_overrides" else "--" + name.replace("_", "-")


def resumed_config(saved: TrainConfig, cfg: TrainConfig, changes: Optional[dict] = None) -> TrainConfig:
    """The config of a resumed run: ``saved``, with out_dir, progress and stop_after from ``cfg``, and ``changes``.

    ``changes`` are the fields the caller asks for (the CLI passes the flags given): those in
    RESUMABLE take effect, any other that differs from the saved run is refused with a
    ValueError listing every difference. ``model_overrides`` entries are compared one by one
    (``--set hidden_size=32`` names one model field, not all of them).
    """
    run = {**saved.to_dict(), "out_dir": cfg.out_dir, "progress": cfg.progress, "stop_after": cfg.stop_after}
    changes = dict(changes or {})
    if "model_overrides" in changes:
        changes["model_overrides"] = {**run["model_overrides"], **changes["model_overrides"]}
    # through JSON, as the saved config came: tuples become lists, so only real differences remain
    run = json.loads(json.dumps(run))
    asked = json.loads(json.dumps(TrainConfig.from_dict({**run, **changes}).to_dict()))
    refused = [f"{_flag(name)}: the run has {run[name]!r}, asked {asked[name]!r}"
               for name in asked if asked[name] != run[name] and name not in RESUMABLE]
    if refused:
        raise ValueError("--resume: these settings differ from the run being resumed:\n  " + "\n  ".join(refused) +
                         "\nonly these may change on resume: " + ", ".join(_flag(n) for n in RESUMABLE) +
                         "; start a new run (another --out-dir) to change the others")
    return TrainConfig.from_dict(asked)
