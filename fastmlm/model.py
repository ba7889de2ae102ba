"""A BERT-style encoder with a masked-LM head, running on fastmlm.ops.

    input_ids (B, S) + attention_mask        input_ids (T,) + cu_seqlens, max_seqlen
              \\ unpad once (one host sync)    /  (already packed: no sync at all)
               packed tokens (T,) ---> embeddings (T, H)
                                       N x EncoderLayer on (T, H)   attention: fastmlm.ops
                                       masked rows only (R, H) ---> head transform (R, H)
                                       fastmlm.ops.masked_lm_loss(rows, tied word embeddings, bias)
                                       optional pooler: first token of each sequence ---> dense + tanh (B, H)

Every layer works on the packed (T, hidden) tokens, so padding costs nothing past the
embeddings; ``hidden_states`` is put back in the caller's layout at the end. The MLM head
(dense + activation + LayerNorm, then the decoder tied to the word embeddings plus a
bias) runs only on the rows of the masked positions, and the vocabulary projection and
cross-entropy are one fused op that never holds the (R, vocab) logits in the fast backends.

Layer structure follows BERT (``norm_position="post"``): x = LN(x + Drop(Attn(x))),
x = LN(x + Drop(MLP(x))). ``"pre"`` gives x = x + Drop(Attn(LN(x))) with a final LayerNorm.
Parameter names differ from Hugging Face's; fastmlm/hf.py maps between them.

``save_pretrained`` writes config.json, model.safetensors and a manifest.json of their
sha256 (fastmlm.checkpoint's format), so the folder is verified wherever a checkpoint is
used (``fastmlm.predict.load_checkpoint`` refuses folders without one). ``from_pretrained``
itself only checks that the files parse and match the model.
"""
from __future__ import annotations

import functools
import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import AttentionPattern, ModelConfig
from .ops import checks, padding
from .ops.block_layout import BlockSparseLayout, global_tokens, sliding_window

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
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


@dataclass
class PackedBatch:
    """The real tokens of a batch, packed, plus what is needed to go back to the caller's layout.

    input_ids, token_type_ids, positions: (T,) int64 (positions = index inside the sequence).
    cu_seqlens: (B+1,) int32; max_seqlen: int.
    token_index: (T,) int64 flat index of each packed token in the caller's (B*S) layout,
        or None when the two coincide (packed input, or a padded batch without padding).
    padded_shape: (B, S) when the caller passed a padded batch, else None.
    """

    input_ids: Tensor
    token_type_ids: Tensor
    positions: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    token_index: Optional[Tensor]
    padded_shape: Optional[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def dense_shape(self) -> Optional[tuple[int, int]]:
        """(B, S) when every sequence has the same length S, so attention can skip pad/unpad."""
        return self.padded_shape if self.token_index is None else None


# --------------------------------------------------------------------------- building blocks
def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh")
    return F.relu


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
        self.qkv = nn.Linear(h, 3 * h)  # rows: [query; key; value], each (h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(h, cfg.intermediate_size)
        self.mlp_out = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.act = _activation(cfg.activation)

    def attention(self, x: Tensor, batch: PackedBatch, layout: Optional[BlockSparseLayout]) -> Tensor:
        tokens, heads, head_dim = x.shape[0], self.cfg.num_heads, self.cfg.head_dim
        qkv = self.qkv(x).view(tokens, 3, heads, head_dim)  # (T, 3H) -> (T, 3, heads, head_dim)
        q, k, v = qkv.unbind(1)  # each (T, heads, head_dim), strided views of qkv (no copy)
        if batch.dense_shape is not None:  # no padding anywhere: the padded layout needs no mask
            b, s = batch.dense_shape
            q, k, v = (t.view(b, s, heads, head_dim) for t in (q, k, v))  # (B, S, heads, head_dim)
            where = dict()
        else:
            where = dict(cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
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
    """dense + activation + LayerNorm on the masked rows; the decoder is the tied word embedding + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = _activation(cfg.activation)

    def transform(self, rows: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(rows)))  # (R, H) -> (R, H)


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
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, p) for p in cfg.layer_patterns())
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_position == "pre" else None
        self.head = MLMHead(cfg)
        self.pooler = Pooler(cfg) if pooler else None  # last: without it, initialisation draws as before
        # Block-sparse layouts, built once per (pattern, seqlen, device) and reused by every step.
        self._layouts: dict[tuple, BlockSparseLayout] = {}
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

    # ------------------------------------------------------------------ input boundary
    def _check_ids(self, name: str, t, shape, upper: Optional[int], device=None):
        if not isinstance(t, Tensor) or t.dtype not in checks.INDEX_DTYPES:
            _fail(f"{name} must be an int32/int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if device is not None and t.device != device:
            _fail(f"{name} is on {t.device} but input_ids is on {device}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            _fail(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of input_ids)")
        if upper is not None and t.numel():
            torch._assert_async(((t >= 0) & (t < upper)).all(), f"{_NAME}: {name} must lie in [0, {upper})")

    def pack(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
             token_type_ids: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
             max_seqlen: Optional[int] = None, count: Optional[Tensor] = None) -> tuple[PackedBatch, Optional[int]]:
        """Check the inputs and pack the real tokens; returns (batch, host value of ``count``).

        A padded batch with an attention_mask needs the token count and longest length on
        the host (they are shapes): that is the one host synchronisation of a step, and
        ``count`` (an optional 0-d device tensor) rides along on it.
        """
        cfg = self.config
        self._check_ids("input_ids", input_ids, None, cfg.vocab_size)
        device = input_ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        self._check_ids("token_type_ids", token_type_ids, input_ids.shape, cfg.type_vocab_size, device)
        if input_ids.dim() == 1:  # already packed by the data collator
            if attention_mask is not None:
                _fail("attention_mask is for padded (B, S) input_ids; packed (T,) input_ids use cu_seqlens")
            if cu_seqlens is None or max_seqlen is None:
                _fail("packed (T,) input_ids need cu_seqlens ((B+1,) int32) and max_seqlen (int)")
            checks.check_tensor(_NAME, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
            if not isinstance(max_seqlen, int) or not 0 <= max_seqlen <= cfg.max_position_embeddings:
                _fail(f"max_seqlen must be an int in [0, max_position_embeddings={cfg.max_position_embeddings}], "
                      f"got {max_seqlen!r}")
            _, positions = padding.packed_coords(cu_seqlens, input_ids.shape[0])  # (T,) index in sequence
            if positions.numel():  # checked here, before the position embedding would index out of range
                torch._assert_async(((positions >= 0) & (positions < max_seqlen)).all(),
                                    f"{_NAME}: cu_seqlens must start at 0, and no packed sequence may be "
                                    f"longer than max_seqlen={max_seqlen} (at most max_position_embeddings="
                                    f"{cfg.max_position_embeddings})")
            batch = PackedBatch(input_ids.long(), token_type_ids.long(), positions, cu_seqlens, max_seqlen, None, None)
            return batch, None if count is None else int(count)
        if input_ids.dim() != 2:
            _fail(f"input_ids must be (B, S) padded or (T,) packed, got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None or max_seqlen is not None:
            _fail("cu_seqlens/max_seqlen are for packed (T,) input_ids; padded (B, S) input_ids use attention_mask")
        b, s = input_ids.shape
        if s > cfg.max_position_embeddings:
            _fail(f"sequence length {s} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        positions = torch.arange(s, device=device)
        if attention_mask is None:  # every token is real: packing is a free reshape
            cu = torch.arange(b + 1, device=device, dtype=torch.int32) * s  # (B+1,); s may be 0
            batch = PackedBatch(input_ids.reshape(-1).long(), token_type_ids.reshape(-1).long(),  # (B, S) -> (B*S,)
                                positions.repeat(b), cu, s, None, (b, s))
            return batch, None if count is None else int(count)
        if not isinstance(attention_mask, Tensor) or attention_mask.dtype.is_floating_point:
            _fail("attention_mask must be a bool or integer tensor (1 = real token), not a float additive bias")
        if tuple(attention_mask.shape) != (b, s) or attention_mask.device != device:
            _fail(f"attention_mask is {tuple(attention_mask.shape)} on {attention_mask.device}, "
                  f"expected {(b, s)} on {device}")
        mask = attention_mask.bool().reshape(-1)  # (B, S) -> (B*S,)
        lengths = mask.view(b, s).sum(1, dtype=torch.int32)  # (B,)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
        wanted = [cu[-1], F.pad(lengths, (0, 1)).max()] + ([] if count is None else [count.reshape(())])
        total, longest, *host_count = torch.stack([w.long() for w in wanted]).tolist()  # the one sync
        # The real tokens, in order: a stable sort puts mask == True first. Positions are the
        # column in the padded row, as in Hugging Face BERT (so left padding also works).
        token_index = torch.sort((~mask).to(torch.int8), stable=True).indices[:total]  # (T,)
        ids, types = (t.reshape(-1)[token_index].long() for t in (input_ids, token_type_ids))  # (B, S) -> (T,)
        batch = PackedBatch(ids, types, token_index % s, cu, longest, token_index, (b, s))
        return batch, host_count[0] if host_count else None

    # ------------------------------------------------------------------ encoder
    def encode(self, batch: PackedBatch) -> Tensor:
        """Packed batch -> (T, hidden) encoder output."""
        x = self.embeddings(batch)  # (T, H)
        for layer in self.layers:
            x = layer(x, batch, self.layout(layer.pattern, batch.max_seqlen, x.device))
        return x if self.final_norm is None else self.final_norm(x)

    def repad(self, hidden: Tensor, batch: PackedBatch) -> Tensor:
        """(T, H) -> the caller's layout: (B, S, H) with zero padding, or (T, H) unchanged."""
        if batch.padded_shape is None:
            return hidden
        b, s = batch.padded_shape
        if batch.token_index is None:
            return hidden.view(b, s, hidden.shape[-1])  # (B*S, H) -> (B, S, H)
        out = hidden.new_zeros(b * s, hidden.shape[-1]).index_copy(0, batch.token_index, hidden)  # (B*S, H)
        return out.view(b, s, hidden.shape[-1])  # (B*S, H) -> (B, S, H)

    def _rows(self, positions: Tensor, batch: PackedBatch) -> Tensor:
        """Caller-layout flat positions (R,) -> packed row index (R,), -1 where padded or not a real token."""
        valid = positions >= 0
        if batch.token_index is None:
            return torch.where(valid, positions, -1)
        b, s = batch.padded_shape
        # (B*S + 1,): one extra -1 at the end, read by invalid positions (there is no other slot when B*S == 0)
        packed_of = torch.full((b * s + 1,), -1, dtype=torch.long, device=positions.device)
        packed_of[batch.token_index] = torch.arange(batch.num_tokens, device=positions.device)
        return packed_of[torch.where(valid, positions, b * s)]

    def _gather_rows(self, hidden: Tensor, rows: Tensor) -> Tensor:
        """(T, H), (R,) -> (R, H); rows of -1 read row 0 (callers mask them out)."""
        if hidden.shape[0] == 0:  # nothing real to read: an empty or all-padding batch
            return hidden.new_zeros(rows.shape[0], hidden.shape[-1])
        return hidden[rows.clamp(min=0)]

    def _check_positions(self, name: str, positions, tokens: int, device):
        checks.check_tensor(_NAME, name, positions, ndim=1, dtypes=checks.INDEX_DTYPES, device=device)
        if positions.numel():
            torch._assert_async(((positions >= -1) & (positions < tokens)).all(),
                                f"{_NAME}: {name} must lie in [-1, {tokens}) (flat indices into input_ids, -1 = pad)")

    # ------------------------------------------------------------------ public API
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                masked_positions: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, loss_reduction: str = "mean") -> MLMOutput:
        """Encode a padded (B, S) or packed (T,) batch; with ``labels``, the MLM loss on the masked tokens.

        labels: like input_ids, the target id at masked tokens and -100 elsewhere (and at padding).
        masked_positions: optional (R,) flat indices of the masked tokens into input_ids, padded
            with -1 (a static R, e.g. from the collator). Without it the masked tokens are found
            from labels, which costs a host synchronisation.
        loss_reduction: "mean" over the masked tokens (0 when there are none) or "sum".
        """
        if loss_reduction not in ("mean", "sum"):
            _fail(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if masked_positions is not None and labels is None:
            _fail("masked_positions needs labels (the targets at those positions)")
        count = None
        if labels is not None:
            self._check_ids("labels", labels, getattr(input_ids, "shape", None), None, getattr(input_ids, "device", None))
            labels = labels.reshape(-1)  # (B, S) -> (B*S,), or (T,)
            torch._assert_async(((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < self.config.vocab_size))).all(),
                                f"{_NAME}: labels must be -100 or a token id in [0, {self.config.vocab_size})")
            if masked_positions is None:
                count = (labels != IGNORE_INDEX).sum()
            else:
                self._check_positions("masked_positions", masked_positions, labels.shape[0], labels.device)
        batch, n_rows = self.pack(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, count)
        if labels is not None and attention_mask is not None and labels.numel():
            torch._assert_async(((labels == IGNORE_INDEX) | attention_mask.reshape(-1).bool()).all(),
                                f"{_NAME}: labels must be -100 at padding positions (attention_mask == 0)")
        hidden = self.encode(batch)  # (T, H)
        pooled = None if self.pooler is None else self.pooler(hidden, batch.cu_seqlens)  # (B, H)
        out = MLMOutput(None, None, None, self.repad(hidden, batch), pooled)
        if labels is None:
            return out

        if masked_positions is None:  # the masked tokens, in order (n_rows came with pack's sync)
            masked_positions = torch.sort((labels == IGNORE_INDEX).to(torch.int8), stable=True).indices[:n_rows]
        positions = masked_positions.long()  # (R,) into the caller's layout
        rows = self._rows(positions, batch)  # (R,) into the packed tokens
        row_labels = torch.where(rows >= 0, labels[positions.clamp(min=0)] if labels.numel() else -1, IGNORE_INDEX)
        transformed = self.head.transform(self._gather_rows(hidden, rows))  # (R, H): the head on masked rows only
        out.loss, out.n_correct = ops.masked_lm_loss(
            transformed, self.embeddings.word.weight.to(transformed.dtype), self.head.bias.to(transformed.dtype),
            row_labels, reduction=loss_reduction, return_accuracy=True, backend=self.config.loss_backend)
        out.n_masked = (row_labels != IGNORE_INDEX).sum()
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
        self._check_positions("positions", positions, input_ids.numel(), input_ids.device)
        hidden = self.encode(batch)  # (T, H)
        rows = self._rows(positions.long(), batch)  # (R,)
        transformed = self.head.transform(self._gather_rows(hidden, rows))  # (R, H)
        logits = transformed.float() @ self.embeddings.word.weight.float().t() + self.head.bias.float()  # (R, V)
        return torch.where((rows >= 0)[:, None], logits, 0.0)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory) -> Path:
        """Write config.json, model.safetensors and their manifest.json into ``directory`` (created if needed).

        The manifest (sha256 of the two files) lets ``fastmlm.predict.load_checkpoint`` verify the
        folder; a tokenizer added beside them later loads but is not covered by it.
        """
        from safetensors.torch import save_file

        from .checkpoint import write_manifest

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps({"model_type": "fastmlm", **self.config.to_dict()}, indent=2))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model_type": "fastmlm"})
        write_manifest(path, [CONFIG_NAME, WEIGHTS_NAME])
        return path

    @classmethod
    def from_pretrained(cls, directory, **config_overrides) -> "FastMLMForMaskedLM":
        """Load what :meth:`save_pretrained` wrote (safetensors only); clear errors on bad files.

        ``config_overrides`` replace fields that do not change the weights' shapes
        (e.g. ``attention_backend``, ``hidden_dropout``). The model has a pooler when the
        weights hold one. The manifest is not checked here: ``fastmlm.predict.load_checkpoint``
        and training resume verify it.
        """
        path = Path(directory)
        cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_file, weights_file):
            if not f.is_file():
                _fail(f"{f} not found: a fastmlm checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            data = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            _fail(f"{cfg_file} is not valid JSON ({exc})")
        if not isinstance(data, dict) or data.get("model_type") != "fastmlm":
            kind = data.get("model_type") if isinstance(data, dict) else None
            hint = " Load Hugging Face checkpoints with fastmlm.hf.load_hf(directory)." if kind == "bert" else ""
            _fail(f"{cfg_file} is not a fastmlm config (model_type={kind!r}).{hint}")
        data.pop("model_type")
        cfg = ModelConfig.from_dict({**data, **config_overrides})
        tensors = read_safetensors(weights_file)
        model = cls(cfg, pooler=any(k.startswith("pooler.") for k in tensors))
        model.load_weights(tensors)
        return model

    def load_weights(self, tensors: dict[str, Tensor]) -> None:
        """Copy a full state dict in; ValueError listing missing, unexpected and mis-shaped tensors."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        shapes = [f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            _fail("checkpoint does not match the model:"
                  + (f"\n  missing keys: {missing}" if missing else "")
                  + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                  + (f"\n  shape mismatches: {shapes}" if shapes else ""))
        self.load_state_dict(tensors, strict=True)


def read_safetensors(file) -> dict[str, Tensor]:
    """Load a safetensors file to CPU tensors, turning any parse failure into a clear ValueError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(f"cannot read {file}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
