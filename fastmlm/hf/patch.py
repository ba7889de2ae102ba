"""``fastmlm.hf.patch(model)``: fastmlm attention and a masked-rows-only MLM loss in a transformers ``*ForMaskedLM``.

    model = AutoModelForMaskedLM.from_pretrained(path, attention_probs_dropout_prob=0.0)
    fastmlm.hf.patch(model)        # in place (returns the model); Trainer and DataCollatorForLanguageModeling unchanged
    loss = model(**batch).loss     # labels: the token id at masked positions, -100 elsewhere
    fastmlm.hf.unpatch(model)      # the model exactly as it was

patch sets ``attn_implementation="fastmlm"`` (see fastmlm/hf/attention.py) and replaces the
instance's ``forward``. Without labels it is the model's own forward (full logits). With
labels the encoder runs as before, then only the masked rows reach the head:

    hidden (T = B*S, H) --gather R rows, masked tokens first--> (R, H)
        --the model's prediction-head transform--> (R, H)
        --fastmlm.ops.masked_lm_loss(decoder weight, decoder bias, labels of the rows)--> loss

so the (T, vocab) logits are never formed. On CPU tensors a padded batch with labels also runs
its encoder layers on the real tokens only (``unpad="auto"``; ``unpad=True`` adds CUDA at one host
sync per step, ``unpad=False`` never): see fastmlm/hf/unpad.py for how, and where it stays padded
(torch.compile traces, ModernBERT with padding inside a sequence, labels on padding, ...).
Dropout then draws over the real tokens only: the same distribution, other draws than the
unpatched model's. R is static, ``min(T, ceil(max_masked_fraction * T)
+ 64)`` (no host synchronisation, one shape per batch shape, fit for torch.compile and CUDA
graphs); a batch with more masked tokens than R stops with an error (``torch._assert_async``,
on the device) asking for a larger ``max_masked_fraction``; 1.0 always fits. The default 0.25
leaves wide room for the collator's 15% (``mlm_probability``; at most ~0.2 for large batches).

The loss is the unpatched model's: the mean over the masked tokens (ModernBERT: the sum
divided by ``num_items_in_batch`` when the Trainer passes it), except that a batch without
masked tokens gives 0 with zero gradients where the unpatched loss is NaN. The output is a
``MaskedLMOutput`` with ``logits=None``; ``model(..., labels=labels, return_masked_logits=True)``
adds the (R, vocab) logits of the gathered rows (zeros past the masked ones) and
``output["masked_positions"]``, their (R,) flat indices into the T tokens (-1 past them).

Architectures (the encoder attribute, the head transform, the decoder):

    BertForMaskedLM          bert        cls.predictions.transform            cls.predictions.decoder
    RobertaForMaskedLM       roberta     lm_head: dense, gelu, layer_norm     lm_head.decoder
    XLMRobertaForMaskedLM    roberta     lm_head: dense, gelu, layer_norm     lm_head.decoder
    ElectraForMaskedLM       electra     generator_predictions                generator_lm_head
    DistilBertForMaskedLM    distilbert  vocab_transform, activation, norm    vocab_projector
    ModernBertForMaskedLM    model       head                                 decoder

Anything else raises :class:`~fastmlm.hf.attention.FastMLMUnsupported` saying why.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..data import IGNORE_INDEX
from ..ops import masked_lm_loss
from ..ops.row_bound import counted_bound
from . import unpad as _unpad
from .attention import NAME, FastMLMUnsupported, register

STATE = "_fastmlm_patch"  # the attribute patch() sets on the model
DEFAULT_MAX_MASKED_FRACTION = 0.25


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Architecture:
    """Where one *ForMaskedLM keeps its encoder and MLM head (looked up on every call, so a
    resized or replaced head is followed)."""

    module: str  # the transformers module defining the class
    encoder: str  # attribute holding the encoder (BertModel, ...)
    transform: Callable[[nn.Module, Tensor], Tensor]  # (model, rows) -> the head's hidden transform of the rows
    decoder: Callable[[nn.Module], nn.Linear]  # model -> the vocabulary projection
    divides_by_num_items: bool = False  # the loss is sum / num_items_in_batch when that is passed (loss_function)
    # Unpadding (fastmlm/hf/unpad.py): the encoder's position ids reach its layers (rotary), so they are passed
    # packed; its sliding windows count padded positions, so a sequence with padding inside it stays padded.
    packs_position_ids: bool = False
    contiguous_only: bool = False


def _roberta_transform(model, x):
    # RobertaLMHead.forward: dense, gelu (transformers.activations.gelu is the exact F.gelu), layer_norm
    head = model.lm_head
    return head.layer_norm(nn.functional.gelu(head.dense(x)))


def _distilbert_transform(model, x):
    return model.vocab_layer_norm(model.activation(model.vocab_transform(x)))


_MODELS = "transformers.models."
ARCHITECTURES = {
    "BertForMaskedLM": Architecture(_MODELS + "bert.modeling_bert", "bert", lambda m, x: m.cls.predictions.transform(x),
                                    lambda m: m.cls.predictions.decoder),
    "RobertaForMaskedLM": Architecture(_MODELS + "roberta.modeling_roberta", "roberta", _roberta_transform,
                                       lambda m: m.lm_head.decoder),
    "XLMRobertaForMaskedLM": Architecture(_MODELS + "xlm_roberta.modeling_xlm_roberta", "roberta", _roberta_transform,
                                          lambda m: m.lm_head.decoder),
    "ElectraForMaskedLM": Architecture(_MODELS + "electra.modeling_electra", "electra",
                                       lambda m, x: m.generator_predictions(x), lambda m: m.generator_lm_head),
    "DistilBertForMaskedLM": Architecture(_MODELS + "distilbert.modeling_distilbert", "distilbert",
                                          _distilbert_transform, lambda m: m.vocab_projector),
    "ModernBertForMaskedLM": Architecture(_MODELS + "modernbert.modeling_modernbert", "model",
                                          lambda m, x: m.head(x), lambda m: m.decoder, divides_by_num_items=True,
                                          packs_position_ids=True, contiguous_only=True),
}


def _check_module(function: str, model) -> None:
    """ValueError unless ``model`` is an nn.Module; FastMLMUnsupported for a wrapper around one (torch.compile,
    DataParallel / DistributedDataParallel), whose class is not the *ForMaskedLM it holds."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"fastmlm.hf.{function}: model must be a transformers *ForMaskedLM (a torch.nn.Module), "
                         f"got {type(model).__name__}")
    for attribute, wrapper in (("_orig_mod", "torch.compile"), ("module", "DataParallel / DistributedDataParallel")):
        # a wrapper holds the model as a submodule and has no config of its own (torch.compile forwards
        # attribute reads to the model, so hasattr(model, "config") would not tell)
        if attribute in model._modules and "config" not in model.__dict__:
            raise FastMLMUnsupported(f"fastmlm.hf.{function}: {type(model).__name__} wraps the model in .{attribute} "
                                     f"(as {wrapper} does); call fastmlm.hf.{function}(model) on the model itself, "
                                     "before wrapping it")


def architecture_of(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of a supported model (a subclass counts); FastMLMUnsupported otherwise."""
    for cls in type(model).__mro__:
        arch = ARCHITECTURES.get(cls.__name__)
        if arch is not None and cls.__module__ == arch.module:
            if type(model).forward is not cls.forward:  # the patched forward computes cls's loss, not the subclass's
                raise FastMLMUnsupported(f"fastmlm.hf.patch cannot patch {type(model).__name__}: it overrides "
                                         f"{cls.__name__}.forward, and the patched forward computes "
                                         f"{cls.__name__}'s loss from its encoder and head, so yours would be "
                                         "silently replaced; patch a model that keeps that forward")
            return arch
    name = type(model).__name__
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        why = ("its attention is written inline instead of going through transformers' AttentionInterface, so "
               "fastmlm cannot reach it")
    else:
        why = ("its MLM head is not one patch() knows; fastmlm.hf.register() and attn_implementation='fastmlm' "
               "still give its attention, if it routes attention through AttentionInterface")
    raise FastMLMUnsupported(f"fastmlm.hf.patch cannot patch {name}: {why}. Supported: {', '.join(ARCHITECTURES)}")


# --------------------------------------------------------------------------- the loss
def masked_capacity(tokens: int, max_masked_fraction: float) -> int:
    """R, the static number of rows gathered for a batch of ``tokens`` tokens (the ops' row bound)."""
    return counted_bound(tokens, max_masked_fraction)


def masked_rows_loss(hidden: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor], weight: Tensor,
                     bias: Optional[Tensor], *, max_masked_fraction: float = DEFAULT_MAX_MASKED_FRACTION,
                     num_items_in_batch=None, return_logits: bool = False):
    """MLM loss of the masked rows only; returns (loss, logits or None, positions).

    hidden: (..., H) encoder output; labels: the same leading shape, the target id at masked
    tokens and -100 elsewhere. The masked tokens are gathered (R rows, R static, see
    :func:`masked_capacity`), put through ``transform`` and projected by ``weight`` (V, H) and
    ``bias`` (V,) inside ``fastmlm.ops.masked_lm_loss``. Loss: mean over the masked tokens, or
    their sum / ``num_items_in_batch`` when that is given (0, for an accumulated batch without any
    masked token, gives 0). ``positions``: (R,) flat token index
    of each row, -1 past the masked ones; ``logits``: (R, V) with ``return_logits``, zeros there.
    No host synchronisation; under autocast the projection runs in the autocast dtype.
    """
    width = hidden.shape[-1]
    hidden = hidden.reshape(-1, width)
    tokens = hidden.shape[0]
    if labels.numel() != tokens:
        raise ValueError(f"labels has shape {tuple(labels.shape)} ({labels.numel()} entries) for {tokens} tokens")
    flat = labels.reshape(-1).to(hidden.device)
    rows = masked_capacity(tokens, max_masked_fraction)
    counted = flat != IGNORE_INDEX
    masked = counted.sum()
    torch._assert_async(masked <= rows,
                        f"fastmlm.hf: the batch has more masked tokens (labels != -100) than the {rows} rows reserved "
                        f"for its {tokens} tokens (max_masked_fraction={max_masked_fraction}); call "
                        "fastmlm.hf.patch(model, max_masked_fraction=...) with a larger fraction (1.0 always fits)")
    order = torch.sort((~counted).to(torch.int8), stable=True).indices[:rows]  # masked tokens first, in order
    row_labels = flat[order]  # -100 past the masked tokens
    x = transform(hidden[order])  # (R, H)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if num_items_in_batch is None:
        loss = masked_lm_loss(x, weight, bias, row_labels, max_masked_fraction=1.0)  # rows compacted above
    else:
        # A (gradient-accumulated) batch without masked tokens has num_items_in_batch 0: its loss is 0, as with
        # the mean, not 0 / 0. A count of 0 beside masked tokens is a caller's bug (any other count may be a
        # normaliser of the caller's choosing, so it is not checked against this batch's tokens).
        tensor = isinstance(num_items_in_batch, Tensor)
        count = num_items_in_batch.to(x.device) if tensor else num_items_in_batch
        if tensor or count == 0:  # a Python count > 0 needs no check (nor a device copy of it)
            torch._assert_async((masked == 0) | (count > 0),
                                "fastmlm.hf: num_items_in_batch is 0 but the batch has masked tokens (labels != -100); "
                                "it must count the masked tokens of the whole (accumulated) batch")
        loss = masked_lm_loss(x, weight, bias, row_labels, reduction="sum",
                              max_masked_fraction=1.0) / (count.clamp(min=1) if tensor else max(count, 1))
    positions = torch.where(row_labels != IGNORE_INDEX, order, -1)
    logits = None
    if return_logits:
        logits = torch.where((positions >= 0)[:, None], nn.functional.linear(x, weight, bias), 0)
    return loss, logits, positions


# --------------------------------------------------------------------------- patch / unpatch
@dataclass
class PatchState:
    """What :func:`unpatch` restores, and what the patched forward needs."""

    arch: Architecture
    attn_implementation: str  # the model's attention implementation before patch
    previous_forward: Optional[Callable]  # an instance-level forward that was there before (None: the class's)
    arg_names: tuple  # the class forward's parameters, in order, without self and **kwargs
    not_for_encoder: tuple  # those of them the encoder does not take (they must be None with labels)
    max_masked_fraction: float
    unpad: object  # "auto", True or False (fastmlm/hf/unpad.py)

    # Pickling the model would store its forward as getattr(model, "forward"), which unpickles to the class's
    # forward: a model that says it is patched and is not. Refuse it by name (pickle stops at the first
    # object that refuses) instead of failing on a lambda of ARCHITECTURES; copy.deepcopy stays exact.
    def __reduce_ex__(self, protocol):
        raise TypeError("a model patched by fastmlm.hf.patch cannot be pickled whole (torch.save(model), "
                        "multiprocessing): save its weights (model.save_pretrained(...) or model.state_dict()), "
                        "or call fastmlm.hf.unpatch(model) first and patch it again after loading")

    def __deepcopy__(self, memo):
        import copy

        return PatchState(**{name: copy.deepcopy(value, memo) for name, value in vars(self).items()})


def _parameters(forward) -> tuple[list[str], bool]:
    import inspect

    params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _make_forward(class_forward):
    @functools.wraps(class_forward)  # keeps the signature, which Trainer reads to pick dataset columns
    def forward(self, *args, **kwargs):
        return _patched_forward(self, args, kwargs)

    forward.fastmlm_patched = True
    return forward


def _patched_forward(model, args: tuple, kwargs: dict):
    state: PatchState = model.__dict__[STATE]
    want_logits = kwargs.pop("return_masked_logits", False)
    if len(args) > len(state.arg_names):
        raise TypeError(f"{type(model).__name__}.forward takes at most {len(state.arg_names)} positional arguments")
    call = dict(zip(state.arg_names, args))
    for key in kwargs:
        if key in call:
            raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {key!r}")
    call.update(kwargs)
    labels = call.pop("labels", None)
    if labels is None:
        if want_logits:
            raise ValueError("return_masked_logits=True needs labels (the token id at masked positions, "
                             "-100 elsewhere)")
        original = state.previous_forward or type(model).forward.__get__(model)
        return original(**call)

    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor like input_ids (the token id at masked positions, -100 "
                         f"elsewhere), got {type(labels).__name__}")
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    for name in state.not_for_encoder:
        if call.pop(name, None) is not None:
            raise FastMLMUnsupported(f"the patched {type(model).__name__}.forward cannot pass {name} to its encoder")
    arch = state.arch
    outputs, hidden = _run_encoder(model, state, call, labels)
    decoder = arch.decoder(model)
    loss, logits, positions = masked_rows_loss(
        hidden, labels, lambda x: arch.transform(model, x), decoder.weight, decoder.bias,
        max_masked_fraction=state.max_masked_fraction,
        num_items_in_batch=call.get("num_items_in_batch") if arch.divides_by_num_items else None,
        return_logits=want_logits)

    from transformers.modeling_outputs import MaskedLMOutput

    out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=getattr(outputs, "hidden_states", None),
                         attentions=getattr(outputs, "attentions", None))
    if want_logits:
        out["masked_positions"] = positions
    return out if return_dict else out.to_tuple()


def _run_encoder(model, state: PatchState, call: dict, labels: Tensor):
    """The encoder's outputs and its (B, S, H) last hidden state, on the real tokens only where
    :func:`fastmlm.hf.unpad.plan` says so (padding rows are then zeros)."""
    arch = state.arch
    encoder = getattr(model, arch.encoder)
    wants_hidden = call.get("output_hidden_states") or getattr(model.config, "output_hidden_states", False)
    packed = None if wants_hidden else _unpad.plan(state.unpad, call.get("attention_mask"), labels,
                                                   contiguous_only=arch.contiguous_only)
    if packed is None:
        outputs = encoder(**call, return_dict=True)
        return outputs, outputs[0]
    call = {**call, "attention_mask": None, **packed.attention_kwargs()}
    if arch.packs_position_ids:
        positions = call.get("position_ids")
        if positions is None:
            positions = torch.arange(packed.seqlen, device=packed.index.device)[None]
        call["position_ids"] = packed.gather(positions.expand(packed.batch, packed.seqlen))
    with packed.after(encoder.embeddings):
        outputs = encoder(**call, return_dict=True)
    return outputs, packed.scatter(outputs[0])


def is_patched(model: nn.Module) -> bool:
    return STATE in model.__dict__


def patch(model: nn.Module, *, max_masked_fraction: float = DEFAULT_MAX_MASKED_FRACTION,
          unpad: Union[str, bool] = "auto") -> nn.Module:
    """Give a transformers ``*ForMaskedLM`` fastmlm attention and the masked-rows-only loss, in place.

    Idempotent (a second call only updates ``max_masked_fraction`` and ``unpad``); returns the model.
    ``max_masked_fraction``: the share of a batch's tokens that may be masked (see the module
    docstring), in (0, 1]. ``unpad``: run the encoder on the real tokens only when a batch with
    labels has padding (fastmlm/hf/unpad.py): "auto" on CPU tensors (free there), True also on
    CUDA (one host sync per step), False never. FastMLMUnsupported for models it cannot patch
    (see :data:`ARCHITECTURES`), decoders and cross-attention.
    """
    if isinstance(max_masked_fraction, bool) or not isinstance(max_masked_fraction, numbers.Real) \
            or not 0 < max_masked_fraction <= 1:
        raise ValueError(f"max_masked_fraction must be a number in (0, 1], got {max_masked_fraction!r}")
    _unpad.check_mode(unpad)
    _check_module("patch", model)
    arch = architecture_of(model)
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise FastMLMUnsupported(f"{type(model).__name__} has is_decoder / add_cross_attention set; fastmlm "
                                 "attention is bidirectional self-attention: set both to False")
    register()
    if is_patched(model):
        model.__dict__[STATE].max_masked_fraction = float(max_masked_fraction)
        model.__dict__[STATE].unpad = unpad
        return model

    before = config._attn_implementation
    model.set_attn_implementation(NAME)
    if config._attn_implementation != NAME:  # transformers only warns when a model cannot switch
        model.set_attn_implementation(before)
        raise FastMLMUnsupported(f"{type(model).__name__} did not accept attn_implementation={NAME!r} "
                                 f"(it stays {config._attn_implementation!r})")
    names, _ = _parameters(type(model).forward)
    encoder_names, encoder_kwargs = _parameters(type(getattr(model, arch.encoder)).forward)
    names = tuple(names)
    skip = {"labels", "return_dict"}
    not_for_encoder = tuple(n for n in names if n not in skip and n not in encoder_names and not encoder_kwargs)
    model.__dict__[STATE] = PatchState(arch, before, model.__dict__.get("forward"), names, not_for_encoder,
                                       float(max_masked_fraction), unpad)
    model.forward = _make_forward(type(model).forward).__get__(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original forward and attention implementation. A model that is not
    patched is returned unchanged."""
    _check_module("unpatch", model)
    state: Optional[PatchState] = model.__dict__.pop(STATE, None)
    if state is None:
        return model
    if getattr(model.__dict__.get("forward"), "fastmlm_patched", False):
        del model.forward
    if state.previous_forward is not None:
        model.forward = state.previous_forward
    model.set_attn_implementation(state.attn_implementation)
    return model
