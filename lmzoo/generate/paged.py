"""The paged KV cache: a pool of fixed-size blocks and, per sequence, a block table (vLLM's PagedAttention
layout, gathered on the CPU).

Every layer's keys and values live in one pool of ``num_blocks · block_size`` token slots, shaped
(slots, H, D) per layer; slot = block · block_size + offset. A sequence owns the blocks its table lists;
its token t sits in slot ``table[t // bs] · bs + t % bs``. Nothing is preallocated per request, so the
memory a request holds is its length rounded up to a block (waste < one block per sequence).

``BatchView`` is how a model reads the pool: to the model it is an ordinary cache (``length``,
``update``, ``commit``), laid out as a *left-padded* batch — row i's p_i cached tokens right-aligned
before the step's new tokens, pads masked by the attention mask — so every causal family's forward runs
unchanged (positions come from the mask, as for any left-padded batch). ``update`` writes each row's real
new K/V into its blocks and returns (B, H, max p + T, D): the gathered past followed by the new tokens.
The K/V pair is whatever the layer caches: K and V (MHA/GQA/MQA), or MLA's latent c_KV and shared RoPE key
(DeepSeek-V2, one "head"), read off the model's own ``new_cache`` so no family is named here.

Prefix caching: a full block is keyed by a hash of its tokens and of every token before it; a new
sequence whose prompt starts with the same full blocks shares them (reference counted) instead of
computing them. A freed block keeps its key until it is reused for other tokens (least recently freed
first), so a later request with the same prefix still finds it.
"""

from __future__ import annotations

from collections import deque

import torch

from lmzoo.errors import LmzooError
from lmzoo.nn.kv_cache import EncoderDecoderCache, KVCache, LatentCache


def _self_cache(model):
    """The per-layer cache the pool mirrors: the model's own, or an encoder-decoder's self-attention part
    (when its cross-attention K/V have the same heads and head size, so they fit the same slots)."""
    probe = model.new_cache(1, 1)
    if isinstance(probe, EncoderDecoderCache):
        k = probe.self_attn.k[0]
        same = all(layer.cross_attn.n_kv_heads == k.shape[1] and layer.cross_attn.head_dim == k.shape[3]
                   for layer in model.decoder_layers)
        return probe.self_attn if same and type(probe.self_attn) is KVCache else None
    return probe if type(probe) in (KVCache, LatentCache) else None


def pageable(model) -> bool:
    """True when the model's cache is one the pool can hold: K/V or MLA latents per layer (every causal
    decoder), or an encoder-decoder's self-attention K/V plus its cross-attention K/V; not a cache with
    per-row state (the prefix decoder's)."""
    return hasattr(model, "new_cache") and _self_cache(model) is not None


class BlockPool:
    """K/V slots for ``num_blocks`` blocks of ``block_size`` tokens, every layer; one extra zero slot at the
    end pads gathers. Blocks are handed out, shared and freed by reference count."""

    def __init__(self, model, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise LmzooError(f"the paged cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        probe = _self_cache(model)  # the layer's own cache tells the (H, D) of what it stores
        if probe is None:
            raise LmzooError(f"{type(model).__name__} keeps a {type(model.new_cache(1, 1)).__name__}, which holds "
                             "per-row state the paged cache does not (the prefix decoder's)")
        slots = num_blocks * block_size + 1
        self.k = [torch.zeros(slots, t.shape[1], t.shape[3], dtype=t.dtype, device=t.device) for t in probe.k]
        self.v = [torch.zeros(slots, t.shape[1], t.shape[3], dtype=t.dtype, device=t.device) for t in probe.v]
        self.num_blocks, self.block_size, self.pad_slot = num_blocks, block_size, slots - 1
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # least recently freed first
        self.key_of: dict[int, int] = {}  # block -> prefix key, for full blocks with known tokens
        self.block_of: dict[int, int] = {}  # prefix key -> block
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (a hash match is checked)

    # -- accounting -----------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def bytes_per_block(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.k + self.v) * self.block_size

    def can_allocate(self, n: int) -> bool:
        return len(self.free) >= n

    # -- blocks ---------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A fresh block (ref 1); the oldest freed one, whose prefix key is forgotten."""
        if not self.free:
            raise LmzooError("the paged KV cache has no free block")
        b = self.free.popleft()
        self._forget(b)
        self.ref[b] = 1
        return b

    def share(self, b: int) -> None:
        if self.ref[b] == 0:  # cached but free: take it back out of the free list
            self.free.remove(b)
        self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # the tail of a sequence is freed first, so its head stays cached longest
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)

    # -- prefix caching ---------------------------------------------------------------------------
    @staticmethod
    def key(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def lookup(self, key: int, tokens: tuple[int, ...]) -> int | None:
        b = self.block_of.get(key)
        return b if b is not None and self.tokens_of.get(b) == tokens else None

    def register(self, b: int, key: int, tokens: tuple[int, ...]) -> None:
        """``b`` is full with ``tokens`` after the prefix ``key`` stands for: findable from now on."""
        if self.key_of.get(b) == key:
            return
        self._forget(b)
        if key in self.block_of:  # another block holds the same tokens: keep the first
            return
        self.key_of[b], self.block_of[key], self.tokens_of[b] = key, b, tokens

    def _forget(self, b: int) -> None:
        key = self.key_of.pop(b, None)
        self.tokens_of.pop(b, None)
        if key is not None and self.block_of.get(key) == b:
            del self.block_of[key]

    # -- slots ------------------------------------------------------------------------------------
    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[t // bs] * bs + t % bs for t in range(start, end)]


class BatchView:
    """One forward's view of the pool (see the module docstring). ``rows`` are (block table, p, n): p
    tokens cached, n new ones this step (right-aligned in the (B, T) input). The caller builds the
    matching attention mask with ``attention_mask()``."""

    def __init__(self, pool: BlockPool, rows: list[tuple[list[int], int, int]]):
        self.pool = pool
        self.length = max(p for _, p, _ in rows)  # Lp: the left-padded past every row is aligned to
        self.T = max(n for _, _, n in rows)
        device = pool.k[0].device
        past, write, src_row, src_col = [], [], [], []
        for i, (table, p, n) in enumerate(rows):
            past.append([pool.pad_slot] * (self.length - p) + pool.slots(table, 0, p))
            write += pool.slots(table, p, p + n)
            src_row += [i] * n
            src_col += range(self.T - n, self.T)
        self.past = torch.tensor(past, dtype=torch.long, device=device)  # (B, Lp) slots, pads -> the zero slot
        self.write = torch.tensor(write, dtype=torch.long, device=device)  # (N,) slots of the new tokens
        self.src = (torch.tensor(src_row, dtype=torch.long, device=device),
                    torch.tensor(src_col, dtype=torch.long, device=device))  # where they sit in the input
        self.rows = rows

    def attention_mask(self) -> torch.Tensor:
        """(B, Lp + T): 1 on each row's cached and new tokens, 0 on the pads before each."""
        rows = [[0] * (self.length - p) + [1] * p + [0] * (self.T - n) + [1] * n for _, p, n in self.rows]
        return torch.tensor(rows, dtype=torch.long, device=self.past.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the (B, H, T, D) new keys/values of real tokens into their slots; return the gathered past
        followed by the new ones, (B, H, Lp + T, D)."""
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        rows, cols = self.src
        pk[self.write] = k[rows, :, cols].to(pk.dtype)  # (N, H, D)
        pv[self.write] = v[rows, :, cols].to(pv.dtype)
        past_k = pk[self.past].transpose(1, 2)  # (B, Lp, H, D) -> (B, H, Lp, D)
        past_v = pv[self.past].transpose(1, 2)
        return torch.cat([past_k.to(k.dtype), k], dim=2), torch.cat([past_v.to(v.dtype), v], dim=2)

    def commit(self) -> None:
        """Lengths live in the engine's sequences; nothing to do here."""


class EncoderDecoderView:
    """An encoder-decoder's view of the pool for one forward: the decoder's self-attention through a
    ``BatchView``, and each layer's cross-attention K/V gathered from the blocks that hold the row's
    encoded source (``cross_tables``: (block table, source length) per row), right-padded to the longest
    source with the zero slot and masked by ``encoder_mask``. The model reads ``cross`` /
    ``encoder_mask`` as it reads an ``EncoderDecoderCache`` whose cross K/V were filled."""

    def __init__(self, self_attn: BatchView, cross_tables: list[tuple[list[int], int]]):
        pool = self_attn.pool
        self.self_attn = self_attn
        S = max(n for _, n in cross_tables)
        idx = torch.tensor([pool.slots(t, 0, n) + [pool.pad_slot] * (S - n) for t, n in cross_tables],
                           dtype=torch.long, device=self_attn.past.device)  # (B, S)
        self.cross = [(pool.k[i][idx].transpose(1, 2), pool.v[i][idx].transpose(1, 2))
                      for i in range(len(pool.k))]  # per layer (B, H, S, D)
        mask = torch.tensor([[1] * n + [0] * (S - n) for _, n in cross_tables], device=idx.device)
        self.encoder_mask = None if bool(mask.all()) else mask  # (B, S)

    @property
    def length(self) -> int:
        return self.self_attn.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.self_attn.update(layer, k, v)

    def commit(self) -> None:
        self.self_attn.commit()


def write_cross(pool: BlockPool, model, sources: list[list[int]], tables: list[list[int]]) -> None:
    """Encode ``sources`` (one right-padded batch) and write every layer's cross-attention K/V of each into
    the slots of its block table: computed once per request, read at every decoding step."""
    device = pool.k[0].device
    S = max(map(len, sources))
    ids = torch.tensor([x + [0] * (S - len(x)) for x in sources], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (S - len(x)) for x in sources], device=device)
    memory = model.encode(ids, None if bool(mask.all()) else mask)  # (F, S, D)
    rows = torch.tensor([i for i, x in enumerate(sources) for _ in x], device=device)
    cols = torch.tensor([j for x in sources for j in range(len(x))], device=device)
    slots = torch.tensor([s for x, t in zip(sources, tables) for s in pool.slots(t, 0, len(x))], device=device)
    for i, layer in enumerate(model.decoder_layers):
        k, v = layer.cross_attn.memory_kv(memory)  # (F, H, S, D)
        pool.k[i][slots] = k[rows, :, cols].to(pool.k[i].dtype)
        pool.v[i][slots] = v[rows, :, cols].to(pool.v[i].dtype)
