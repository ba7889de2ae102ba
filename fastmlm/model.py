"""A BERT-style encoder with a masked-LM head, running on fastmlm.ops.

    input_ids (B, S) + attention_mask        input_ids (T,) + cu_seqlens, max_seqlen
              \\ unpad once (one host sync)    /  (already packed: no sync at all)
               packed tokens (T,) ---> embeddings (T, H)
                                       N x EncoderLayer on (T, H)   attention: fastmlm.ops
                                       masked tokens only (R, H) ---> head transform (R, H)
                                       fastmlm.ops.masked_lm_loss(those R, tied word embeddings, bias)
                                       optional pooler: first token of each sequence ---> dense + tanh (B, H)

Every layer works on the packed (T, hidden) tokens, so padding costs nothing past the
embeddings; ``hidden_states`` is put back in the caller's layout at the end. The MLM head
(dense + activation + LayerNorm, then the decoder tied to the word embeddings plus a
bias) runs only on the R masked tokens, and the vocabulary projection and
cross-entropy are one fused op that never holds the (R, vocab) logits in the fast backends.

Layer structure follows BERT (``norm_position="post"``): x = LN(x + Drop(Attn(x))),
x = LN(x + Drop(MLP(x))). ``"pre"`` gives x = x + Drop(Attn(LN(x))) with a final LayerNorm.
Parameter names differ from Hugging Face's; fastmlm/hf.py maps between them. Packing and
repadding the caller's batch is fastmlm/ops/packing.py; the files of ``save_pretrained`` /
``from_pretrained`` (config.json, model.safetensors, manifest.json) are fastmlm/checkpoint.py's.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from . import checkpoint, ops
from .config import AttentionPattern, ModelConfig
from .data import IGNORE_INDEX
from .ops import packing
from .ops.block_layout import BlockSparseLayout, global_tokens, sliding_window
from .ops.packing import PackedBatch

_NAME = "FastMLMForMaskedLM"


def _fail(msg: str):
    raise ValueError(f"{_NAME}: {msg}")


@dataclass
class MLMOutput:
    """loss: fp32 0-d (None without labels); n_correct / n_masked: int64 0-d (None without labels);
    hidden_states: encoder output in the layout of input_ids plus a hidden dim, zeros at padding;
    pooler_output: (B, H) from a model built with ``pooler=True``, else None."""

    loss: Optional[Tensor]
    n_correct: Optional[Tensor]
    n_masked: Optional[Tensor]
    hidden_states: Tensor
    pooler_output: Optional[Tensor] = None


# --------------------------------------------------------------------------- building blocks
_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "relu": F.relu}


class Embeddings(nn.Module):
    """word + position + token type, then LayerNorm and dropout, on packed tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, batch: PackedBatch) -> Tensor:
        x = self.word(batch.input_ids) + self.position(batch.positions) + self.token_type(batch.token_type_ids)
        return self.dropout(self.norm(x))  # (T, H)


class EncoderLayer(nn.Module):
    """Self-attention (one fused QKV projection) and an MLP, each in a residual branch."""

    def __init__(self, cfg: ModelConfig, pattern: AttentionPattern):
        super().__init__()
        self.cfg, self.pattern = cfg, pattern
        h = cfg.hidden_size
        self.qkv = nn.Linear(h, 3 * h)  # weight (3h, h): [query; key; value] stacked, each (h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(h, cfg.intermediate_size)
        self.mlp_out = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.act = _ACTIVATIONS[cfg.activation]

    def attention(self, x: Tensor, batch: PackedBatch, layout: Optional[BlockSparseLayout]) -> Tensor:
        tokens, heads, head_dim = x.shape[0], self.cfg.num_heads, self.cfg.head_dim
        qkv = self.qkv(x).view(tokens, 3, heads, head_dim)  # (T, 3H) -> (T, 3, heads, head_dim)
        q, k, v = qkv.unbind(1)  # each (T, heads, head_dim), strided views of qkv (no copy)
        (q, k, v), where = batch.attention_layout(q, k, v)  # (B, S, heads, head_dim) views, or packed + cu_seqlens
        if layout is None:
            ctx = ops.attention(q, k, v, backend=self.cfg.attention_backend, **where)
        else:
            ctx = ops.block_sparse_attention(q, k, v, layout, backend=self.cfg.attention_backend, **where)
        return self.attn_out(ctx.reshape(tokens, heads * head_dim))  # (..., heads, head_dim) -> (T, H)

    def mlp(self, x: Tensor) -> Tensor:
        return self.mlp_out(self.act(self.mlp_in(x)))  # (T, H) -> (T, I) -> (T, H)

    def forward(self, x: Tensor, batch: PackedBatch, layout: Optional[BlockSparseLayout]) -> Tensor:
        if self.cfg.norm_position == "post":  # BERT
            x = self.attn_norm(x + self.dropout(self.attention(x, batch, layout)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attention(self.attn_norm(x), batch, layout))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class MLMHead(nn.Module):
    """dense + activation + LayerNorm on the masked tokens (R, H); the decoder is the tied word embedding + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = _ACTIVATIONS[cfg.activation]

    def transform(self, masked_hidden: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(masked_hidden)))  # (R, H) -> (R, H)


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first token ([CLS]) of each sequence.

    The MLM loss does not use it; it is kept so that a Hugging Face BertModel's pooler
    survives import and export (fastmlm/hf.py). The first token is the first *real* token,
    so a left-padded row pools its [CLS] (Hugging Face pools column 0, a padding token,
    there); an empty sequence pools nothing and gives zeros.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor, cu_seqlens: Tensor) -> Tensor:
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()  # (B,) each
        if hidden.shape[0] == 0:  # no real token anywhere: every sequence is empty
            return hidden.new_zeros(starts.shape[0], hidden.shape[-1])
        first = hidden[starts.clamp(max=hidden.shape[0] - 1)]  # (B, H); an empty sequence reads a neighbour...
        return torch.where((ends > starts)[:, None], torch.tanh(self.dense(first)), 0.0)  # ...and is zeroed


# --------------------------------------------------------------------------- activation checkpointing policies
def _keep_attention_context():
    """Selective checkpointing: keep what the fused attention forwards return, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = {torch.ops.fastmlm.attention_fwd.default, torch.ops.fastmlm.block_sparse_attention_fwd.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _no_context():
    return contextlib.nullcontext(), contextlib.nullcontext()


# --------------------------------------------------------------------------- the model
class FastMLMForMaskedLM(nn.Module):
    """BERT-style encoder + MLM head. See the module docstring and :meth:`forward`.

    ``pooler=True`` adds BERT's pooler (``pooler_output`` of :meth:`forward`), as Hugging
    Face's ``add_pooling_layer``; it is a constructor argument, not a config field, and
    ``from_pretrained`` / ``fastmlm.hf.load_hf`` add it when the weights hold one.
    """

    def __init__(self, cfg: ModelConfig, pooler: bool = False):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            _fail(f"expected a ModelConfig, got {type(cfg).__name__}")
        if not isinstance(pooler, bool):
            _fail(f"pooler must be True or False, got {pooler!r}")
        self.config = cfg.validate()
        self._limits = packing.InputLimits(_NAME, cfg.vocab_size, cfg.type_vocab_size, cfg.max_position_embeddings)
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, p) for p in cfg.layer_patterns())
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_position == "pre" else None
        self.head = MLMHead(cfg)
        self.pooler = Pooler(cfg) if pooler else None  # last: without it, initialisation draws as before
        # Block-sparse layouts, built once per (pattern, seqlen, device) and reused by every step.
        self._layouts: dict[tuple, BlockSparseLayout] = {}
        self._checkpointing: Optional[str] = None  # set_activation_checkpointing
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, zero padding embedding."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ layouts
    def layout(self, pattern: AttentionPattern, seqlen: int, device) -> Optional[BlockSparseLayout]:
        """The block-sparse layout of one pattern at one sequence length (None for dense), cached."""
        if pattern.dense:
            return None
        key = (pattern, seqlen, str(device))
        if key not in self._layouts:
            size, parts = self.config.block_size, []
            if pattern.window >= 0:
                parts.append(sliding_window(seqlen, pattern.window, size))
            if pattern.num_global > 0:
                parts.append(global_tokens(seqlen, pattern.num_global, size))
            self._layouts[key] = functools.reduce(operator.or_, parts).to(device)
        return self._layouts[key]

    # ------------------------------------------------------------------ packing (the input boundary) and encoding
    def pack(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
             token_type_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
             max_seqlen: Optional[int] = None, count: Optional[Tensor] = None) -> tuple[PackedBatch, Optional[int]]:
        """Check the inputs and pack the real tokens; returns (batch, host value of ``count``).

        A padded batch with an attention_mask costs the one host synchronisation of a step (its
        token count and longest length are shapes); ``count``, a 0-d device tensor, rides along on it.
        """
        return packing.pack(self._limits, input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, count)

    def set_activation_checkpointing(self, mode: Optional[str] = "selective") -> None:
        """Recompute each encoder layer's activations in the backward instead of keeping them.

        ``"selective"``: every layer runs under ``torch.utils.checkpoint`` (non-reentrant), but
        the fused attention's outputs (the fastmlm attention ops' out and log-sum-exp) are kept,
        so the backward recomputes the projections, MLP and norms, never the attention itself.
        ``"full"``: everything in the layer is recomputed. None: off. Dropout masks are the same
        in the recomputation (the RNG state is restored), so gradients equal the run without it.
        Only while gradients are enabled; evaluation runs as usual.
        """
        if mode not in (None, "selective", "full"):
            _fail(f"activation checkpointing mode must be None, 'selective' or 'full', got {mode!r}")
        self._checkpointing = mode

    def encode(self, batch: PackedBatch) -> Tensor:
        """Packed batch -> (T, hidden) encoder output."""
        x = self.embeddings(batch)  # (T, H)
        for layer in self.layers:
            layout = self.layout(layer.pattern, batch.max_seqlen, x.device)
            if self._checkpointing and torch.is_grad_enabled():
                context = _keep_attention_context if self._checkpointing == "selective" else _no_context
                x = torch.utils.checkpoint.checkpoint(layer, x, batch, layout, use_reentrant=False,
                                                      context_fn=context)
            else:
                x = layer(x, batch, layout)
        return x if self.final_norm is None else self.final_norm(x)

    # ------------------------------------------------------------------ public API
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                masked_positions: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, loss_reduction: str = "mean") -> MLMOutput:
        """Encode a padded (B, S) or packed (T,) batch; with ``labels``, the MLM loss on the masked tokens.

        labels: like input_ids, the target id at masked tokens and -100 elsewhere (and at padding).
        masked_positions: optional (R,) flat indices of the masked tokens into input_ids, padded
            with -1 (a static R, e.g. from the collator); every token whose label is not -100 must be
            in it, once. Without it the masked tokens are found from labels, which costs a host
            synchronisation.
        loss_reduction: "mean" over the masked tokens (0 when there are none) or "sum".
        """
        if loss_reduction not in ("mean", "sum"):
            _fail(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if masked_positions is not None and labels is None:
            _fail("masked_positions needs labels (the targets at those positions)")
        count = None
        if labels is not None:  # labels -> (N,) flat; count: the masked tokens to count on pack's host sync
            labels, count = packing.check_labels(self._limits, labels, input_ids, masked_positions, IGNORE_INDEX)
        batch, n_masked_on_host = self.pack(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, count)
        if labels is not None and attention_mask is not None:
            packing.check_labels_at_padding(_NAME, labels, attention_mask, IGNORE_INDEX)
        hidden = self.encode(batch)  # (T, H)
        pooled = None if self.pooler is None else self.pooler(hidden, batch.cu_seqlens)  # (B, H)
        out = MLMOutput(None, None, None, batch.repad(hidden), pooled)
        if labels is None:
            return out

        packed_index, masked_labels = packing.masked_tokens(batch, labels, masked_positions, n_masked_on_host,
                                                            IGNORE_INDEX)  # (R,) each, -1 / IGNORE_INDEX = none
        transformed = self.head.transform(packing.gather_tokens(hidden, packed_index))  # (R, H): masked tokens only
        out.loss, out.n_correct = ops.masked_lm_loss(
            transformed, self.embeddings.word.weight.to(transformed.dtype), self.head.bias.to(transformed.dtype),
            masked_labels, reduction=loss_reduction, return_accuracy=True, backend=self.config.loss_backend,
            max_masked_fraction=1.0)  # the rows are the masked tokens already: no bound
        out.n_masked = (masked_labels != IGNORE_INDEX).sum()
        if masked_positions is not None:  # a labelled token left out of them would silently not count
            torch._assert_async(out.n_masked == (labels != IGNORE_INDEX).sum(),
                                f"{_NAME}: masked_positions must list every token whose label is not "
                                f"{IGNORE_INDEX}, each once")
        return out

    def masked_logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      token_type_ids: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                      cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        """(R, vocab) fp32 MLM logits at ``positions`` ((R,) flat indices into input_ids).

        Rows whose position is -1 or a padding token are zeros. For fill-mask and evaluation.
        """
        if positions is None:
            _fail("masked_logits needs positions: (R,) flat indices into input_ids")
        batch, _ = self.pack(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen)
        packing.check_positions(_NAME, "positions", positions, input_ids.numel(), input_ids.device)
        hidden = self.encode(batch)  # (T, H)
        packed_index = batch.packed_index(positions.long())  # (R,)
        transformed = self.head.transform(packing.gather_tokens(hidden, packed_index))  # (R, H)
        logits = transformed.float() @ self.embeddings.word.weight.float().t() + self.head.bias.float()  # (R, V)
        return torch.where((packed_index >= 0)[:, None], logits, 0.0)

    # ------------------------------------------------------------------ save / load (fastmlm/checkpoint.py)
    def save_pretrained(self, directory) -> Path:
        """Write config.json, model.safetensors and their manifest.json into ``directory`` (see
        fastmlm.checkpoint.save_model_folder)."""
        return checkpoint.save_model_folder(self, directory)

    @classmethod
    def from_pretrained(cls, directory, **config_overrides) -> "FastMLMForMaskedLM":
        """Load what :meth:`save_pretrained` wrote; ``config_overrides`` replace fields that do not
        change the weights' shapes (e.g. ``attention_backend``). See fastmlm.checkpoint.load_model_folder.
        """
        return checkpoint.load_model_folder(cls, directory, **config_overrides)

    def load_weights(self, tensors: dict[str, Tensor]) -> None:
        """Copy a full state dict in; ValueError listing missing, unexpected and mis-shaped tensors."""
        checkpoint.load_model_weights(self, tensors)
