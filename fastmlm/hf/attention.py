"""fastmlm attention inside Hugging Face transformers models: ``register()`` and the two functions it registers.

transformers 5 builds an encoder's mask through ``masking_utils.AttentionMaskInterface`` and runs its
attention through ``AttentionInterface``, both looked up by ``config._attn_implementation``.
:func:`register` adds ``"fastmlm"`` to both, so ``attn_implementation="fastmlm"`` gives:

    encoder forward
      create_bidirectional_mask(config, embeds, attention_mask)         (B, S) 1 = real token, 0 = padding
        └── fastmlm_mask(...) ──> the (B, S) bool key-padding mask, or None
            (a local layer's create_bidirectional_sliding_window_mask ──> SlidingWindowMask(padding, window))
      every attention module: q, k, v (B, H, S, D)
        └── fastmlm_attention(module, q, k, v, mask, scaling=..., dropout=...)
              dense    fastmlm.ops.attention(q, k, v as (B, S, H, D) views, attention_mask=mask, softmax_scale=scaling)
              window   fastmlm.ops.block_sparse_attention(..., sliding_window(S, window) layout, ...)
            returns (out (B, S, H, D), None)         transformers reshapes out to (B, S, H * D)

Both halves are needed: transformers skips mask creation for a name its mask interface does
not know, so registering the attention function alone would silently drop the padding.
The kernels get the padded layout with its key mask, so they skip padded key tiles.

What fastmlm cannot compute raises :class:`FastMLMUnsupported` naming what to change:
attention dropout in training mode (fastmlm's kernels have none: set the config field it
names to 0), ``output_attentions`` (no probabilities are formed), a causal mask or
``is_causal`` module (fastmlm attention is bidirectional), cross-attention, caches and
prefixes, custom mask functions, ``head_mask``, terms added to the scores (T5's
``position_bias``, attention sinks, soft-capping: :data:`SCORE_TERMS`), and any 4-D mask
other than a (B, 1, 1, S) boolean key-padding mask. A model that never calls the interfaces (its
attention is written inline, e.g. DeBERTa-v2) cannot be reached from here;
:func:`fastmlm.hf.patch` refuses such models.

Checked against transformers 5.17 and 5.24, whose mask builders pass the same arguments
(``allow_is_bidirectional_skip`` only from the bidirectional builders, ``local_size`` from
the sliding-window ones). transformers is imported when a function runs, never at import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from packaging import version
from torch import Tensor

from ..ops import attention, block_sparse_attention
from ..ops.block_layout import BlockSparseLayout, sliding_window

NAME = "fastmlm"
MIN_TRANSFORMERS = "5.0"  # encoders build their masks through AttentionMaskInterface from 5.0 on
# Where configs keep the attention dropout: BERT / RoBERTa / XLM-R / ELECTRA, then DistilBERT / ModernBERT.
DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")
WINDOW_BLOCK = 64  # block size of the sliding-window layouts (the Triton kernels want a power of two)
# Keyword arguments some models pass to the attention function that change the scores (T5's relative
# position bias, attention sinks, logit soft-capping); fastmlm's kernels have no such term, so ignoring
# one would silently compute other attention.
SCORE_TERMS = frozenset(("position_bias", "s_aux", "sinks", "softcap"))


class FastMLMUnsupported(ValueError):
    """A model, input or setting that fastmlm's attention or loss cannot run as it is; the message says what
    to change."""


@dataclass(frozen=True)
class SlidingWindowMask:
    """What :func:`fastmlm_mask` returns for a local (sliding-window) layer.

    padding: (B, S) bool, True = real token, or None without padding.
    window:  a query attends to the real keys at most ``window`` positions away (|i - j| <= window).
    """

    padding: Optional[Tensor]
    window: int


def _transformers():
    import transformers

    if version.parse(transformers.__version__) < version.parse(MIN_TRANSFORMERS):
        raise FastMLMUnsupported(f"fastmlm.hf needs transformers >= {MIN_TRANSFORMERS} (found "
                                 f"{transformers.__version__}): earlier versions build encoder masks outside "
                                 "AttentionMaskInterface")
    return transformers


def register() -> None:
    """Register ``"fastmlm"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Afterwards ``from_pretrained(path, attn_implementation="fastmlm")`` (or
    ``model.set_attn_implementation("fastmlm")``) runs fastmlm attention in every encoder
    that routes attention through the interfaces.
    """
    transformers = _transformers()
    from transformers.masking_utils import AttentionMaskInterface

    for interface, function in ((transformers.AttentionInterface, fastmlm_attention),
                                (AttentionMaskInterface, fastmlm_mask)):
        if interface._global_mapping.get(NAME) is not function:
            interface.register(NAME, function)
    import_backends()


def _registries() -> tuple:
    """The dispatch registries of the ops the drop-in runs."""
    from ..ops.attention import REGISTRY as ATTENTION
    from ..ops.block_sparse import REGISTRY as BLOCK_SPARSE
    from ..ops.masked_ce import REGISTRY as MASKED_CE

    return ATTENTION, BLOCK_SPARSE, MASKED_CE


def import_backends() -> None:
    """Import every fastmlm.ops backend the drop-in may run, now, outside any torch.compile trace.

    The dispatcher imports a backend the first time it considers it, and dynamo cannot trace an
    import: a model compiled before its first eager step would break its graph there. A backend
    that cannot be imported here (no triton, extension not built) is left to the dispatcher,
    which says why when it is asked for.
    """
    for registry in _registries():
        for name in registry.modules:
            try:
                registry.module(name)
            except Exception:  # noqa: BLE001 - reported by the dispatcher when that backend is chosen
                pass


def is_registered() -> bool:
    """Whether both halves of :func:`register` are in place."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface

    return (transformers.AttentionInterface._global_mapping.get(NAME) is fastmlm_attention
            and AttentionMaskInterface._global_mapping.get(NAME) is fastmlm_mask)


# --------------------------------------------------------------------------- the mask function
def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def fastmlm_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: Optional[Tensor] = None, local_size: Optional[int] = None, use_vmap: bool = False,
                 **kwargs):
    """transformers' mask-interface signature; returns the (B, S) bool key-padding mask (or None), or a
    :class:`SlidingWindowMask` for a sliding-window layer. Anything else raises FastMLMUnsupported."""
    from transformers.masking_utils import bidirectional_mask_function

    if "allow_is_bidirectional_skip" not in kwargs:  # only the causal builders leave it out
        raise FastMLMUnsupported("the model asks for a causal mask (a decoder: config.is_decoder=True?); fastmlm "
                                 "attention is bidirectional: use it in encoders, with is_decoder=False")
    if use_vmap:  # set by transformers when a model adds its own or/and mask functions
        raise FastMLMUnsupported("the model combines its mask with a custom mask function; fastmlm attention takes "
                                 "a key-padding mask (and a sliding window) only")
    if not (_is_zero(q_offset) and _is_zero(kv_offset)):
        raise FastMLMUnsupported(f"mask offsets q_offset={q_offset!r}, kv_offset={kv_offset!r} (a cache or prefix "
                                 "tuning): fastmlm attention runs full sequences without a cache")
    if q_length != kv_length:  # kv_length is the attention_mask's width when one is given
        raise FastMLMUnsupported(f"queries ({q_length}) and keys ({kv_length}) differ in length: an attention_mask "
                                 f"of shape {tuple(attention_mask.shape) if attention_mask is not None else None} "
                                 f"for {q_length} tokens (expected (batch, seqlen) = ({batch_size}, {q_length})), "
                                 "or cross-attention or a prefix; fastmlm attention is self-attention")
    padding = attention_mask
    if padding is not None:
        if padding.dim() != 2 or tuple(padding.shape) != (batch_size, kv_length):
            raise FastMLMUnsupported(f"attention_mask has shape {tuple(padding.shape)}; fastmlm attention takes a "
                                     f"(batch, seqlen) = ({batch_size}, {kv_length}) key-padding mask")
        padding = padding.bool()
    if local_size is not None:
        return SlidingWindowMask(padding, int(local_size))
    if mask_function is not bidirectional_mask_function:
        name = getattr(mask_function, "__name__", mask_function)
        raise FastMLMUnsupported(f"the model builds its mask with {name!r}; fastmlm attention supports plain "
                                 "bidirectional (and sliding-window) masks")
    return padding


# --------------------------------------------------------------------------- the attention function
def _dropout_message(module, p: float) -> str:
    config = getattr(module, "config", None)
    fields = [f for f in DROPOUT_FIELDS if isinstance(getattr(config, f, None), (int, float))
              and math.isclose(float(getattr(config, f)), p)]
    field = fields[0] if fields else "the attention dropout field"
    where = type(config).__name__ if config is not None else type(module).__name__
    return (f"{where}.{field}={p} and the model is in training mode, but fastmlm attention has no dropout: "
            f"set {field}=0.0 (e.g. from_pretrained(path, attn_implementation='fastmlm', {field}=0.0), "
            f"or model.config.{field} = 0.0 before building the model), or run it in eval mode")


def _check_call(module, query: Tensor, key: Tensor, value: Tensor, dropout: float, kwargs: dict) -> None:
    name = type(module).__name__
    if dropout:
        raise FastMLMUnsupported(_dropout_message(module, float(dropout)))
    config = getattr(module, "config", None)
    asked = kwargs.get("output_attentions")  # the call's own value, when it gives one, overrides the config's
    if asked or (asked is None and getattr(config, "output_attentions", False)):
        raise FastMLMUnsupported("output_attentions=True: fastmlm attention never forms the attention probabilities; "
                                 "use attn_implementation='eager' to inspect them")
    if kwargs.get("head_mask") is not None:
        raise FastMLMUnsupported("head_mask is not supported by fastmlm attention")
    if not SCORE_TERMS.isdisjoint(kwargs):  # one set operation on the few keyword names: cheap per layer
        terms = sorted(k for k in SCORE_TERMS & kwargs.keys() if kwargs[k] is not None)
        if terms:
            raise FastMLMUnsupported(f"{name} passes {', '.join(terms)} to its attention function, a term added to "
                                     "the attention scores; fastmlm attention computes softmax(q k^T * scale) with a "
                                     "key-padding mask only: keep this model on attn_implementation='eager' or 'sdpa'")
    if getattr(module, "is_causal", False) or kwargs.get("is_causal"):
        raise FastMLMUnsupported(f"{name} is causal (a decoder); fastmlm attention is bidirectional")
    if "CrossAttention" in name or getattr(module, "is_cross_attention", False):
        raise FastMLMUnsupported(f"{name} is cross-attention; fastmlm attention is self-attention")
    if query.dim() != 4:
        raise FastMLMUnsupported(f"{name} passes a query of shape {tuple(query.shape)}; expected "
                                 "(batch, heads, seqlen, head_dim)")
    if key.shape != query.shape or value.shape != query.shape:
        raise FastMLMUnsupported(f"{name}: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                                 f"{tuple(value.shape)}; fastmlm attention needs one shape for all three "
                                 "(self-attention, as many key/value heads as query heads)")


def _key_padding(mask, batch: int, seqlen: int) -> Optional[Tensor]:
    """The (B, S) bool key mask fastmlm.ops takes, from what reached the attention function."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise FastMLMUnsupported(f"attention mask of type {type(mask).__name__}; fastmlm attention takes the (batch, "
                                 "seqlen) key-padding mask its mask function builds (call fastmlm.hf.register())")
    if mask.dim() == 4 and tuple(mask.shape) == (batch, 1, 1, seqlen) and mask.dtype == torch.bool:
        return mask[:, 0, 0, :]
    if mask.dim() == 2 and tuple(mask.shape) == (batch, seqlen) and not mask.dtype.is_floating_point:
        return mask.bool()
    raise FastMLMUnsupported(
        f"a {mask.dim()}-D {mask.dtype} attention mask of shape {tuple(mask.shape)} reached fastmlm attention; it "
        f"takes a key-padding mask: pass attention_mask as (batch, seqlen) = ({batch}, {seqlen}) with 1 = real "
        "token, 0 = padding (a custom 4-D or additive mask cannot be represented)")


@lru_cache(maxsize=64)
def _window_layout(seqlen: int, window: int, device: torch.device) -> BlockSparseLayout:
    """One sliding-window layout per (seqlen, window, device), built once and reused by every layer and step."""
    return sliding_window(seqlen, window, block_size=WINDOW_BLOCK).to(device)


def _packed(module, batch: int, mask, kwargs: dict):
    """(cu_seqlens, max_seqlen) from transformers' packed-sequence keyword arguments, or None when not packed.

    They come from fastmlm.hf.patch's unpadded path (fastmlm/hf/unpad.py) or from a caller that
    packs its own batch: the (1, H, T, D) tokens of several sequences laid end to end.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    name = type(module).__name__
    if cu_q is None or cu_k is None or not (cu_q is cu_k or torch.equal(cu_q, cu_k)) or max_q != max_k:
        raise FastMLMUnsupported(f"{name} got different packed query and key sequences (cu_seq_lens_q / _k, "
                                 "max_length_q / _k); fastmlm attention is self-attention")
    if batch != 1 or mask is not None:
        raise FastMLMUnsupported(f"{name} got packed sequences (cu_seq_lens_q) with batch {batch} and "
                                 f"{'a' if mask is not None else 'no'} padding mask; packed tokens come as one "
                                 "(1, heads, total_tokens, head_dim) row without a mask")
    if not isinstance(max_q, int):
        raise FastMLMUnsupported(f"{name} got max_length_q={max_q!r}; packed sequences need their longest length "
                                 "as a Python int")
    return cu_q.to(torch.int32), max_q


def fastmlm_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-interface signature: (B, H, S, D) q, k, v -> ((B, S, H, D) output, None).

    ``attention_mask`` is what :func:`fastmlm_mask` built: the (B, S) key-padding mask, None, or a
    :class:`SlidingWindowMask`. ``scaling`` is the module's softmax scale (default head_dim ** -0.5).
    Packed sequences (B = 1, S = total tokens) come with transformers' ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` ((n+1,) offsets) and ``max_length_q`` / ``max_length_k`` and no mask; each
    sequence then attends to itself only. Other keyword arguments transformers passes along
    (position ids, loss counts) are ignored.
    """
    _check_call(module, query, key, value, dropout, kwargs)
    batch, _, seqlen, _ = query.shape
    window = None
    if isinstance(attention_mask, SlidingWindowMask):
        window, attention_mask = attention_mask.window, attention_mask.padding
    asked = kwargs.get("sliding_window")  # ModernBERT passes its window + 1 (flash attention's convention)
    if asked is not None and (window is None or asked != window + 1):
        raise FastMLMUnsupported(f"{type(module).__name__} asks for sliding_window={asked} but its mask says "
                                 f"{'no window' if window is None else f'window {window}'}: the mask did not come from "
                                 "fastmlm's mask function (call fastmlm.hf.register())")
    packed = _packed(module, batch, attention_mask, kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views; fastmlm.ops takes any strides
    if packed is None:
        layout = dict(attention_mask=_key_padding(attention_mask, batch, seqlen))
    else:  # (T, H, D) views
        q, k, v = q[0], k[0], v[0]
        layout = dict(cu_seqlens=packed[0], max_seqlen=packed[1])
        seqlen = packed[1]
    if window is None or window >= seqlen - 1:  # a window covering the whole sequence is dense attention
        out = attention(q, k, v, softmax_scale=scaling, **layout)
    else:
        out = block_sparse_attention(q, k, v, _window_layout(seqlen, window, q.device), softmax_scale=scaling,
                                     **layout)
    return (out if packed is None else out[None]), None
