"""The continuous-batching engine: requests join and leave between steps, over the paged KV cache.

    eng = Engine(model, block_size=16, max_batch=32, max_batched_tokens=512)
    rid = eng.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    while eng.has_unfinished():
        for out in eng.step(): ...        # RequestOutput: new tokens, finished, finish_reason

The scheduler (nano-vllm's, in spirit) keeps a waiting queue and a running list. Each ``step`` is one
forward of one of two kinds:

- **prefill**: the running sequences still short of their last prompt token, then waiting requests
  (oldest first) while the batch has room (``max_batch`` sequences) and the token budget
  (``max_batched_tokens``) lasts; a prompt longer than the budget is computed in chunks over several
  steps (chunked prefill). A chunk that reaches the end of its prompt samples the first new token.
- **decode**: one token for every running sequence.

A sequence that finishes (a stop token, ``max_tokens``, the model's context, ``abort``) frees its blocks
at once, and the next prefill step gives its slot to the next request. When a decode step needs a block
and none is free, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the waiting queue, to be recomputed from its prompt and the tokens it had generated (vLLM's
recompute preemption); its output continues where it stopped.

Each request samples with its own ``SamplingParams`` and its own generator (seeded by ``seed``), so a
seeded request draws the same tokens alone or in any batch, and greedy requests equal
``lmzoo.generate`` run on each alone (tests/generate/test_continuous.py). Every causal family (the K/V the
pool stores is read off the model's own cache: MLA's latents too) and T5 (the encoder-decoder: its
source is encoded once, at admission, and each layer's cross-attention K/V go into blocks of the same
pool, gathered at every step with the encoder's padding mask); the prefix decoder (ChatGLM-6B) keeps
per-row cache state and is refused with one line (``lmzoo.generate`` runs it on its own loop).
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.generate.paged import BatchView, BlockPool, EncoderDecoderView, write_cross
from lmzoo.generate.requests import RequestOutput, SamplingParams, checked_prompt, is_sharded, model_eos
from lmzoo.generate.sampling import LogitsProcessor, process_logits

KV_BUDGET_BYTES = 2 << 30  # the default pool is at most this large (max_batch full contexts if smaller)


def blocks_needed(prompt_len: int, max_tokens: int, block_size: int, enc_dec: bool = False) -> int:
    """Blocks one request holds at its longest: prompt + max_tokens tokens; for an encoder-decoder, its
    source's cross-attention K/V in whole blocks of their own, then 1 + max_tokens decoder tokens."""
    if enc_dec:
        return -(-prompt_len // block_size) + -(-(1 + max_tokens) // block_size)
    return -(-(prompt_len + max_tokens) // block_size)


@dataclass(eq=False)
class Sequence:
    rid: str
    prompt: list[int]
    params: SamplingParams
    stops: frozenset[int]
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the blocks
    cached: int = 0  # prompt tokens found in the prefix cache at admission
    keys: list[int] = field(default_factory=list)  # prefix keys of its full blocks, in order
    finish_reason: str | None = None
    new: list[int] = field(default_factory=list)  # tokens added this step, reported by step()
    new_logprobs: list[float] = field(default_factory=list)
    new_logits: list[torch.Tensor] = field(default_factory=list)
    source: list[int] | None = None  # an encoder-decoder's input (``prompt`` is then its decoder start token)
    cross_blocks: list[int] = field(default_factory=list)  # the blocks holding the source's cross K/V
    encoded: bool = False  # those blocks are filled

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def remaining(self) -> int:
        """Tokens still to be fed before the next one can be sampled."""
        return len(self.prompt) + len(self.output) - self.computed


class Engine:
    """Continuous batching over ``model`` (a causal decoder in eval mode). ``num_blocks`` None: enough
    blocks for ``max_batch`` sequences of the full context, at most ``KV_BUDGET_BYTES``. ``context_length``
    None: the model's ``max_positions`` (4096 when it names none). ``keep_logits``: every output token also
    comes with the raw (V,) float32 logits it was chosen from (``RequestOutput.new_logits``; RL rollouts
    record their log-probabilities from them). An encoder-decoder (T5) takes the encoder's input as the
    prompt: its cross-attention K/V are computed once, at admission, into blocks of the same pool, and
    the decoder starts from ``decoder_start_token_id`` (None: the model's)."""

    def __init__(self, model: nn.Module, *, block_size: int = 16, num_blocks: int | None = None, max_batch: int = 32,
                 max_batched_tokens: int = 512, prefix_caching: bool = True, context_length: int | None = None,
                 keep_logits: bool = False, decoder_start_token_id: int | None = None):
        if not hasattr(model, "new_cache"):
            raise LmzooError(f"the continuous-batching engine runs decoders; {type(model).__name__} has no next-token "
                             "head or cache")
        self.enc_dec = bool(getattr(model, "is_encoder_decoder", False))
        self.start = decoder_start_token_id if decoder_start_token_id is not None else getattr(
            model, "decoder_start_token_id", 0)
        prefix_caching = prefix_caching and not self.enc_dec  # a decoder prefix means nothing without its source
        if max_batch < 1 or max_batched_tokens < 1:
            raise LmzooError(f"max_batch and max_batched_tokens must be >= 1, got {max_batch}, {max_batched_tokens}")
        model.eval()  # (a view of a sharded root returns its inner module from eval(): keep the view)
        self.model = model
        self.context_length = int(context_length or getattr(model.config, "max_positions", None) or 4096)
        self.keep_logits = keep_logits
        # a sharded model decodes under no_grad: its gathered-parameter buffers are reused by training
        self._mode = torch.no_grad if is_sharded(model) else torch.inference_mode
        if num_blocks is None:
            per_block = BlockPool(model, 1, block_size).bytes_per_block
            want = max_batch * -(-self.context_length // block_size)
            num_blocks = max(1, min(want, KV_BUDGET_BYTES // max(1, per_block)))
        self.pool = BlockPool(model, num_blocks, block_size)
        self.max_batch, self.max_batched_tokens, self.prefix_caching = max_batch, max_batched_tokens, prefix_caching
        self.eos = model_eos(model)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self._finished: list[Sequence] = []  # aborted between steps, reported by the next step
        self._ids = itertools.count()
        self._seeds = random.Random(0)
        self.counters = {"prefill_steps": 0, "decode_steps": 0, "preemptions": 0, "prefix_cache_hits": 0,
                         "generated_tokens": 0}

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = checked_prompt(prompt_ids, params, self.context_length, self.model.config.vocab_size)
        bs, room = self.pool.block_size, self.pool.num_blocks * self.pool.block_size
        if self.enc_dec:  # the source's cross K/V take whole blocks of their own, then the decoder's tokens
            need = blocks_needed(len(prompt), params.max_tokens, bs, enc_dec=True)
            if need > self.pool.num_blocks:
                raise LmzooError(f"a source of {len(prompt)} tokens (its cross-attention K/V) + 1 + max_tokens "
                                 f"{params.max_tokens} decoder tokens need {need} blocks of {bs}; the paged cache "
                                 f"has {self.pool.num_blocks}")
        elif len(prompt) + params.max_tokens > room:  # it could never hold its blocks, even alone
            raise LmzooError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the paged "
                             f"cache's {room} token slots ({self.pool.num_blocks} blocks of {self.pool.block_size})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise LmzooError(f"request id {rid!r} is already in the engine")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        seq = Sequence(rid, prompt, params, stops, gen)
        if self.enc_dec:
            seq.source, seq.prompt = prompt, [self.start]
        self.seqs[rid] = seq
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request now and free its blocks; the next ``step`` reports it finished with ``reason``."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.finish_reason is not None:
            return
        self._finish(seq, reason)
        self._finished.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._finished)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "blocks_used": self.pool.used,
                "blocks_total": self.pool.num_blocks, "block_size": self.pool.block_size,
                "kv_bytes_used": self.pool.used * self.pool.bytes_per_block,
                "tokens_held": sum(s.computed for s in self.running), **self.counters}

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Every prompt to completion (offline batch): the generated ids of each, in order."""
        ps = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        rids = [self.add_request(p, q) for p, q in zip(prompts, ps)]
        done: dict[str, list[int]] = {}
        while self.has_unfinished():
            done.update({o.request_id: o.token_ids for o in self.step() if o.finished})
        return [done[r] for r in rids]

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One prefill or decode forward; what each touched request gained."""
        with self._mode():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch:
            self._forward(batch)
        outs = [self._output(seq) for seq, _ in batch if seq not in self._finished]
        for seq in self._finished:
            outs.append(self._output(seq))
        self._finished = []
        return outs

    def _output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(seq.rid, seq.new, list(seq.output), seq.finish_reason is not None, seq.finish_reason,
                            seq.new_logprobs, len(seq.source or seq.prompt), seq.cached, seq.new_logits)
        seq.new, seq.new_logprobs, seq.new_logits = [], [], []
        if out.finished:
            self.seqs.pop(seq.rid, None)
        return out

    def _schedule_prefill(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) for a prefill step, or [] when nothing waits to be prefilled."""
        budget, batch = self.max_batched_tokens, []
        longest_past = longest_new = 0
        candidates = [s for s in self.running if s.remaining > 1]
        for seq in candidates + list(self.waiting):
            if budget <= 0 or len(batch) >= self.max_batch:
                break
            fresh = seq in self.waiting
            if fresh and len(self.running) >= self.max_batch:  # admitted ones are already running
                break
            if self.enc_dec and batch and (seq.computed or longest_past):
                break  # T5's relative position bias reads columns: a chunk that continues a past goes alone
            if fresh:
                self._reuse_prefix(seq)
            n = min(seq.remaining, budget)
            # the left-padded batch spans max past + max new positions: keep it within the context
            if max(longest_past, seq.computed) + max(longest_new, n) > self.context_length:
                if fresh:
                    self._unreuse(seq)
                break
            need = -(-(seq.computed + n) // self.pool.block_size) - len(seq.blocks)
            cross = -(-len(seq.source) // self.pool.block_size) if seq.source is not None and not seq.encoded else 0
            if not self.pool.can_allocate(need + cross):
                if fresh:
                    self._unreuse(seq)
                break
            seq.blocks += [self.pool.allocate() for _ in range(need)]
            seq.cross_blocks += [self.pool.allocate() for _ in range(cross)]
            budget -= len(seq.source) if cross else 0  # the encoder's work counts against the token budget
            if fresh:
                self.waiting.remove(seq)
                self.running.append(seq)
            batch.append((seq, n))
            budget -= n
            longest_past, longest_new = max(longest_past, seq.computed), max(longest_new, n)
        if batch:
            self.counters["prefill_steps"] += 1
        return batch

    def _schedule_decode(self) -> list[tuple[Sequence, int]]:
        batch = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an earlier one
                continue
            if seq.computed % self.pool.block_size == 0 and seq.computed // self.pool.block_size >= len(seq.blocks):
                while not self.pool.can_allocate(1):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq not in self.running:
                    continue
                seq.blocks.append(self.pool.allocate())
            batch.append((seq, 1))
        if batch:
            self.counters["decode_steps"] += 1
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and send it back to wait; it is recomputed from its tokens later."""
        self.running.remove(seq)
        self.pool.release(seq.blocks + seq.cross_blocks)
        seq.blocks, seq.computed, seq.keys, seq.cross_blocks, seq.encoded = [], 0, [], [], False
        self.waiting.appendleft(seq)
        self.counters["preemptions"] += 1

    # -- prefix cache -------------------------------------------------------------------------------
    def _reuse_prefix(self, seq: Sequence) -> None:
        """Share the cached full blocks the sequence's tokens start with (never its last token: the
        forward must compute at least one position to sample from)."""
        if not self.prefix_caching or seq.blocks:
            return
        bs, toks, parent = self.pool.block_size, seq.tokens, None
        for i in range((len(toks) - 1) // bs):
            chunk = tuple(toks[i * bs:(i + 1) * bs])
            key = self.pool.key(parent, chunk)
            b = self.pool.lookup(key, chunk)
            if b is None:
                break
            self.pool.share(b)
            seq.blocks.append(b)
            seq.keys.append(key)
            parent = key
        seq.computed = len(seq.blocks) * bs
        if not seq.output:
            seq.cached = seq.computed
        self.counters["prefix_cache_hits"] += seq.computed

    def _unreuse(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        self.counters["prefix_cache_hits"] -= seq.computed
        seq.blocks, seq.computed, seq.keys, seq.cached = [], 0, [], 0

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.prefix_caching:
            return
        bs, toks = self.pool.block_size, seq.tokens
        for i in range(len(seq.keys), seq.computed // bs):  # blocks that became full this step
            chunk = tuple(toks[i * bs:(i + 1) * bs])
            key = self.pool.key(seq.keys[-1] if seq.keys else None, chunk)
            self.pool.register(seq.blocks[i], key, chunk)
            seq.keys.append(key)

    # -- the forward --------------------------------------------------------------------------------
    def _forward(self, batch: list[tuple[Sequence, int]]) -> None:
        view = BatchView(self.pool, [(s.blocks, s.computed, n) for s, n in batch])
        T = view.T
        device = view.past.device
        ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # (B, T) new tokens, right-aligned
        for i, (s, n) in enumerate(batch):
            ids[i, T - n:] = torch.tensor(s.tokens[s.computed:s.computed + n], device=device)
        mask = view.attention_mask()
        if self.enc_dec:
            fresh = [s for s, _ in batch if not s.encoded]
            if fresh:
                write_cross(self.pool, self.model, [s.source for s in fresh], [s.cross_blocks for s in fresh])
                for s in fresh:
                    s.encoded = True
            cache = EncoderDecoderView(view, [(s.cross_blocks, len(s.source)) for s, _ in batch])
            logits = self.model(decoder_input_ids=ids, decoder_attention_mask=None if bool(mask.all()) else mask,
                                cache=cache, logits_to_keep=1).logits[:, -1].float()  # (B, V)
        else:
            logits = self.model(ids, attention_mask=None if bool(mask.all()) else mask, cache=view,
                                logits_to_keep=1).logits[:, -1].float()  # (B, V)
        ready = []  # (row, sequence) that reached the end of their tokens: each samples its next one
        for i, (s, n) in enumerate(batch):
            s.computed += n
            self._register_full_blocks(s)
            if s.remaining == 0:
                ready.append((i, s))
        groups: dict[tuple, list[tuple[int, Sequence]]] = {}  # rows with the same settings sample together
        for i, s in ready:
            p = s.params
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty), []).append((i, s))
        for members in groups.values():
            self._sample([s for _, s in members], logits[[i for i, _ in members]])

    def _sample(self, seqs: list[Sequence], raw: torch.Tensor) -> None:
        """The next token of each of ``seqs`` (one sampling setting) from its raw (len(seqs), V) logits: the
        settings applied to the rows together, then each row drawn with its own generator (inverse CDF of
        one uniform), so a seeded request's tokens depend on nothing else in the batch."""
        p = seqs[0].params
        proc = LogitsProcessor(do_sample=not p.greedy, temperature=p.temperature or 1.0,
                               top_k=p.top_k or None, top_p=p.top_p if p.top_p < 1 else None,
                               repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1 else None)
        seen = None
        if proc.repetition_penalty is not None:  # every row's tokens, padded with its own first (gather/scatter
            width = max(len(s.tokens) for s in seqs)  # see a repeated id as the same one)
            seen = torch.tensor([s.tokens + [s.tokens[0]] * (width - len(s.tokens)) for s in seqs], device=raw.device)
        logits = process_logits(raw, seen, proc)  # (R, V)
        if proc.do_sample:
            cum = logits.softmax(-1).cumsum(-1)
            u = torch.cat([torch.rand(1, generator=s.generator, device=raw.device) for s in seqs])
            toks = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).squeeze(1).clamp_(max=cum.shape[1] - 1)
        else:
            toks = logits.argmax(-1)
        want = any(s.params.logprobs for s in seqs)
        lps = torch.log_softmax(logits, -1).gather(1, toks[:, None])[:, 0].tolist() if want else None
        for k, (seq, tok) in enumerate(zip(seqs, toks.tolist())):
            seq.output.append(tok)
            seq.new.append(tok)
            if seq.params.logprobs:
                seq.new_logprobs.append(lps[k])
            if self.keep_logits:
                seq.new_logits.append(raw[k])
            self.counters["generated_tokens"] += 1
            if tok in seq.stops:
                self._finish(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or len(seq.tokens) >= self.context_length:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks + seq.cross_blocks)
        seq.blocks, seq.cross_blocks = [], []
