"""Block-sparse attention layouts: which (query block, key block) tiles to visit.

A layout splits a sequence of ``seqlen`` tokens into blocks of ``block_size``
(the last one may be short) and gives each head a state per tile:

    0 = skip     the kernel never loads this key block
    1 = full     every (query, key) pair in the tile attends, no per-element mask
    2 = partial  pairs attend where the token rule says so:
                 |i - j| <= window  or  i < num_global  or  j < num_global  or  token_mask[h, i, j]

    sliding window (window=1, block=2, S=8)     + 1 global token
      kb: 0 1 2 3                                 kb: 0 1 2 3
    qb0   2 2 . .                               qb0   2 2 2 2
    qb1   2 2 2 .                               qb1   2 2 2 .
    qb2   . 2 2 2                               qb2   2 2 2 2
    qb3   . . 2 2                               qb3   2 . 2 2

Layouts combine with ``|`` (a pair attends if it does in either). A layout is
built once, on the host, and reused across layers and steps; :func:`visit_list`
(``kv_blocks``) gives the per-query-block list of key blocks to visit. Positions are relative
to the start of each sequence, so one layout serves padded and packed batches
whose sequences are at most ``seqlen`` long.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

SKIP, FULL, PARTIAL = 0, 1, 2  # tile states; the Triton kernels (kernels/_flash.py) import these
INT32_MAX = 2**31 - 1


def visit_list(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The tiles to visit per row of a tile grid: the one builder, for layouts and kernel schedules.

    Arguments:
        keep: (H, n, m) bool, True where tile (i, j) is visited (not SKIP).
    Returns:
        index: (H, n, m) int32, per row the visited column indices in ascending order, then -1
            (full width m, so no host read of the largest count).
        count: (H, n) int32, how many entries of each row of ``index`` are real.
    """
    count = keep.sum(-1, dtype=torch.int32)
    # A stable sort puts the kept indices first, in ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    slots = torch.arange(keep.shape[-1], device=keep.device)
    index = torch.where(slots < count[..., None], order, -1).to(torch.int32)
    return index.contiguous(), count.contiguous()


# A device copy's tile states -> (the host tensor it was copied from, both tensors' versions then), so
# a backend that needs the layout's structure on the host (which route to take) reads it without a
# device-to-host copy, for as long as neither was edited in place.
_HOST_BLOCKS = WeakIdKeyDictionary()
_KV_BLOCKS = WeakIdKeyDictionary()  # a layout's tile tensor -> its kv_blocks (see per_layout)


def host_blocks(blocks: Tensor) -> Tensor:
    """The tile states of ``blocks`` on the CPU: itself, the host tensor a :meth:`BlockSparseLayout.to`
    copy came from, or (for a layout built on the device) one copy to the host, remembered; read from the
    device again after an in-place edit of either tensor, so a route is never judged on stale tiles."""
    if blocks.device.type == "cpu":
        return blocks
    found = _HOST_BLOCKS.get(blocks)
    if found is None or found[1] != (blocks._version, found[0]._version):  # an edit of either: read the device
        host = blocks.cpu()  # once per device layout (and edit)
        found = _HOST_BLOCKS[blocks] = (host, (blocks._version, host._version))
    return found[0]


def per_layout(cache: WeakIdKeyDictionary, blocks: Tensor, token_mask: Optional[Tensor], key: tuple,
               build: Callable[[], object]):
    """``build()`` once per layout and ``key``, remembered in ``cache`` under the layout's tile tensor
    ``blocks`` (held weakly) and rebuilt when its ``token_mask`` is another tensor or either was
    edited in place: what a backend derives from a layout (schedules, masks) is reused across
    layers and steps. One tile tensor may serve several layouts (``BlockSparseLayout`` keeps an
    int8 tensor as it is), so ``key`` holds whatever else the result depends on (block size, ...)."""
    versions = (blocks._version, None if token_mask is None else token_mask._version)
    entries = cache.setdefault(blocks, {})
    found = entries.get(key)
    if found is None or found[0] is not token_mask or found[1] != versions:
        found = entries[key] = (token_mask, versions, build())
    return found[2]


def _block_bounds(seqlen: int, block_size: int) -> tuple[Tensor, Tensor]:
    """First and last token of every block, (nb,) int64 each."""
    first = torch.arange(0, seqlen, block_size)
    return first, torch.clamp(first + block_size - 1, max=seqlen - 1)


def _classify(full: Tensor, some: Tensor) -> Tensor:
    return torch.where(full, FULL, torch.where(some, PARTIAL, SKIP)).to(torch.int8)


def _check_int(name: str, value, minimum: int) -> None:
    """A Python int >= minimum, or a ValueError naming the argument, the value and the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_sizes(seqlen, block_size) -> int:
    """Check the two sizes every layout has; return the number of blocks per side."""
    _check_int("seqlen", seqlen, 1)
    _check_int("block_size", block_size, 1)
    if block_size > INT32_MAX:  # not an OverflowError deep in torch.arange
        raise ValueError(f"block_size must be at most 2**31 - 1 (the kernels' int32), got {block_size!r}")
    return -(-seqlen // block_size)


def window_global_rule(rows: Tensor, cols: Tensor, window: int, num_global: int) -> Tensor:
    """The window and global-token part of the partial-tile rule for query tokens ``rows`` and key
    tokens ``cols`` (int tensors that broadcast together): |i - j| <= window or i, j < num_global.
    The token_mask part is left to the caller, which knows how its pairs index that mask."""
    rule = torch.zeros(torch.broadcast_shapes(rows.shape, cols.shape), dtype=torch.bool, device=rows.device)
    if window >= 0:
        rule |= (rows - cols).abs() <= window
    if num_global > 0:
        rule |= (rows < num_global) | (cols < num_global)
    return rule


def token_keep(blocks: Tensor, block_size: int, seqlen: int, window: int, num_global: int,
               token_mask: Optional[Tensor]) -> Tensor:
    """Dense (H, S, S) bool mask of the layout: True where query i may attend key j."""
    idx = torch.arange(seqlen, device=blocks.device)
    tile = blocks.long()[:, idx // block_size][:, :, idx // block_size]  # (H, S, S)
    rule = window_global_rule(idx[:, None], idx[None, :], window, num_global)
    if token_mask is not None:
        rule = rule | token_mask[:, :seqlen, :seqlen]
    return (tile == FULL) | ((tile == PARTIAL) & rule)


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Per-head tile states plus the token rule of partial tiles (see module docstring).

    blocks: (H or 1, nb, nb) int8 with nb = ceil(seqlen / block_size).
    window: -1 when the layout has no sliding-window rule.
    token_mask: (H or 1, seqlen, seqlen) bool, or None.
    """

    blocks: Tensor
    block_size: int
    seqlen: int
    window: int = -1
    num_global: int = 0
    token_mask: Optional[Tensor] = None
    _copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # device -> (versions, layout)

    def __post_init__(self):
        nb = _check_sizes(self.seqlen, self.block_size)
        _check_int("window", self.window, -1)
        _check_int("num_global", self.num_global, 0)
        # A window of seqlen - 1 already covers every pair and seqlen global tokens are all of them: a
        # larger value means the same, and clamped it fits the int64 of torch and the kernels' ints
        # (sliding_window(S, 10**30) is "attend to everything", not an OverflowError deep in torch).
        object.__setattr__(self, "window", int(min(self.window, self.seqlen - 1)))
        object.__setattr__(self, "num_global", int(min(self.num_global, self.seqlen)))
        object.__setattr__(self, "seqlen", int(self.seqlen))  # Python ints (not numpy's) for the custom ops
        object.__setattr__(self, "block_size", int(self.block_size))
        blocks = self.blocks
        if not isinstance(blocks, Tensor) or blocks.dtype.is_floating_point or blocks.dtype.is_complex \
                or blocks.dtype == torch.bool:
            raise ValueError(f"blocks must be an integer tensor of tile states 0/1/2, got "
                             f"{blocks.dtype if isinstance(blocks, Tensor) else type(blocks).__name__}")
        if blocks.dim() != 3 or tuple(blocks.shape[1:]) != (nb, nb) or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be (heads >= 1, {nb}, {nb}) for seqlen {self.seqlen} and block "
                             f"{self.block_size}, got {tuple(blocks.shape)}")
        valid = (blocks >= SKIP) & (blocks <= PARTIAL)
        if blocks.device.type == "cpu":  # layouts are built on the host: say which value is wrong
            if not valid.all():
                raise ValueError(f"blocks must hold only tile states 0 (skip), 1 (full) or 2 (partial), got "
                                 f"{sorted(set(blocks[~valid].tolist()))}")
        else:  # no host sync when a layout is moved to the GPU
            torch._assert_async(valid.all(), "blocks must hold only tile states 0 (skip), 1 (full) or 2 (partial)")
        object.__setattr__(self, "blocks", blocks.to(torch.int8))  # the dtype kernels read
        tm = self.token_mask
        if tm is not None and (not isinstance(tm, Tensor) or tm.dtype != torch.bool or tm.dim() != 3
                               or tuple(tm.shape[1:]) != (self.seqlen, self.seqlen)):
            got = f"{tm.dtype} {tuple(tm.shape)}" if isinstance(tm, Tensor) else type(tm).__name__
            raise ValueError(f"token_mask must be a bool (heads, {self.seqlen}, {self.seqlen}) tensor, got {got}")
        # Checked once here rather than on every attention call: a mask whose heads match neither the
        # tiles' nor 1 fits no q, and one on another device than the tiles would fail inside a kernel.
        if tm is not None and tm.shape[0] not in (1, self.num_heads) and self.num_heads != 1:
            raise ValueError(f"token_mask has {tm.shape[0]} heads but blocks has {self.num_heads} "
                             "(use 1 for either to share it across heads)")
        if tm is not None and tm.device != self.blocks.device:
            raise ValueError(f"token_mask is on {tm.device} but blocks is on {self.blocks.device} "
                             "(build the layout on one device, then move it with .to(device))")

    @property
    def num_heads(self) -> int:
        return self.blocks.shape[0]

    @property
    def density(self) -> float:
        """Fraction of tiles visited (full or partial), averaged over heads."""
        return float((self.blocks != SKIP).float().mean())

    def to_dense(self) -> Tensor:
        """(H or 1, seqlen, seqlen) bool: the token-level mask this layout means."""
        return token_keep(self.blocks, self.block_size, self.seqlen, self.window, self.num_global, self.token_mask)

    @property
    def kv_blocks(self) -> tuple[Tensor, Tensor]:
        """Key blocks to visit per (head, query block): :func:`visit_list` of the kept tiles,
        (H, nb, nb) int32 ascending padded with -1, and (H, nb) int32 counts. Built once per layout
        (again after an in-place edit of its tiles, as the backends' schedules are)."""
        return per_layout(_KV_BLOCKS, self.blocks, None, ("kv_blocks",), lambda: visit_list(self.blocks != SKIP))

    def to(self, device) -> "BlockSparseLayout":
        """This layout on ``device``: itself when already there, else one copy per device, kept, so
        repeated calls (every layer, every step) reuse its tensors and whatever backends cache on them."""
        device = torch.device(device)
        if self.blocks.device == device:  # keep the cached kv_blocks
            return self
        key = str(device)
        # A copy is of the tensors' values when it was made: after an in-place edit of this layout's
        # tiles or token mask (which the backends follow, see per_layout) copy them again, or the device
        # would run the old layout while host_blocks read the edited one.
        versions = (self.blocks._version, None if self.token_mask is None else self.token_mask._version)
        found = self._copies.get(key)
        if found is None or found[0] != versions:
            tm = None if self.token_mask is None else self.token_mask.to(device)
            copy = replace(self, blocks=self.blocks.to(device), token_mask=tm)
            if self.blocks.device.type == "cpu":
                _HOST_BLOCKS[copy.blocks] = (self.blocks, (copy.blocks._version, self.blocks._version))
            found = self._copies[key] = (versions, copy)
        return found[1]

    def _rule_reaches_skipped_tiles(self) -> bool:
        """Whether the token rule (window, global tokens, token mask) keeps a pair in a tile this layout
        skips: the builders never do, but a hand-made layout may narrow a rule by its tiles. Block-level
        work for the window and global rules; a token mask is looked at token by token."""
        first, last = (t.to(self.blocks.device) for t in _block_bounds(self.seqlen, self.block_size))
        q0, q1, k0, k1 = first[:, None], last[:, None], first[None, :], last[None, :]
        reached = torch.zeros(len(first), len(first), dtype=torch.bool, device=self.blocks.device)
        if self.window >= 0:  # the tile holds a pair at most window apart
            reached |= torch.clamp(torch.maximum(k0 - q1, q0 - k1), min=0) <= self.window
        if self.num_global > 0:  # the tile holds a global query or key
            reached |= (q0 < self.num_global) | (k0 < self.num_global)
        if self.token_mask is not None:
            reached = reached | from_dense_mask(self.token_mask, self.block_size).blocks.bool()
        return bool((reached & (self.blocks == SKIP)).any())

    def __or__(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented  # Python's TypeError "unsupported operand type(s) for |", not an AttributeError
        if (self.block_size, self.seqlen) != (other.block_size, other.seqlen):
            raise ValueError("only layouts with the same block_size and seqlen combine")
        if self.blocks.device != other.blocks.device:  # not torch's "Tensor on device cpu is not on the expected ..."
            raise ValueError(f"layouts on {self.blocks.device} and {other.blocks.device} do not combine "
                             "(move one with .to(device))")
        # The union applies both rules in every partial tile of either: a rule that reaches tiles its own
        # layout skips would leak pairs into the other's tiles, so such a layout joins as its exact token mask.
        if self._rule_reaches_skipped_tiles():
            return from_dense_mask(self.to_dense(), self.block_size) | other
        if other._rule_reaches_skipped_tiles():
            return self | from_dense_mask(other.to_dense(), other.block_size)
        a, b = self.blocks, other.blocks
        if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(f"layouts with {a.shape[0]} and {b.shape[0]} heads do not combine")
        state = _classify((a == FULL) | (b == FULL), (a != SKIP) | (b != SKIP))
        masks = [m for m in (self.token_mask, other.token_mask) if m is not None]
        token_mask = None if not masks else (masks[0] if len(masks) == 1 else masks[0] | masks[1])
        return BlockSparseLayout(state, self.block_size, self.seqlen, max(self.window, other.window),
                                 max(self.num_global, other.num_global), token_mask)


# --------------------------------------------------------------------------- constructors
def sliding_window(seqlen: int, window: int, block_size: int = 64) -> BlockSparseLayout:
    """Each token attends to tokens at most ``window`` positions away (symmetric)."""
    _check_sizes(seqlen, block_size)
    _check_int("window", window, 0)
    window = min(window, seqlen - 1)  # as BlockSparseLayout clamps it: a larger window means the same
    first, last = _block_bounds(seqlen, block_size)
    q0, q1, k0, k1 = first[:, None], last[:, None], first[None, :], last[None, :]
    nearest = torch.clamp(torch.maximum(k0 - q1, q0 - k1), min=0)
    farthest = torch.maximum((k1 - q0).abs(), (q1 - k0).abs())
    return BlockSparseLayout(_classify(farthest <= window, nearest <= window)[None], block_size, seqlen, window=window)


def global_tokens(seqlen: int, num_global: int, block_size: int = 64) -> BlockSparseLayout:
    """The first ``num_global`` tokens (e.g. [CLS]) attend to and are attended by everything."""
    _check_sizes(seqlen, block_size)
    _check_int("num_global", num_global, 0)
    num_global = min(num_global, seqlen)  # as BlockSparseLayout clamps it: more than seqlen means the same
    first, last = _block_bounds(seqlen, block_size)
    full = (last[:, None] < num_global) | (last[None, :] < num_global)
    some = (first[:, None] < num_global) | (first[None, :] < num_global)
    return BlockSparseLayout(_classify(full, some)[None], block_size, seqlen, num_global=num_global)


def random_blocks(seqlen: int, blocks_per_row: int, block_size: int = 64, num_heads: int = 1,
                  seed: int = 0) -> BlockSparseLayout:
    """BigBird-style: each query block attends ``blocks_per_row`` random key blocks, drawn per head."""
    nb = _check_sizes(seqlen, block_size)
    _check_int("blocks_per_row", blocks_per_row, 0)
    _check_int("num_heads", num_heads, 1)
    # torch.Generator.manual_seed would take a bool as 0/1, fail on a float with a RuntimeError and on
    # a seed past 64 bits with "Overflow when unpacking long long".
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(num_heads, nb, nb, generator=gen)
    chosen = scores.argsort(dim=-1)[..., : min(blocks_per_row, nb)]
    keep = torch.zeros(num_heads, nb, nb, dtype=torch.bool).scatter_(-1, chosen, True)
    return BlockSparseLayout(_classify(keep, keep), block_size, seqlen)


def dilated(seqlen: int, num_blocks: int, dilation: int, block_size: int = 64) -> BlockSparseLayout:
    """Key blocks at block distance 0, d, 2d, ... up to ``num_blocks * d`` on each side."""
    nb = _check_sizes(seqlen, block_size)
    _check_int("num_blocks", num_blocks, 0)
    _check_int("dilation", dilation, 1)
    dist = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs()
    # Distances are below nb: clamped to nb, a larger dilation or reach keeps the same blocks and
    # fits torch's int64 (dilated(S, 10**30, 1) is every block, not an OverflowError).
    keep = (dist % min(dilation, nb) == 0) & (dist <= min(num_blocks * dilation, nb))
    return BlockSparseLayout(_classify(keep, keep)[None], block_size, seqlen)


def from_dense_mask(mask: Tensor, block_size: int = 64) -> BlockSparseLayout:
    """Any token-level (H or 1, S, S) or (S, S) boolean mask; tiles it touches become partial or full."""
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 3) or mask.shape[-1] != mask.shape[-2] \
            or mask.dtype != torch.bool or mask.numel() == 0:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a non-empty bool (H, S, S) or (S, S) tensor, got {got}")
    if mask.dim() == 2:
        mask = mask[None]
    heads, seqlen = mask.shape[0], mask.shape[1]
    nb = _check_sizes(seqlen, block_size)
    pad = nb * block_size - seqlen
    # Pad with True for "all" and False for "any" so the short last block is judged on real tokens.
    tiles = lambda m: m.reshape(heads, nb, block_size, nb, block_size).transpose(2, 3).flatten(-2)
    full = tiles(torch.nn.functional.pad(mask, (0, pad, 0, pad), value=True)).all(-1)
    some = tiles(torch.nn.functional.pad(mask, (0, pad, 0, pad), value=False)).any(-1)
    return BlockSparseLayout(_classify(full, some), block_size, seqlen, token_mask=mask.clone())
