"""Independent numpy references for every spec under ``examples/``.

``EXAMPLES`` maps a spec's path relative to ``examples/`` (``"causal.attn"``,
``"fusemax/cascade5.attn"``) to an :class:`ExampleRef`.  Nothing here imports
attnc: each reference is the textbook formula written directly in numpy
(``S = Q @ K.T * scale``, a boolean mask, a softmax whose fully masked rows
come out 0), so a wrong interpreter or a wrong spec shows up as a mismatch.

Conventions:

* ``sizes`` dicts name the spec's ranks (``P``, ``M``, ``E``, ``F``, ``H`` ...).
  A lowercase key is a scalar parameter (``window``, ``cap``): the input
  factory passes it on; a parameter left out takes the spec's default, which the
  reference reproduces on its own (``scale=None`` means ``1/sqrt(E)``).
* ``make_inputs(rng, sizes)`` returns core-shaped arrays (no batch dims) in the
  spec's declaration order, plus the keyword parameters.  Every draw is a valid
  input on its own, so the test builds batched inputs by stacking draws.
* ``reference(*arrays, **params)`` broadcasts over leading batch dims like a
  numpy gufunc (everything is written with ``...``/``@``), so it accepts the
  same batched arrays as the generated function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Inputs = tuple[list[np.ndarray], dict[str, float]]
Sizes = dict[str, int | float]  # rank sizes (uppercase) and scalar parameters (lowercase)


@dataclass(frozen=True)
class ExampleRef:
    """How to feed and check one example: its definition, inputs, formula, shapes."""

    definition: str
    make_inputs: Callable[[np.random.Generator, Sizes], Inputs]
    reference: Callable[..., np.ndarray | tuple[np.ndarray, ...]]
    sizes: tuple[Sizes, ...]


# --- shared numpy building blocks ----------------------------------------------


def params_of(sizes: Sizes) -> dict[str, float]:
    """The lowercase keys of a size dict: scalar parameters for the call."""
    return {k: v for k, v in sizes.items() if k.islower()}


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def transpose(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def default_scale(Q: np.ndarray, scale: float | None) -> float:
    return 1.0 / np.sqrt(Q.shape[-1]) if scale is None else scale


def causal_mask(P: int, M: int) -> np.ndarray:
    """``[P, M]``: query p, the last P of M positions, sees keys at or before it."""
    return np.arange(M)[None, :] <= np.arange(P)[:, None] + M - P


def query_key_distance(P: int, M: int) -> np.ndarray:
    """``[P, M]``: position of query p (p + M - P) minus position of key m."""
    return np.arange(P)[:, None] + M - P - np.arange(M)[None, :]


def masked_softmax(S: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis restricted to ``mask``; a row with nothing visible is 0."""
    mask = np.ones(S.shape, dtype=bool) if mask is None else np.broadcast_to(mask, S.shape)
    row_max = np.max(np.where(mask, S, -np.inf), axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    numer = np.where(mask, np.exp(np.where(mask, S, row_max) - row_max), 0.0)
    denom = numer.sum(axis=-1, keepdims=True)
    return numer / np.where(denom > 0, denom, 1.0)


def softmax_av(S: np.ndarray, mask: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``masked_softmax(S, mask) @ V``: scores given, a row with nothing visible is 0."""
    return masked_softmax(S, mask) @ V


def softmax_attention(Q, K, V, scale=None, mask=None) -> np.ndarray:
    """``softmax(Q K^T * scale, masked) V`` over any leading dims."""
    S = Q @ transpose(K) * default_scale(Q, scale)
    return masked_softmax(S, mask) @ V


def qkv(rng, s: Sizes, heads: tuple[str, str] | None = None) -> list[np.ndarray]:
    """Q[P,E], K[M,E], V[M,F], or with heads Q[HQ,P,E], K[HK,M,E], V[HK,M,F]."""
    hq, hk = ((), ()) if heads is None else ((s[heads[0]],), (s[heads[1]],))
    return [normal(rng, *hq, s["P"], s["E"]), normal(rng, *hk, s["M"], s["E"]),
            normal(rng, *hk, s["M"], s["F"])]


def qkv_inputs(rng, s: Sizes) -> Inputs:
    return qkv(rng, s), params_of(s)


def head_inputs(query_heads: str, kv_heads: str | None):
    """Factory for Q with heads ``query_heads`` and K/V with ``kv_heads`` (None: one
    shared K[M,E], V[M,F] without a head rank, as in MQA)."""
    def make(rng, s: Sizes) -> Inputs:
        if kv_heads is None:
            return [normal(rng, s[query_heads], s["P"], s["E"]), *qkv(rng, s)[1:]], params_of(s)
        return qkv(rng, s, (query_heads, kv_heads)), params_of(s)
    return make


def repeat_kv_heads(X: np.ndarray, query_heads: int) -> np.ndarray:
    """``X[..., HK, M, *]`` -> ``X[..., H, M, *]``: query head h reads KV head h // (H/HK)."""
    return np.repeat(X, query_heads // X.shape[-3], axis=-3)


# --- the FuseMax cascades ----------------------------------------------------------


def ref_softmax(Q, K, V, scale=None):
    return softmax_attention(Q, K, V, scale)


def ref_softmax_unscaled(Q, K, V):
    return softmax_attention(Q, K, V, 1.0)


def ref_causal(Q, K, V, scale=None):
    return softmax_attention(Q, K, V, scale, causal_mask(Q.shape[-2], K.shape[-2]))


# --- heads ---------------------------------------------------------------------------


def ref_grouped(Q, K, V, scale=None, causal=False):
    """Q[..., H, P, E] against K/V[..., HK, M, *], HK dividing H."""
    K, V = repeat_kv_heads(K, Q.shape[-3]), repeat_kv_heads(V, Q.shape[-3])
    mask = causal_mask(Q.shape[-2], K.shape[-2]) if causal else None
    return softmax_attention(Q, K, V, scale, mask)


def ref_mha(Q, K, V, scale=None):
    return softmax_attention(Q, K, V, scale)


def ref_gqa_decode(Q, K, V, scale=None):
    return ref_grouped(Q, K, V, scale, causal=True)


def ref_mqa_decode(Q, K, V, scale=None):
    return ref_grouped(Q, K[..., None, :, :], V[..., None, :, :], scale, causal=True)


def ref_sqa(Q, K, V, scale=None):
    return ref_grouped(Q, K, V, scale, causal=False)


# --- masks over positions ------------------------------------------------------------


def ref_sliding_window(Q, K, V, scale=None, window=256):
    dist = query_key_distance(Q.shape[-2], K.shape[-2])
    return softmax_attention(Q, K, V, scale, (dist >= 0) & (dist < window))


def ref_sinks_window(Q, K, V, scale=None, sinks=4, window=256):
    dist = query_key_distance(Q.shape[-2], K.shape[-2])
    is_sink = np.arange(K.shape[-2])[None, :] < sinks
    return softmax_attention(Q, K, V, scale, (dist >= 0) & (is_sink | (dist < window)))


def ref_prefix_lm(Q, K, V, prefix, scale=None):
    P = Q.shape[-2]
    in_prefix = np.arange(P)[None, :] < prefix
    return softmax_attention(Q, K, V, scale, in_prefix | causal_mask(P, P))


def prefix_lm_inputs(rng, s: Sizes) -> Inputs:
    return qkv(rng, {**s, "M": s["P"]}), params_of(s)


# --- score modifiers -------------------------------------------------------------------


def ref_alibi(Q, K, V, SLOPE, scale=None):
    P, M = Q.shape[-2], K.shape[-2]
    dist = query_key_distance(P, M)
    S = Q @ transpose(K) * default_scale(Q, scale) - SLOPE[..., :, None, None] * dist
    return masked_softmax(S, dist >= 0) @ V


def alibi_inputs(rng, s: Sizes) -> Inputs:
    """Press et al.'s geometric slopes 2^(-8k/H), k = 1..H."""
    Q, K, V = qkv(rng, s, ("H", "H"))
    slopes = 2.0 ** (-8.0 * np.arange(1, s["H"] + 1) / s["H"])
    return [Q, K, V, slopes], params_of(s)


def ref_sink_logit(Q, K, V, SINK, scale=None):
    """Softmax over the visible keys and one more logit per head, ``SINK[h]``, that has no
    value; a query with no visible key is 0 (the max over its keys is absent)."""
    P, M = Q.shape[-2], K.shape[-2]
    mask = causal_mask(P, M)
    S = np.where(mask, Q @ transpose(K) * default_scale(Q, scale), -np.inf)
    sink = np.broadcast_to(SINK[..., :, None, None], S.shape[:-1] + (1,))
    mx = np.maximum(S.max(axis=-1, keepdims=True, initial=-np.inf), sink)
    weights = np.exp(S - mx)
    denom = weights.sum(axis=-1, keepdims=True) + np.exp(sink - mx)
    out = (weights / denom) @ V
    return np.where(mask.any(axis=-1)[:, None], out, 0.0)


def ref_softpick(Q, K, V, scale=None, eps=1e-6):
    """relu(e^(x-mx) - e^(-mx)) / (sum |e^(x-mx) - e^(-mx)| + eps) over the visible keys; a
    query with none visible is 0."""
    P, M = Q.shape[-2], K.shape[-2]
    mask = causal_mask(P, M)
    S = Q @ transpose(K) * default_scale(Q, scale)
    mx = np.where(mask, S, -np.inf).max(axis=-1, keepdims=True, initial=-np.inf)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    X = np.where(mask, np.exp(S - mx) - np.exp(-mx), 0.0)
    out = np.maximum(X, 0.0) @ V / (np.abs(X).sum(axis=-1, keepdims=True) + eps)
    return np.where(mask.any(axis=-1)[:, None], out, 0.0)


def ref_selective(Q, K, V, scale=None):
    """Causal softmax of S - FS, FS[p,m] the sum over earlier queries q (m < q < p) of
    relu(S[q,m]): what they selected against key m (Leviathan et al., 2024)."""
    P = Q.shape[-2]
    S = Q @ transpose(K) * default_scale(Q, scale)
    p, m = np.arange(P)[:, None], np.arange(P)[None, :]
    R = np.where(m < p, np.maximum(S, 0.0), 0.0)
    FS = np.cumsum(R, axis=-2) - R  # the rows before p
    L = np.where(m <= p, S - FS, -np.inf)
    W = np.exp(L - L.max(axis=-1, keepdims=True))
    return (W / W.sum(axis=-1, keepdims=True)) @ V


def ref_retention(Q, K, V, gamma=0.96875):
    """(Q K^T ∘ D) V with D[p,m] = gamma^(p+M-P-m) on the causal triangle, 0 above."""
    dist = query_key_distance(Q.shape[-2], K.shape[-2])
    decay = np.where(dist >= 0, float(gamma) ** np.maximum(dist, 0), 0.0)
    return (Q @ transpose(K) * decay) @ V


def ref_gla(Q, K, V, LG):
    """(Q K^T ∘ D) V, D[p,m] = exp(sum of LG over keys m+1 .. p') on the causal triangle."""
    P, M = Q.shape[-2], K.shape[-2]
    CG = np.cumsum(LG, axis=-1)
    qpos = np.arange(P) + M - P
    CGq = np.take(CG, np.clip(qpos, 0, M - 1), axis=-1)
    mask = causal_mask(P, M) & (qpos >= 0)[:, None]
    decay = np.where(mask, np.exp(np.where(mask, CGq[..., :, None] - CG[..., None, :], 0.0)), 0.0)
    return (Q @ transpose(K) * decay) @ V


def gla_inputs(rng, s: Sizes) -> Inputs:
    """Log forget gates in (log 0.5, 0]: decays between 0.5 and 1 per step."""
    Q, K, V = qkv(rng, s)
    return [Q, K, V, np.log(rng.uniform(0.5, 1.0, s["M"]))], params_of(s)


def ref_rwkv(R, K, V, WD, U):
    """sum_{m<p} (sum_e R[p,e] K[m,e] w[e]^(p-1-m)) V[m] + (sum_e R[p,e] U[e] K[p,e]) V[p],
    with the per-step decay w = exp(-exp(WD))."""
    P = R.shape[-2]
    dist = np.arange(P)[:, None] - 1 - np.arange(P)[None, :]
    past = dist >= 0
    rate = np.exp(WD)[..., None, None, :]
    decay = np.where(past[..., None], np.exp(-np.maximum(dist, 0)[..., None] * rate), 0.0)
    S = np.einsum("...pe,...me,...pme->...pm", R, K, decay)
    bonus = np.einsum("...pe,...e,...pe->...p", R, U, K)
    return S @ V + bonus[..., None] * V


def rwkv_inputs(rng, s: Sizes) -> Inputs:
    """Per-channel log-rates around -1 (decays near 0.7 per step) and a bonus per channel."""
    R, K = normal(rng, s["P"], s["E"]), normal(rng, s["P"], s["E"])
    return [R, K, normal(rng, s["P"], s["F"]), rng.normal(-1.0, 0.5, s["E"]),
            normal(rng, s["E"])], params_of(s)


INFINI_SEGMENT = 16  # examples/infini.attn's let L


def ref_infini(Q, K, V, beta=0.0, scale=None):
    """Per segment of L positions: causal softmax within the query's segment, and the
    normalised linear attention (ELU + 1 features) over every earlier segment (0 in the
    first), mixed by sigmoid(beta)."""
    P, L = Q.shape[-2], INFINI_SEGMENT
    pos = np.arange(P)
    start = pos // L * L
    local = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[:, None])
    S = np.where(local, Q @ transpose(K) * default_scale(Q, scale), -np.inf)
    W = np.exp(S - S.max(axis=-1, keepdims=True))
    AD = (W / W.sum(axis=-1, keepdims=True)) @ V
    sigma = lambda x: np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))  # noqa: E731
    memory = pos[None, :] < start[:, None]
    A = np.where(memory, sigma(Q) @ transpose(sigma(K)), 0.0)
    den = A.sum(axis=-1, keepdims=True)
    AM = np.where(den > 0, (A @ V) / np.where(den > 0, den, 1.0), 0.0)
    g = 1.0 / (1.0 + np.exp(-beta))
    return g * AM + (1 - g) * AD


def infini_inputs(rng, s: Sizes) -> Inputs:
    """Self-attention inputs (P queries and keys)."""
    return qkv(rng, dict(s, M=s["P"])), params_of(s)


def sink_inputs(rng, s: Sizes) -> Inputs:
    """Per-head sink logits around the scores' scale (some rows dominated by the sink)."""
    Q, K, V = qkv(rng, s, ("H", "H"))
    return [Q, K, V, 2.0 * rng.standard_normal(s["H"])], params_of(s)


def ref_softcap(Q, K, V, scale=None, cap=50.0):
    S = cap * np.tanh(Q @ transpose(K) * default_scale(Q, scale) / cap)
    return masked_softmax(S, causal_mask(Q.shape[-2], K.shape[-2])) @ V


def ref_softmax1(Q, K, V, scale=None):
    """exp(s_m) / (1 + sum_m exp(s_m)) over visible keys; 0 on a row with none."""
    S = Q @ transpose(K) * default_scale(Q, scale)
    mask = np.broadcast_to(causal_mask(Q.shape[-2], K.shape[-2]), S.shape)
    numer = np.where(mask, np.exp(np.where(mask, S, 0.0)), 0.0)
    return numer / (1.0 + numer.sum(axis=-1, keepdims=True)) @ V


def ref_sigmoid(Q, K, V, scale=None, bias=None):
    M = K.shape[-2]
    bias = -np.log(M) if bias is None else bias
    S = 1.0 / (1.0 + np.exp(-(Q @ transpose(K) * default_scale(Q, scale) + bias)))
    return np.where(causal_mask(Q.shape[-2], M), S, 0.0) @ V


def ref_differential(Q1, K1, Q2, K2, V, lam, scale=None):
    mask = causal_mask(Q1.shape[-2], K1.shape[-2])
    A1 = masked_softmax(Q1 @ transpose(K1) * default_scale(Q1, scale), mask)
    A2 = masked_softmax(Q2 @ transpose(K2) * default_scale(Q2, scale), mask)
    return (A1 - lam * A2) @ V


def differential_inputs(rng, s: Sizes) -> Inputs:
    Q1, K1, V = qkv(rng, s)
    Q2, K2, _ = qkv(rng, s)
    return [Q1, K1, Q2, K2, V], {"lam": 0.8, **params_of(s)}


# --- softmax-free ----------------------------------------------------------------------


def ref_cosine(Q, K, V):
    QN = Q / np.linalg.norm(Q, axis=-1, keepdims=True)
    KN = K / np.linalg.norm(K, axis=-1, keepdims=True)
    return QN @ transpose(KN) @ V / K.shape[-2]


def elu_plus_one(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def ref_linear(Q, K, V):
    FQ, FK = elu_plus_one(Q), elu_plus_one(K)
    numer = FQ @ (transpose(FK) @ V)
    denom = FQ @ FK.sum(axis=-2)[..., :, None]
    return numer / denom


def ref_linear_causal(Q, K, V):
    S = elu_plus_one(Q) @ transpose(elu_plus_one(K))
    S = np.where(causal_mask(Q.shape[-2], K.shape[-2]), S, 0.0)
    denom = S.sum(axis=-1, keepdims=True)
    return (S / np.where(denom > 0, denom, 1.0)) @ V


# --- data-dependent masks ------------------------------------------------------------


BIGBIRD_BLOCK = 16


def ref_bigbird(Q, K, V, BM, scale=None):
    B = BIGBIRD_BLOCK
    token_mask = np.repeat(np.repeat(BM.astype(bool), B, axis=-2), B, axis=-1)
    mask = token_mask[..., : Q.shape[-2], : K.shape[-2]]
    return softmax_attention(Q, K, V, scale, mask)


def bigbird_block_mask(rng, PB: int, MB: int) -> np.ndarray:
    """Window (|i - j| <= 1) + global (block 0 both ways) + random blocks (p = 0.2).

    With three or more query blocks the last one sees nothing (as a query block
    of padding would), so fully masked rows are exercised too.
    """
    i, j = np.arange(PB)[:, None], np.arange(MB)[None, :]
    mask = (np.abs(i - j) <= 1) | (i == 0) | (j == 0) | (rng.random((PB, MB)) < 0.2)
    if PB >= 3:
        mask[-1, :] = False
    return mask


def bigbird_inputs(rng, s: Sizes) -> Inputs:
    PB, MB = -(-s["P"] // BIGBIRD_BLOCK), -(-s["M"] // BIGBIRD_BLOCK)
    return qkv(rng, s) + [bigbird_block_mask(rng, PB, MB)], params_of(s)


def ref_document_mask(Q, K, V, DQ, DK, scale=None):
    same_doc = DQ[..., :, None] == DK[..., None, :]
    return softmax_attention(Q, K, V, scale, same_doc & causal_mask(DQ.shape[-1], DK.shape[-1]))


def document_inputs(rng, s: Sizes) -> Inputs:
    """Sorted small document ids.  Packed (the default when P <= M): the queries are the
    last P positions of the keys' sequence.  Otherwise DQ is drawn on its own and may
    name a document with no keys (``docs`` appears only in DQ)."""
    docs = int(s.get("docs", 3))
    DK = np.sort(rng.integers(0, docs, s["M"])).astype(np.int32)
    if s.get("packed", 1) and s["P"] <= s["M"]:
        DQ = DK[s["M"] - s["P"]:].copy()
    else:
        DQ = np.sort(rng.integers(0, docs + 1, s["P"])).astype(np.int32)
    params = {k: v for k, v in params_of(s).items() if k not in ("docs", "packed")}
    return qkv(rng, s) + [DQ, DK], params


def ref_key_padding(Q, K, V, KVALID, scale=None):
    return softmax_attention(Q, K, V, scale, KVALID.astype(bool)[..., None, :])


def key_padding_inputs(rng, s: Sizes) -> Inputs:
    """Each key is padding with probability ``pad`` (default 0.3)."""
    pad = s.get("pad", 0.3)
    valid = rng.random(s["M"]) >= pad
    return qkv(rng, s) + [valid], {k: v for k, v in params_of(s).items() if k != "pad"}


# --- several outputs -----------------------------------------------------------------


def ref_lse(Q, K, V, scale=None):
    """(AV, LSE); LSE of a query with no visible key is 0 (an absent element)."""
    S = Q @ transpose(K) * default_scale(Q, scale)
    mask = np.broadcast_to(causal_mask(Q.shape[-2], K.shape[-2]), S.shape)
    row_max = np.max(np.where(mask, S, -np.inf), axis=-1)
    visible = mask.any(axis=-1)
    row_max = np.where(visible, row_max, 0.0)
    denom = np.where(mask, np.exp(np.where(mask, S, 0.0) - row_max[..., None]), 0.0).sum(axis=-1)
    lse = np.where(visible, row_max + np.log(np.where(visible, denom, 1.0)), 0.0)
    return masked_softmax(S, mask) @ V, lse


# --- indirect subscripts: paged caches, packed batches ------------------------------------


def over_batch(core, ndims: tuple[int, ...], *arrays, **params):
    """Apply ``core`` to every batch element: leading dims (beyond ``ndims[i]`` core dims of
    argument i) broadcast like a gufunc's; the results are stacked back."""
    leads = [a.shape[: a.ndim - n] for a, n in zip(arrays, ndims)]
    batch = np.broadcast_shapes(*leads)
    full = [np.broadcast_to(a, batch + a.shape[a.ndim - n:]) for a, n in zip(arrays, ndims)]
    outs = [core(*(a[idx] for a in full), **params) for idx in np.ndindex(*batch)]
    if not outs:
        shape = core(*(np.zeros(a.shape[len(batch):], a.dtype) for a in full), **params).shape
        return np.zeros(batch + shape)
    return np.stack(outs).reshape(batch + outs[0].shape)


def unpage(cache: np.ndarray, PT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cache[NP, PG, ...]`` read through page table ``PT[B, NB]`` as a dense
    ``[B, NB * PG, ...]`` and the mask of positions on a real page (``0 <= page < NP``)."""
    NP, PG = cache.shape[:2]
    B, NB = PT.shape
    real = (PT >= 0) & (PT < NP)
    if NP == 0:
        dense = np.zeros((B, NB, PG) + cache.shape[2:])
    else:
        dense = cache[np.where(real, PT, 0)]
    return dense.reshape((B, NB * PG) + cache.shape[2:]), np.repeat(real, PG, axis=1)


def heads_first(X: np.ndarray, query_heads: int) -> np.ndarray:
    """``X[B, M, HK, X]`` -> ``[B, H, M, X]``: query head h reads KV head h // (H/HK)."""
    return repeat_kv_heads(np.moveaxis(X, 2, 1), query_heads)


def _paged_decode(Q, KC, VC, PT, L, scale=None):
    K, real = unpage(KC, PT)
    V, _ = unpage(VC, PT)
    H = Q.shape[1]
    S = np.einsum("bhe,bhme->bhm", Q, heads_first(K, H)) * default_scale(Q, scale)
    visible = real & (np.arange(K.shape[1])[None, :] < L[:, None])
    return np.einsum("bhm,bhmf->bhf", masked_softmax(S, visible[:, None, :]), heads_first(V, H))


def ref_paged_decode(Q, KC, VC, PT, L, scale=None):
    return over_batch(_paged_decode, (3, 4, 4, 2, 1), Q, KC, VC, PT, L, scale=scale)


def _paged_prefill(Q, KC, VC, PT, L, scale=None):
    K, real = unpage(KC, PT)
    V, _ = unpage(VC, PT)
    P, H, M = Q.shape[1], Q.shape[2], K.shape[1]
    S = np.einsum("bphe,bhme->bphm", Q, heads_first(K, H)) * default_scale(Q, scale)
    position = L[:, None] - P + np.arange(P)[None, :]                  # [B, P]
    visible = real[:, None, :] & (np.arange(M)[None, None, :] <= position[:, :, None])
    return np.einsum("bphm,bhmf->bphf", masked_softmax(S, visible[:, :, None, :]),
                     heads_first(V, H))


def ref_paged_prefill(Q, KC, VC, PT, L, scale=None):
    return over_batch(_paged_prefill, (4, 4, 4, 2, 1), Q, KC, VC, PT, L, scale=scale)


def paged_inputs(rng, s: Sizes) -> Inputs:
    """A cache of NP pages of PG rows; each sequence's page table is a random choice of
    pages (repeats allowed), with -1 (unused) and NP (outside the cache) sprinkled in;
    lengths anywhere in 0 .. NB * PG, so some sequences are empty or end mid-page."""
    B, NB, NP, PG = s["B"], s["NB"], s["NP"], s["PG"]
    q_shape = (B, s["H"], s["E"]) if "P" not in s else (B, s["P"], s["H"], s["E"])
    PT = rng.integers(0, NP, (B, NB))
    PT = np.where(rng.random((B, NB)) < 0.15, rng.choice([-1, NP], (B, NB)), PT)
    L = rng.integers(0, NB * PG + 1, B)
    L[0] = NB * PG  # one full sequence, so no case is vacuous
    return [normal(rng, *q_shape), normal(rng, NP, PG, s["HK"], s["E"]),
            normal(rng, NP, PG, s["HK"], s["F"]), PT.astype(np.int32), L.astype(np.int32)], \
        params_of(s)


def _varlen_prefill(Q, K, V, CU, scale=None):
    """Sequence b is tokens CU[b] .. CU[b+1] - 1 (clipped to the T tokens), causal inside;
    row p of the padded output is its p-th token."""
    T, H = Q.shape[0], Q.shape[1]
    B = CU.shape[0] - 1
    out = np.zeros((B, T, H, V.shape[2]))
    for b in range(B):
        start, length = CU[b], CU[b + 1] - CU[b]
        rows = np.arange(min(max(length, 0), T))  # the output has T rows per sequence
        inside = (start + rows >= 0) & (start + rows < T)
        tokens = np.clip(start + rows, 0, max(T - 1, 0))
        q, k = np.moveaxis(Q[tokens], 1, 0), repeat_kv_heads(np.moveaxis(K[tokens], 1, 0), H)
        v = repeat_kv_heads(np.moveaxis(V[tokens], 1, 0), H)
        mask = causal_mask(len(rows), len(rows)) & inside[None, :] & inside[:, None]
        out[b, : len(rows)] = np.moveaxis(softmax_attention(q, k, v, scale, mask), 0, 1)
    return out


def ref_varlen_prefill(Q, K, V, CU, scale=None):
    return over_batch(_varlen_prefill, (3, 3, 3, 1), Q, K, V, CU, scale=scale)


def varlen_inputs(rng, s: Sizes) -> Inputs:
    """``C - 1`` sequences packed into T tokens: sorted offsets from 0 to T (empty sequences
    included); ``overhang`` moves the last offset past the end (its keys read absent)."""
    T, C = s["T"], s["C"]
    CU = np.sort(rng.integers(0, T + 1, C))
    CU[0], CU[-1] = 0, T + int(s.get("overhang", 0))
    H, HK = s["H"], s["HK"]
    arrays = [normal(rng, T, H, s["E"]), normal(rng, T, HK, s["E"]), normal(rng, T, HK, s["F"]),
              CU.astype(np.int32)]
    return arrays, {k: v for k, v in params_of(s).items() if k != "overhang"}


# --- the registry --------------------------------------------------------------------

QKV_SIZES = ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 9, "M": 6, "E": 3, "F": 2},
             {"P": 1, "M": 23, "E": 4, "F": 5})

EXAMPLES: dict[str, ExampleRef] = {
    "fusemax/cascade4.attn": ExampleRef(
        "cascade4", qkv_inputs, ref_softmax,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 1, "M": 70, "E": 4, "F": 5},
         {"P": 9, "M": 9, "E": 3, "F": 2, "scale": 0.7})),
    "fusemax/cascade5.attn": ExampleRef(
        "softmax_1pass", qkv_inputs, ref_softmax_unscaled,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 4, "M": 150, "E": 5, "F": 3},
         {"P": 3, "M": 128, "E": 2, "F": 2})),
    "fusemax/deferred_2pass.attn": ExampleRef(
        "deferred_2pass", qkv_inputs, ref_softmax,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 2, "M": 70, "E": 3, "F": 4})),
    "fusemax/online_normalizer_2pass.attn": ExampleRef(
        "online_normalizer_2pass", qkv_inputs, ref_softmax_unscaled,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 4, "M": 150, "E": 5, "F": 3})),
    "fusemax/cascade5_causal.attn": ExampleRef(
        "causal_1pass", qkv_inputs, ref_causal,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 40, "M": 37, "E": 3, "F": 2},
         {"P": 33, "M": 33, "E": 4, "F": 3})),
    "causal.attn": ExampleRef("causal_softmax", qkv_inputs, ref_causal, QKV_SIZES),
    "mha.attn": ExampleRef(
        "mha", head_inputs("H", "H"), ref_mha,
        ({"H": 3, "P": 5, "M": 11, "E": 4, "F": 3}, {"H": 1, "P": 2, "M": 17, "E": 5, "F": 2})),
    "gqa_decode.attn": ExampleRef(
        "gqa_decode", head_inputs("H", "HK"), ref_gqa_decode,
        ({"H": 6, "HK": 2, "P": 3, "M": 19, "E": 4, "F": 3},
         {"H": 4, "HK": 4, "P": 1, "M": 13, "E": 3, "F": 2},
         {"H": 3, "HK": 1, "P": 7, "M": 5, "E": 2, "F": 3})),
    "mqa_decode.attn": ExampleRef(
        "mqa_decode", head_inputs("H", None), ref_mqa_decode,
        ({"H": 4, "P": 2, "M": 23, "E": 4, "F": 3}, {"H": 1, "P": 5, "M": 5, "E": 3, "F": 2})),
    "sqa.attn": ExampleRef(
        "sqa", head_inputs("HQ", "HKV"), ref_sqa,
        ({"HQ": 4, "HKV": 2, "P": 7, "M": 13, "E": 4, "F": 3},
         {"HQ": 3, "HKV": 1, "P": 2, "M": 9, "E": 3, "F": 2},
         {"HQ": 2, "HKV": 2, "P": 5, "M": 6, "E": 2, "F": 2})),
    "sliding_window.attn": ExampleRef(
        "sliding_window", qkv_inputs, ref_sliding_window,
        ({"P": 5, "M": 37, "E": 6, "F": 3, "window": 6}, {"P": 12, "M": 12, "E": 3, "F": 2, "window": 1},
         {"P": 6, "M": 20, "E": 4, "F": 3}, {"P": 9, "M": 7, "E": 2, "F": 2, "window": 3})),
    "sinks_window.attn": ExampleRef(
        "sinks_window", qkv_inputs, ref_sinks_window,
        ({"P": 9, "M": 40, "E": 4, "F": 3, "sinks": 3, "window": 5},
         {"P": 12, "M": 12, "E": 3, "F": 2, "sinks": 0, "window": 2},
         {"P": 4, "M": 30, "E": 3, "F": 2}, {"P": 6, "M": 25, "E": 2, "F": 3, "window": 3})),
    "prefix_lm.attn": ExampleRef(
        "prefix_lm", prefix_lm_inputs, ref_prefix_lm,
        ({"P": 9, "E": 4, "F": 3, "prefix": 3}, {"P": 6, "E": 3, "F": 2, "prefix": 0},
         {"P": 5, "E": 2, "F": 3, "prefix": 5})),
    "alibi.attn": ExampleRef(
        "alibi", alibi_inputs, ref_alibi,
        ({"H": 3, "P": 5, "M": 17, "E": 4, "F": 3}, {"H": 2, "P": 8, "M": 8, "E": 3, "F": 2},
         {"H": 1, "P": 6, "M": 4, "E": 2, "F": 2})),
    "gla.attn": ExampleRef(
        "gla", gla_inputs, ref_gla,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 9, "M": 6, "E": 3, "F": 2},
         {"P": 12, "M": 12, "E": 4, "F": 2})),
    "retention.attn": ExampleRef(
        "retention", qkv_inputs, ref_retention,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 9, "M": 6, "E": 3, "F": 2, "gamma": 0.5},
         {"P": 12, "M": 12, "E": 4, "F": 2, "gamma": 1.0})),
    "infini.attn": ExampleRef(
        "infini", infini_inputs, ref_infini,
        ({"P": 37, "E": 4, "F": 3}, {"P": 16, "E": 3, "F": 2, "beta": 1.5},
         {"P": 50, "E": 2, "F": 3, "beta": -2.0, "scale": 0.7})),
    "rwkv.attn": ExampleRef(
        "rwkv", rwkv_inputs, ref_rwkv,
        ({"P": 9, "E": 4, "F": 3}, {"P": 1, "E": 3, "F": 2}, {"P": 33, "E": 2, "F": 3})),
    "sink_logit.attn": ExampleRef(
        "sink_logit", sink_inputs, ref_sink_logit,
        ({"H": 3, "P": 5, "M": 17, "E": 4, "F": 3}, {"H": 2, "P": 9, "M": 6, "E": 3, "F": 2},
         {"H": 1, "P": 4, "M": 4, "E": 2, "F": 2, "scale": 3.0})),
    "selective.attn": ExampleRef(
        "selective", prefix_lm_inputs, ref_selective,
        ({"P": 9, "E": 4, "F": 3}, {"P": 1, "E": 3, "F": 2}, {"P": 23, "E": 2, "F": 3,
                                                              "scale": 2.0})),
    "softpick.attn": ExampleRef(
        "softpick", qkv_inputs, ref_softpick,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 9, "M": 6, "E": 3, "F": 2, "eps": 0.5},
         {"P": 4, "M": 11, "E": 4, "F": 2, "scale": 2.0})),
    "softcap.attn": ExampleRef(
        "softcap", qkv_inputs, ref_softcap,
        ({"P": 5, "M": 37, "E": 6, "F": 3, "cap": 0.5}, {"P": 9, "M": 6, "E": 3, "F": 2, "cap": 2.0},
         {"P": 3, "M": 11, "E": 4, "F": 2})),
    "softmax1.attn": ExampleRef("softmax1", qkv_inputs, ref_softmax1, QKV_SIZES),
    "sigmoid.attn": ExampleRef(
        "sigmoid_attn", qkv_inputs, ref_sigmoid,
        QKV_SIZES + ({"P": 4, "M": 9, "E": 3, "F": 2, "bias": 0.5},)),
    "cosine.attn": ExampleRef("cosine", qkv_inputs, ref_cosine, QKV_SIZES),
    "linear.attn": ExampleRef("linear_attention", qkv_inputs, ref_linear, QKV_SIZES),
    "linear_causal.attn": ExampleRef("linear_causal", qkv_inputs, ref_linear_causal, QKV_SIZES),
    "differential.attn": ExampleRef(
        "differential", differential_inputs, ref_differential,
        QKV_SIZES + ({"P": 4, "M": 9, "E": 3, "F": 2, "lam": -0.3, "scale": 0.25},)),
    "bigbird.attn": ExampleRef(
        "bigbird", bigbird_inputs, ref_bigbird,
        ({"P": 40, "M": 53, "E": 4, "F": 3}, {"P": 16, "M": 16, "E": 3, "F": 2},
         {"P": 70, "M": 35, "E": 2, "F": 2})),
    "document_mask.attn": ExampleRef(
        "document_mask", document_inputs, ref_document_mask,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 12, "M": 12, "E": 3, "F": 2, "docs": 4},
         {"P": 8, "M": 20, "E": 2, "F": 2, "packed": 0})),
    "key_padding.attn": ExampleRef(
        "key_padding", key_padding_inputs, ref_key_padding,
        ({"P": 5, "M": 37, "E": 6, "F": 3}, {"P": 7, "M": 4, "E": 3, "F": 2, "pad": 0.5})),
    "lse.attn": ExampleRef("attention_lse", qkv_inputs, ref_lse, QKV_SIZES),
    "paged_decode.attn": ExampleRef(
        "paged_decode", paged_inputs, ref_paged_decode,
        ({"B": 3, "H": 4, "HK": 2, "E": 4, "F": 3, "NP": 5, "PG": 4, "NB": 3},
         {"B": 2, "H": 3, "HK": 1, "E": 3, "F": 2, "NP": 7, "PG": 1, "NB": 6},
         {"B": 2, "H": 2, "HK": 2, "E": 2, "F": 3, "NP": 2, "PG": 16, "NB": 2, "scale": 0.3})),
    "paged_prefill.attn": ExampleRef(
        "paged_prefill", paged_inputs, ref_paged_prefill,
        ({"B": 3, "P": 3, "H": 4, "HK": 2, "E": 4, "F": 3, "NP": 5, "PG": 4, "NB": 3},
         {"B": 2, "P": 5, "H": 2, "HK": 1, "E": 3, "F": 2, "NP": 6, "PG": 1, "NB": 4})),
    "varlen_prefill.attn": ExampleRef(
        "varlen_prefill", varlen_inputs, ref_varlen_prefill,
        ({"T": 11, "C": 4, "H": 4, "HK": 2, "E": 4, "F": 3},
         {"T": 7, "C": 3, "H": 2, "HK": 1, "E": 3, "F": 2, "overhang": 2},
         {"T": 9, "C": 2, "H": 1, "HK": 1, "E": 2, "F": 2, "scale": 0.5})),
}
