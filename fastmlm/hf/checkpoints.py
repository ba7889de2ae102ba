"""Hugging Face BERT checkpoints in and out of fastmlm, by key mapping.

    model = load_hf("path/to/bert")     # config.json + model.safetensors (or pytorch_model.bin)
    save_hf(model, "out/")              # transformers.BertForMaskedLM.from_pretrained("out/") loads it

Key map (Hugging Face keys carry a ``bert.`` prefix in BertForMaskedLM, none in BertModel):

    embeddings.word_embeddings.weight              embeddings.word.weight
    embeddings.position_embeddings.weight          embeddings.position.weight
    embeddings.token_type_embeddings.weight        embeddings.token_type.weight
    embeddings.LayerNorm.*                         embeddings.norm.*
    encoder.layer.i.attention.self.{query,key,value}.*   layers.i.qkv.*  (stacked q; k; v on dim 0)
    encoder.layer.i.attention.output.dense.*       layers.i.attn_out.*
    encoder.layer.i.attention.output.LayerNorm.*   layers.i.attn_norm.*
    encoder.layer.i.intermediate.dense.*           layers.i.mlp_in.*
    encoder.layer.i.output.dense.*                 layers.i.mlp_out.*
    encoder.layer.i.output.LayerNorm.*             layers.i.mlp_norm.*
    cls.predictions.transform.dense.*              head.dense.*
    cls.predictions.transform.LayerNorm.*          head.norm.*
    cls.predictions.bias                           head.bias
    cls.predictions.decoder.{weight,bias}          tied copies of the word embeddings and head.bias:
                                                   checked equal when present, never stored twice
    pooler.dense.*                                 pooler.dense.*  (when the checkpoint has a pooler)
    cls.seq_relationship.*, embeddings.position_ids                not used by an MLM: skipped

Fine-tuned models (fastmlm.finetune) add ``classifier.*`` (the same name on both sides) to an
encoder without the MLM head: :func:`save_hf_classifier` writes BertForSequenceClassification /
BertForTokenClassification folders, and :func:`load_hf_encoder` reads any BERT checkpoint's
encoder (pooler kept, MLM head and ``classifier.*`` not needed) to fine-tune.

A BertModel checkpoint has no ``cls.*`` keys: the MLM head then keeps its fresh (random)
initialisation, with a warning. A checkpoint with a pooler (BertModel, BertForPreTraining)
gives a model with one, and export writes it back, so BertModel loads it unchanged
(BertForMaskedLM has no pooler and ignores it). Any other unknown or missing key is an
error that lists them all. Old TF-converted checkpoints name LayerNorm parameters
gamma/beta; both spellings load.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

# CheckpointError is fastmlm.checkpoint's (fastmlm.hf.CheckpointError is the same class); here it means a
# Hugging Face checkpoint that fastmlm cannot load or write as it is, and the message says why.
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_safetensors, refuse_changing_overrides
from ..config import ModelConfig
from ..model import FastMLMForMaskedLM

BIN_NAME = "pytorch_model.bin"
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_LAYER_MAP = {  # fastmlm name inside layers.i -> Hugging Face name inside encoder.layer.i
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp_in": "intermediate.dense",
    "mlp_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_TOP_MAP = {  # fastmlm module -> Hugging Face module (without the bert. prefix for the encoder part)
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
}
_HEAD_MAP = {"head.dense": "cls.predictions.transform.dense", "head.norm": "cls.predictions.transform.LayerNorm"}
_POOLER = "pooler.dense"  # the same name on both sides (under the encoder's prefix in Hugging Face)
_SKIPPED = re.compile(r"^(bert\.)?embeddings\.position_ids$|^cls\.seq_relationship\.")
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


# --------------------------------------------------------------------------- configs
def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A Hugging Face BertConfig dict -> ModelConfig; CheckpointError for features fastmlm lacks."""
    model_type = hf.get("model_type", "bert")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    problems = [f"{name} is missing (BertConfig has no default fastmlm could trust for it)"
                for name in required if name not in hf]
    if model_type != "bert":
        problems.append(f"model_type is {model_type!r}; only 'bert' checkpoints are supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={hf['position_embedding_type']!r}; only 'absolute' is supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        problems.append("is_decoder/add_cross_attention are set; fastmlm is a bidirectional encoder")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings is false; fastmlm's decoder is always the word-embedding matrix")
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACT_FROM_HF:  # JSON may give a list or object: unhashable
        problems.append(f"hidden_act={act!r}; supported: {sorted(_ACT_FROM_HF)}")
    if problems:
        raise CheckpointError("cannot load this Hugging Face config:\n  " + "\n  ".join(problems))
    if hf.get("attention_probs_dropout_prob", 0.0):
        warnings.warn(f"attention_probs_dropout_prob={hf['attention_probs_dropout_prob']} is dropped: fastmlm's "
                      "fused attention has no dropout (hidden dropout is kept)", stacklevel=2)
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id") or 0, hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=0.0, layer_norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_ACT_FROM_HF[act],
        initializer_range=hf.get("initializer_range", 0.02), norm_position="post",
    )
    refuse_changing_overrides(fields, overrides)
    return ModelConfig(**{**fields, **overrides}).validate()


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a BertConfig dict; CheckpointError when BERT cannot express the model."""
    problems = []
    if cfg.norm_position != "post":
        problems.append("norm_position='pre' (BERT is post-norm)")
    if any(not p.dense for p in cfg.layer_patterns()):
        problems.append(f"attention_pattern={cfg.attention_pattern} (BERT attends densely)")
    if problems:
        raise CheckpointError("cannot export as a Hugging Face BERT: " + "; ".join(problems))
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "hidden_act": _ACT_TO_HF[cfg.activation], "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout, "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute", "tie_word_embeddings": True, "is_decoder": False,
    }


# --------------------------------------------------------------------------- state dicts
def _hf_names(cfg: ModelConfig, prefix: str, head: bool, pooler: bool) -> dict[str, str]:
    """fastmlm parameter name -> Hugging Face name, for every tensor except the fused QKV."""
    names = {}
    for ours, theirs in _TOP_MAP.items():
        for p in ("weight", "bias") if ours.endswith("norm") else ("weight",):
            names[f"{ours}.{p}"] = f"{prefix}{theirs}.{p}"
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER_MAP.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{p}"] = f"{prefix}encoder.layer.{i}.{theirs}.{p}"
    if head:
        for ours, theirs in _HEAD_MAP.items():
            for p in ("weight", "bias"):
                names[f"{ours}.{p}"] = f"{theirs}.{p}"
        names["head.bias"] = "cls.predictions.bias"
    if pooler:
        for p in ("weight", "bias"):
            names[f"{_POOLER}.{p}"] = f"{prefix}{_POOLER}.{p}"
    return names


def _qkv_names(prefix: str, i: int, p: str) -> list[str]:
    return [f"{prefix}encoder.layer.{i}.attention.self.{part}.{p}" for part in ("query", "key", "value")]


def state_dict_from_hf(tensors: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], bool]:
    """Hugging Face tensors -> (fastmlm state dict, whether it includes the MLM head).

    The state dict holds ``pooler.dense.*`` when the checkpoint has a pooler.
    CheckpointError lists every unknown and missing key, and untied decoder weights.
    """
    tensors = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
               for k, v in tensors.items()}
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    has_head = any(k.startswith("cls.predictions.") for k in tensors)
    has_pooler = any(k.startswith(f"{prefix}{_POOLER}.") for k in tensors)
    wanted = _hf_names(cfg, prefix, has_head, has_pooler)
    qkv = {(i, p): _qkv_names(prefix, i, p) for i in range(cfg.num_layers) for p in ("weight", "bias")}
    expected = set(wanted.values()) | {n for parts in qkv.values() for n in parts}
    unknown = sorted(k for k in tensors if k not in expected and k not in _TIED and not _SKIPPED.match(k))
    missing = sorted(expected - set(tensors))
    if unknown or missing:
        raise CheckpointError("the checkpoint does not match a BERT with this config "
                              f"({cfg.num_layers} layers, key prefix {prefix!r}):"
                              + (f"\n  unknown keys: {unknown}" if unknown else "")
                              + (f"\n  missing keys: {missing}" if missing else "")
                              + ("\n  (classifier.* is the head of a Bert*Classification checkpoint: "
                                 "fastmlm.hf.load_hf_encoder reads its encoder)"
                                 if any(_CLASSIFIER.match(k) for k in unknown) else ""))
    out = {ours: tensors[theirs] for ours, theirs in wanted.items()}
    for (i, p), parts in qkv.items():
        shapes = [tuple(tensors[n].shape) for n in parts]
        if len(set(shapes)) != 1:  # else torch.cat fails with a message naming no key
            raise CheckpointError(f"{', '.join(parts)} have shapes {shapes}; query, key and value must have one shape")
        out[f"layers.{i}.qkv.{p}"] = torch.cat([tensors[n] for n in parts], dim=0)  # 3 x (H, ...) -> (3H, ...)
    # Tied copies must really be copies: an untied decoder would silently change the model.
    for tied, source in zip(_TIED, (out["embeddings.word.weight"], out.get("head.bias"))):
        if tied in tensors and source is not None and not torch.equal(tensors[tied].to(source.dtype), source):
            raise CheckpointError(f"{tied} differs from the tensor it should be tied to; "
                                  "fastmlm cannot load an untied MLM decoder")
    return out, has_head


def state_dict_to_hf(model: FastMLMForMaskedLM) -> dict[str, Tensor]:
    """fastmlm model -> the tensors transformers.BertForMaskedLM.save_pretrained would write (without
    ``cls.*`` for the encoder of a fastmlm.finetune classifier, whose MLM head is removed)."""
    cfg, ours = model.config, model.state_dict()
    names = _hf_names(cfg, "bert.", model.head is not None, model.pooler is not None)  # a classifier's has no MLM head
    out = {theirs: ours[name] for name, theirs in names.items()}
    for i in range(cfg.num_layers):
        for p in ("weight", "bias"):
            for name, part in zip(_qkv_names("bert.", i, p), ours[f"layers.{i}.qkv.{p}"].chunk(3, dim=0)):
                out[name] = part  # (3H, ...) -> query, key, value (H, ...)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- files
def _read_tensors(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, non-tensor objects refused by weights_only
        raise CheckpointError(f"cannot read {file} with torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return data


def read_hf_config(directory) -> dict:
    """The config.json of a Hugging Face checkpoint directory, as a dict."""
    cfg_file = Path(directory) / CONFIG_NAME
    if Path(directory).is_file():
        raise CheckpointError(f"{directory} is a file; expected a Hugging Face checkpoint directory (holding "
                              f"{CONFIG_NAME})")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: a Hugging Face checkpoint directory holds {CONFIG_NAME}")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        shown = json.dumps(hf)
        raise CheckpointError(f"{cfg_file} holds {shown if len(shown) <= 60 else shown[:57] + '...'}; expected a "
                              "JSON object of config fields (a BertConfig)")
    return hf


def read_hf_weights(directory) -> dict[str, Tensor]:
    """The tensors of a Hugging Face checkpoint directory.

    Prefers model.safetensors, then pytorch_model.bin; sharded checkpoints (``*.index.json``) too.
    """
    path = Path(directory)
    for name in (WEIGHTS_NAME, BIN_NAME):
        if (path / name).is_file():
            return _read_tensors(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} is not a valid shard index: expected \"weight_map\": an object "
                                      "mapping tensor names to shard file names")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                # A shard is a file of this folder: a name like ../x or /x would read weights from elsewhere.
                if Path(shard).name != shard or not (path / shard).is_file():
                    raise CheckpointError(f"{index} names the shard {shard}, which is not a file in {path}")
                tensors.update(_read_tensors(path / shard))
            return tensors
    raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_NAME} or {BIN_NAME} (or a sharded index)")


def _encoder_from_hf(directory, config_overrides: dict, drop=None) -> tuple[FastMLMForMaskedLM, bool]:
    """(model, whether the checkpoint had an MLM head) from a Hugging Face folder; keys matching
    ``drop`` are left out first. Without a head the model keeps its freshly initialised one, so its
    state is whole. The config is checked before any weights are read."""
    cfg = config_from_hf(read_hf_config(directory), **config_overrides)
    tensors = read_hf_weights(directory)
    if drop is not None:
        tensors = {k: v for k, v in tensors.items() if not drop.match(k)}
    state, has_head = state_dict_from_hf(tensors, cfg)
    model = FastMLMForMaskedLM(cfg, pooler=f"{_POOLER}.weight" in state)
    if not has_head:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    model.load_weights(state)
    return model, has_head


def load_hf(directory, **config_overrides) -> FastMLMForMaskedLM:
    """A fastmlm model holding the weights of a Hugging Face BertForMaskedLM / BertModel checkpoint.

    ``config_overrides`` set fastmlm-only fields such as ``attention_backend``; a field the checkpoint
    fixes (``num_heads``, ``activation``, ...) may only be given its checkpoint value (CheckpointError).
    The config is checked before any weights are read. A checkpoint without an MLM head
    (a BertModel) loads with a freshly initialised head and a warning.
    """
    model, has_head = _encoder_from_hf(directory, config_overrides)
    if not has_head:  # a BertModel: the head is the fresh one, and the user must know
        warnings.warn(f"{directory} has no MLM head (no cls.predictions.* weights, as in a BertModel "
                      "checkpoint): the MLM head is randomly initialised, so masked-token predictions are "
                      "meaningless until it is trained", stacklevel=2)
    return model


def check_output_dir(directory) -> Path:
    """``directory`` as a Path when it is absent or an empty folder; ValueError naming it otherwise.

    Exports never mix their files with what is already there (an older export, a checkpoint).
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {path} is an existing file; expected a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"output directory {path} is not empty; expected a new or empty folder")
    return path


def _write_hf_folder(directory, hf_config: dict, tensors: dict[str, Tensor]) -> Path:
    """config.json + model.safetensors in ``directory`` (new or empty, else ValueError)."""
    from safetensors.torch import save_file

    path = check_output_dir(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def save_hf(model: FastMLMForMaskedLM, directory) -> Path:
    """Write config.json + model.safetensors that transformers loads as BertForMaskedLM (and as
    BertModel, with the pooler when the model has one). ``directory`` must be new or empty."""
    if not isinstance(model, FastMLMForMaskedLM):
        hint = " (a fastmlm.finetune classifier: use save_hf_classifier)" if hasattr(model, "kind") else ""
        raise ValueError(f"save_hf: model must be a FastMLMForMaskedLM, got {type(model).__name__}{hint}")
    return _write_hf_folder(directory, config_to_hf(model.config), state_dict_to_hf(model))


def save_hf_tokenizer(tokenizer, directory, model_max_length: int) -> Path:
    """Write a ``tokenizers.Tokenizer`` (a WordPiece one, as fastmlm trains) into an exported folder
    the way transformers reads it: tokenizer.json (BertTokenizerFast), vocab.txt (BertTokenizer)
    and tokenizer_config.json (which class, lowercasing, the special tokens, ``model_max_length``).

    fastmlm adds [CLS] and [SEP] itself, so its tokenizers have no post-processor; a fast
    transformers tokenizer adds only what tokenizer.json's post-processor says, so the file gets
    BERT's (``[CLS] A [SEP]``, pairs ``[CLS] A [SEP] B [SEP]``), the rows the model was trained on.
    """
    from tokenizers import Tokenizer, models, processors

    from ..tokenizer import special_ids

    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise ValueError(f"save_hf_tokenizer: model_max_length must be a positive int (the model's "
                         f"max_position_embeddings), got {model_max_length!r}")
    if not isinstance(tokenizer.model, models.WordPiece):  # vocab.txt and BertTokenizer are WordPiece's
        kind = type(tokenizer.model).__name__
        raise ValueError(f"save_hf_tokenizer writes a BERT (WordPiece) tokenizer; got a {kind} one")
    path = Path(directory)
    special = special_ids(tokenizer)
    exported = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's tokenizer is left as it is
    exported.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", special.cls), ("[SEP]", special.sep)])
    exported.save(str(path / "tokenizer.json"))
    tokenizer.model.save(str(path))  # vocab.txt
    lowercase = bool(getattr(tokenizer.normalizer, "lowercase", True))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": model_max_length,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=2))
    return path


# --------------------------------------------------------------------------- fine-tuning (fastmlm.finetune)
_CLASSIFIER = re.compile(r"^classifier\.")  # the task head of a transformers Bert*Classification checkpoint
_HF_CLASSES = {"sequence": "BertForSequenceClassification", "tokens": "BertForTokenClassification"}


def load_hf_encoder(directory, **config_overrides) -> FastMLMForMaskedLM:
    """The encoder of a Hugging Face BERT checkpoint, to fine-tune: its pooler kept when it has one.

    Unlike :func:`load_hf` it accepts a checkpoint without an MLM head (a BertModel, such as
    all-MiniLM-L6-v2) without a warning (a classifier never uses that head), and a
    Bert*Classification checkpoint, whose ``classifier.*`` head is dropped (fine-tuning trains a
    new one for its own labels).
    """
    return _encoder_from_hf(directory, config_overrides, drop=_CLASSIFIER)[0]


def classifier_config_to_hf(model) -> dict:
    """The BertConfig dict of a fastmlm.finetune classifier (``kind``, ``labels``, ``classifier_dropout``)."""
    hf = config_to_hf(model.config)
    hf.update(architectures=[_HF_CLASSES[model.kind]], classifier_dropout=model.classifier_dropout,
              id2label={str(i): name for i, name in enumerate(model.labels)},
              label2id={name: i for i, name in enumerate(model.labels)})
    if model.kind == "sequence":  # else transformers guesses the loss from the labels' dtype
        hf["problem_type"] = "single_label_classification"
    return hf


def save_hf_classifier(model, directory) -> Path:
    """Write config.json + model.safetensors that transformers loads as BertForSequenceClassification
    (a ``kind == "sequence"`` model: pooler, dropout, linear) or BertForTokenClassification
    (``"tokens"``), with the same logits. ``directory`` must be new or empty."""
    if getattr(model, "kind", None) not in _HF_CLASSES or not isinstance(getattr(model, "encoder", None),
                                                                         FastMLMForMaskedLM):
        hint = " (an MLM model: use save_hf)" if isinstance(model, FastMLMForMaskedLM) else ""
        raise ValueError(f"save_hf_classifier: model must be a fastmlm.finetune SequenceClassifier or "
                         f"TokenClassifier, got {type(model).__name__}{hint}")
    hf_config = classifier_config_to_hf(model)
    if model.kind == "sequence" and model.encoder.pooler is None:
        raise CheckpointError("a sequence classifier needs its pooler; this one has none")
    tensors = state_dict_to_hf(model.encoder)
    tensors.update({f"classifier.{p}": t.detach().cpu().contiguous() for p, t in model.classifier.state_dict().items()})
    return _write_hf_folder(directory, hf_config, tensors)
