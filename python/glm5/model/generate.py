"""Generation: prefill + incremental decode on a packed latent KV cache, exact log-probabilities,
and MTP speculative decoding.

    results = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)
    results[0].tokens      # new token ids (ints); a stop token, when one ends the sequence, is the last one
    results[0].logprobs    # log-probability of each token under the distribution it was drawn from
    model.generate(prompts, 64, speculative=True)   # greedy, drafted by the MTP block, same tokens

Decoding. The prompts are prefilled together (packed: one forward over all prompt tokens), then each
step feeds every unfinished sequence's last token in one forward, so projections and the MoE run on
the batch. Every layer's cache (cache.PackedKVCache) holds the latent [c | k_rope] (C values per token,
576 in GLM-5) and, on layers with their own indexer, the indexer key (J values); the attention runs
the model's own path on it (by default "sparse": indexer_topk over the cached indexer keys, then
sparse_mla of the absorbed query over its top-k cached latents). A decode step's logits equal those of
a full forward over the same tokens, up to rounding (tests/model/test_generate.py).

Sampling (per step, on fp32 logits):
- temperature == 0: greedy (argmax, the first index on ties); logprob = log_softmax(logits)[token].
- temperature > 0: p = softmax(logits / temperature); with top_p < 1 the smallest set of most likely
  tokens whose mass reaches top_p is kept (at least one token) and renormalised; the token is drawn
  by inverse CDF over that set, and logprob = log of its renormalised probability: exactly the
  distribution it was drawn from.
- Randomness: prompt b draws from its own torch.Generator, seeded with seed + b when seed is an int,
  with seeds drawn from `seed` when it is a torch.Generator, and from torch's global RNG when it is
  None. A prompt's draws therefore do not depend on the other prompts of the batch.
- stop: token ids that end a sequence; the stop token is included in `.tokens` (and its logprob in
  `.logprobs`), finish_reason "stop". Otherwise a sequence ends after max_new_tokens ("length").

Speculative decoding (greedy only): the MTP block drafts `speculative` tokens (default
config.mtp_steps), the main model verifies them in one forward over [last token, drafts], the
longest prefix equal to the main model's own greedy choices is accepted plus the main model's next
token (so every step emits 1..n_draft+1 tokens), and the caches are rolled back past the rejected
drafts. The tokens are those of plain greedy decoding. The drafts follow the training-time MTP
recursion exactly (mtp.py, Megatron's MTP): depth k at position t reads h^{k-1}_t and the token
x_{t+k}, attending causally over depth k's own keys, so each depth keeps its own one-layer cache. Depth
k's cached rows need x_{t+k}, so depth k commits positions up to P-k (P = tokens processed by the main
model) and recomputes its last k-1 positions, which depend on the drafts, every step. GLM-5.2's
index_share_for_mtp_iteration (depths after the first reuse depth 1's top-k) is honoured.
Each result's `accept_lengths` lists the tokens emitted per verify step before stop/length
truncation (accepted drafts + 1, GLM-5's "accept length"), and `drafts` the drafted tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .cache import PackedKVCache

__all__ = ["GenerationResult", "generate", "sample", "make_generators", "mean_accept_length"]


@dataclass
class GenerationResult:
    """One prompt's continuation."""

    tokens: list[int]  # new token ids (a stop token that ended the sequence is the last one)
    logprobs: list[float]  # log-probability of each token under the distribution it was drawn from
    finish_reason: str = "length"  # "stop" (a stop token was generated) or "length" (max_new_tokens)
    logits: torch.Tensor | None = None  # [len(tokens), vocab] fp32 raw logits of each step (return_logits=True)
    accept_lengths: list[int] = field(default_factory=list)  # speculative: tokens per verify step (accepted + 1)
    drafts: list[list[int]] = field(default_factory=list)  # speculative: the drafted tokens of each verify step

    @property
    def mean_accept_length(self) -> float | None:
        """Mean tokens per verify step (speculative decoding; None otherwise)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else None


def mean_accept_length(results: Iterable[GenerationResult]) -> float | None:
    """Mean tokens per verify step over every step of every result (None without speculative steps)."""
    lengths = [a for r in results for a in r.accept_lengths]
    return sum(lengths) / len(lengths) if lengths else None


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def make_generators(n: int, seed: int | torch.Generator | None) -> list[torch.Generator]:
    """One CPU generator per prompt: seeded seed + b (int seed), or with seeds drawn from `seed`
    (a torch.Generator) or from torch's global RNG (None)."""
    if isinstance(seed, torch.Generator):
        seeds = torch.randint(0, 2**62, (n,), generator=seed, device=seed.device).tolist()
    elif seed is None:
        seeds = torch.randint(0, 2**62, (n,)).tolist()
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed + b for b in range(n)]
    else:
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sample(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row: (tokens [B] int64, logprobs [B] fp32), see the module doc.

    generators: one per row (needed when temperature > 0).
    """
    logits = logits_BV.float()
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        return tok, torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling with temperature > 0 needs one generator per row")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp_sorted, order = logp.sort(dim=-1, descending=True, stable=True)
    cum = lp_sorted.double().exp().cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    if top_p < 1.0:
        keep = (cum - lp_sorted.double().exp()) < top_p  # a prefix: the mass before a kept token is < top_p
        n_keep = keep.sum(dim=-1, keepdim=True)  # >= 1: the first token has 0 mass before it
        log_mass = torch.logsumexp(lp_sorted.masked_fill(~keep, float("-inf")), dim=-1, keepdim=True)
        mass = cum.gather(1, n_keep - 1)
    else:
        n_keep = torch.full_like(u[:, None], logp.shape[1], dtype=torch.long)
        log_mass = torch.zeros_like(lp_sorted[:, :1])
        mass = cum[:, -1:]
    j = torch.searchsorted(cum, u[:, None] * mass, right=True)  # first index whose cumulative mass exceeds u
    j = torch.minimum(j, n_keep - 1)
    return order.gather(1, j)[:, 0], (lp_sorted.gather(1, j) - log_mass)[:, 0]


# ---------------------------------------------------------------------------------------------------
# Forward passes on the cache
# ---------------------------------------------------------------------------------------------------


def _main_forward(model, cache: PackedKVCache, seqs: list[int], tokens: list[list[int]], mode: str) -> torch.Tensor:
    """Final-normed hidden states [T, D] of the packed new tokens (tokens[i] continue sequence seqs[i])."""
    positions, ks, ke = cache.begin(seqs, [len(t) for t in tokens])
    ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=model.device)
    cos, sin = model.rope(positions)
    h, _ = model.model(model.model.embed_tokens(ids), cos, sin, ks, ke, mode=mode, cache=cache)
    return h


def _last_rows(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0) - 1


class _Progress:
    def __init__(self, total: int, enable: bool | Callable[[int], None]):
        self.bar, self.fn = None, None
        if callable(enable):
            self.fn = enable
        elif enable:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="generate", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        if self.fn is not None:
            self.fn(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Outputs:
    """Per-prompt results and the stop / length rules."""

    def __init__(self, n: int, max_new: int, stop: set[int], keep_logits: bool, progress: _Progress):
        self.results = [GenerationResult([], []) for _ in range(n)]
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.max_new, self.stop, self.keep_logits, self.progress = max_new, stop, keep_logits, progress

    def emit(self, b: int, tokens: list[int], logprobs: list[float], logits: torch.Tensor | None) -> bool:
        """Append tokens (in order) to result b, cut at a stop token or the length; True when b is done."""
        r = self.results[b]
        done = False
        n = 0
        for t in tokens:
            n += 1
            if t in self.stop:
                r.finish_reason, done = "stop", True
                break
            if len(r.tokens) + n == self.max_new:
                done = True
                break
        r.tokens.extend(tokens[:n])
        r.logprobs.extend(logprobs[:n])
        if self.keep_logits and logits is not None:
            self.logits[b].append(logits[:n].float().cpu())
        self.progress.update(n)
        return done

    def finish(self) -> list[GenerationResult]:
        if self.keep_logits:
            for r, rows in zip(self.results, self.logits):
                r.logits = torch.cat(rows) if rows else torch.empty(0)
        return self.results


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------


def _check_args(model, prompts, max_new_tokens, temperature, top_p) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or (prompts and isinstance(prompts[0], int)):
        raise TypeError("prompts must be a list of token-id lists (one list per prompt)")
    out = []
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty: generation continues a prompt of at least one token")
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={V}): min {min(ids)}, max {max(ids)}")
        out.append(ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return out


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Iterable[int] | None = None,
    seed: int | torch.Generator | None = None,
    *,
    speculative: bool | int = False,
    return_logits: bool = False,
    progress: bool | Callable[[int], None] = False,
    attn_mode: str | None = None,
) -> list[GenerationResult]:
    """Continue each prompt with up to max_new_tokens tokens; one GenerationResult per prompt.

    Args:
        model: a GLM5ForCausalLM (any dtype/device; it is not modified, its mode is not changed).
        prompts: token-id lists (ints or 1-D tensors), any lengths >= 1, batched together.
        temperature, top_p, seed: the sampling rule (module doc); temperature 0 is greedy (top_p unused).
        stop: token ids that end a sequence (included in .tokens). None: no stop tokens (pass
            model.config.eos_token_id explicitly to stop at end-of-text).
        speculative: MTP speculative decoding with this many drafts per step (True: config.mtp_steps);
            greedy only, needs the model's MTP block.
        return_logits: also return each step's raw fp32 logits as result.logits [n, vocab].
        progress: True for a tqdm bar over the generated tokens, or a callable taking the count of
            tokens emitted in each step.
        attn_mode: one of attention.ATTN_MODES (default model.attn_mode, "sparse").
    """
    prompts = _check_args(model, prompts, max_new_tokens, temperature, top_p)
    mode = attn_mode or model.attn_mode
    stopset = set() if stop is None else ({int(stop)} if isinstance(stop, int) else {int(t) for t in stop})
    n_draft = 0
    if speculative:
        n_draft = model.config.mtp_steps if speculative is True else int(speculative)
        if model.mtp is None or n_draft < 1:
            raise ValueError("speculative decoding needs the model's MTP block (num_nextn_predict_layers=1) "
                             f"and at least one draft step, got mtp={model.mtp is not None}, drafts={n_draft}")
        if temperature != 0:
            raise ValueError("speculative decoding is greedy only: pass temperature=0")
    bar = _Progress(len(prompts) * max_new_tokens, progress)
    outs = _Outputs(len(prompts), max_new_tokens, stopset, return_logits, bar)
    try:
        if max_new_tokens > 0 and prompts:
            with torch.no_grad():
                if n_draft:
                    _speculative(model, prompts, outs, n_draft, mode)
                else:
                    gens = make_generators(len(prompts), seed) if temperature > 0 else None
                    _plain(model, prompts, outs, temperature, top_p, gens, mode)
    finally:
        bar.close()
    return outs.finish()


def _plain(model, prompts, outs: _Outputs, temperature, top_p, gens, mode) -> None:
    B = len(prompts)
    cache = PackedKVCache.for_model(model, B, max(len(p) for p in prompts) + outs.max_new)
    active = list(range(B))
    feed = prompts
    while active:
        h = _main_forward(model, cache, active, feed, mode)
        logits = model.lm_head(h[_last_rows([len(f) for f in feed], h.device)]).float()
        tok, lp = sample(logits, temperature, top_p, None if gens is None else [gens[b] for b in active])
        tok, lp = tok.tolist(), lp.tolist()
        nxt = []
        for i, b in enumerate(active):
            if not outs.emit(b, [tok[i]], [lp[i]], logits[i : i + 1]):
                nxt.append(b)
        active = nxt
        feed = [[outs.results[b].tokens[-1]] for b in active]


def _speculative(model, prompts, outs: _Outputs, n_draft: int, mode) -> None:
    """Greedy decoding drafted by the MTP block (module doc). Per sequence b:
    P[b]: tokens the main model has processed (its cache length); seq[b] = prompt + emitted tokens,
    P[b] + 1 long (the last one is the pending token x_P, not yet processed).
    c[k][b]: positions depth k has committed (its cache length between steps), max(0, P - k + 1).
    fresh[b]: depth k-1's hidden rows computed this step, positions [c[k-1][b], P[b]) (depth 0: the main
    model's); carry[k-1][b]: depth k-1's committed rows at positions [c[k][b], c[k-1][b]) from earlier steps.
    """
    cfg = model.config
    B = len(prompts)
    cap = max(len(p) for p in prompts) + outs.max_new + n_draft
    main = PackedKVCache.for_model(model, B, cap)
    depth = [PackedKVCache.for_mtp(model, B, cap) for _ in range(n_draft)]
    share = cfg.index_share_for_mtp_iteration and n_draft > 1
    topk1: torch.Tensor | None = None  # depth 1's top-k of every cached row (index sharing only)
    emb, head = model.model.embed_tokens, model.lm_head
    seq = [list(p) for p in prompts]
    P = [len(p) for p in prompts]
    c = [[0] * B for _ in range(n_draft + 1)]
    carry: list[list[torch.Tensor | None]] = [[None] * B for _ in range(n_draft)]

    # Prefill: the first token comes from the main model alone.
    active = list(range(B))
    h = _main_forward(model, main, active, prompts, mode)
    logits = head(h[_last_rows(P, h.device)]).float()
    tok, lp = sample(logits, 0.0, 1.0)
    fresh = dict(zip(active, h.split(P)))
    nxt = []
    for i, b in enumerate(active):
        seq[b].append(int(tok[i]))
        if not outs.emit(b, [int(tok[i])], [float(lp[i])], logits[i : i + 1]):
            nxt.append(b)
    active = nxt

    while active:
        # ---- draft: depth k catches up its committed rows and computes the draft-dependent ones
        drafts: dict[int, list[int]] = {b: [] for b in active}
        for k in range(1, n_draft + 1):
            rows, ids, counts = [], [], []
            for b in active:
                start = c[k][b]
                r = fresh[b] if carry[k - 1][b] is None else torch.cat([carry[k - 1][b], fresh[b]])
                assert r.shape[0] == P[b] - start, (k, b, r.shape[0], P[b], start)
                rows.append(r)
                # x_{s+k}: committed while s + k <= P, else the (s+k-P)-th draft
                ids.extend(seq[b][s + k] if s + k <= P[b] else drafts[b][s + k - P[b] - 1] for s in range(start, P[b]))
                counts.append(P[b] - start)
            cache = depth[k - 1]
            positions, ks, ke = cache.begin(active, counts)
            cos, sin = model.rope(positions)
            prev = None
            if share and k > 1:
                prev = topk1[ke.long() - 1]
            hk, topk, _ = model.mtp.step(torch.cat(rows), emb(torch.tensor(ids, device=model.device)), cos, sin, ks, ke,
                                         mode=mode, cache=cache, prev_topk_TK=prev)
            if share and k == 1:
                if topk1 is None:
                    topk1 = torch.full((B * cap, topk.shape[1]), -1, dtype=topk.dtype, device=topk.device)
                topk1[ke.long() - 1] = topk
            d = head(hk[_last_rows(counts, hk.device)]).argmax(dim=-1).tolist()
            new_fresh = dict(zip(active, hk.split(counts)))
            for i, b in enumerate(active):
                drafts[b].append(d[i])
                old, ck = c[k][b], max(0, P[b] - k + 1)
                ck_prev = P[b] if k == 1 else max(0, P[b] - k + 2)  # depth k-1's committed length after this step
                carry[k - 1][b] = rows[i][ck - old : ck_prev - old]
                c[k][b] = ck
                cache.truncate(b, ck)
            fresh = new_fresh

        # ---- verify: the main model over [x_P, d_1..d_n] in one forward
        feed = [[seq[b][P[b]]] + drafts[b] for b in active]
        h = _main_forward(model, main, active, feed, mode)
        logits = head(h).float()
        g = logits.argmax(dim=-1)
        lp = torch.log_softmax(logits, dim=-1).gather(1, g[:, None])[:, 0]
        g, lp = g.tolist(), lp.tolist()
        nxt, fresh = [], {}
        for i, b in enumerate(active):
            r0 = i * (n_draft + 1)
            gb = g[r0 : r0 + n_draft + 1]
            a = 0
            while a < n_draft and drafts[b][a] == gb[a]:
                a += 1
            res = outs.results[b]
            res.accept_lengths.append(a + 1)
            res.drafts.append(drafts[b])
            main.truncate(b, P[b] + a + 1)
            fresh[b] = h[r0 : r0 + a + 1]
            P[b] += a + 1
            seq[b].extend(gb[: a + 1])
            if not outs.emit(b, gb[: a + 1], lp[r0 : r0 + a + 1], logits[r0 : r0 + a + 1]):
                nxt.append(b)
        active = nxt
