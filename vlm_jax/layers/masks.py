"""The one attention-mask builder.

Dimension letters: B batch, H heads, T query length, S key length, Q learned queries,
M media (images), R latents per media.

Every mask here is a boolean array of rank 4, ``[B|1, 1, T, S]``, ``True`` where a query
position may attend to a key position. That is exactly what `jax.nn.dot_product_attention`
(and `vlm_jax.layers.attention.MultiHeadAttention`) take as ``mask``; a leading dim of 1
broadcasts over the batch. Combine masks with `combine` (logical AND, ``None`` ignored).

Conventions for 1-D inputs: ``*_valid`` arrays are boolean ``[B, n]`` (True = real token,
False = padding); integer ``[B, n]`` arrays of 0/1 are accepted too.

A row with no ``True`` (e.g. a text token before the first image in Flamingo) makes the
softmax degenerate (uniform weights); `MultiHeadAttention(zero_empty_rows=True)` returns a
zero output for such rows instead.
"""
from __future__ import annotations

import jax.numpy as jnp

Array = jnp.ndarray


def _as_bool_2d(x, name: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [B, n] (one row per example); got shape {x.shape}. "
                         f"Pass a 2-D array, e.g. {name}[None] for a single example.")
    return x.astype(bool)


def _check4(mask: Array, name: str) -> Array:
    if mask.ndim != 4:
        raise ValueError(f"{name}: attention masks are rank-4 [B|1, 1|H, T, S]; got shape {mask.shape}.")
    return mask


def causal_mask(length: int, key_length: int | None = None, offset: int = 0) -> Array:
    """Lower-triangular mask ``[1, 1, T, S]``: query ``t`` sees keys ``s <= t + offset``.

    ``key_length`` defaults to ``length``; ``offset`` shifts the diagonal (queries that
    continue after ``offset`` earlier keys).

    causal_mask(4)[0, 0]::

        q\\k 0 1 2 3
        0    x . . .
        1    x x . .
        2    x x x .
        3    x x x x
    """
    key_length = length if key_length is None else key_length
    q = jnp.arange(length)[:, None]
    k = jnp.arange(key_length)[None, :]
    return (k <= q + offset)[None, None]


def padding_mask(key_valid) -> Array:
    """Key padding mask ``[B, 1, 1, S]`` from ``key_valid [B, S]``.

    key_valid = [[1, 1, 1, 0]] ->  every query row is ``x x x .``
    """
    return _as_bool_2d(key_valid, "key_valid")[:, None, None, :]


def combine(*masks) -> Array | None:
    """Logical AND of rank-4 masks with broadcasting; ``None`` entries are skipped.

    Returns ``None`` when every entry is ``None`` (no masking).
    """
    out = None
    for i, m in enumerate(masks):
        if m is None:
            continue
        m = _check4(jnp.asarray(m, dtype=bool), f"combine(...) argument {i}")
        out = m if out is None else jnp.logical_and(out, m)
    return out


def prefix_lm_mask(prefix_len, length: int) -> Array:
    """Prefix-LM mask ``[B, 1, T, T]``: the first ``prefix_len[b]`` positions attend to each
    other bidirectionally; later positions are causal (see the whole prefix and earlier
    tokens). ``prefix_len``: int or int ``[B]``.

    prefix_lm_mask([2], 4)[0, 0]::

        q\\k 0 1 2 3
        0    x x . .
        1    x x . .
        2    x x x .
        3    x x x x
    """
    p = jnp.asarray(prefix_len, dtype=jnp.int32)
    p = jnp.atleast_1d(p)
    if p.ndim != 1:
        raise ValueError(f"prefix_len must be an int or an int array [B]; got shape {p.shape}.")
    q = jnp.arange(length)[None, :, None]
    k = jnp.arange(length)[None, None, :]
    visible = (k <= q) | (k < p[:, None, None])
    return visible[:, None]


# ----------------------------------------------------------------------------- BLIP-2
def _qformer_parts(num_queries: int, text_valid):
    tv = _as_bool_2d(text_valid, "text_valid")
    b, t = tv.shape
    n = num_queries + t
    idx = jnp.arange(n)
    is_q = idx < num_queries                       # [N]
    key_valid = jnp.concatenate([jnp.ones((b, num_queries), bool), tv], axis=1)  # [B, N]
    return b, n, idx, is_q, key_valid


def qformer_itc_mask(num_queries: int, text_valid) -> Array:
    """Q-Former unimodal mask (ITC) over ``[queries; text]``, shape ``[B, 1, Q+T, Q+T]``.

    Queries see only queries, text sees only (non-padded) text. Q=2, T=3, last text padded::

        q\\k q0 q1 t0 t1 t2
        q0   x  x  .  .  .
        q1   x  x  .  .  .
        t0   .  .  x  x  .
        t1   .  .  x  x  .
        t2   .  .  x  x  .
    """
    b, n, idx, is_q, key_valid = _qformer_parts(num_queries, text_valid)
    same = is_q[:, None] == is_q[None, :]
    return (same[None] & key_valid[:, None, :])[:, None]


def qformer_itm_mask(num_queries: int, text_valid) -> Array:
    """Q-Former bidirectional mask (ITM), ``[B, 1, Q+T, Q+T]``: everything sees every
    non-padded position. Q=2, T=3, last text padded::

        q\\k q0 q1 t0 t1 t2
        q0   x  x  x  x  .
        ...  (every row the same)
    """
    b, n, idx, is_q, key_valid = _qformer_parts(num_queries, text_valid)
    return jnp.broadcast_to(key_valid[:, None, None, :], (b, 1, n, n))


def qformer_itg_mask(num_queries: int, text_valid) -> Array:
    """Q-Former multimodal-causal mask (ITG), ``[B, 1, Q+T, Q+T]``: queries see all queries
    (never text); text token ``i`` sees all queries and text ``j <= i`` (non-padded).
    Q=2, T=3, last text padded::

        q\\k q0 q1 t0 t1 t2
        q0   x  x  .  .  .
        q1   x  x  .  .  .
        t0   x  x  x  .  .
        t1   x  x  x  x  .
        t2   x  x  x  x  .
    """
    b, n, idx, is_q, key_valid = _qformer_parts(num_queries, text_valid)
    key_is_query = is_q[None, :]
    causal_text = (~is_q[:, None]) & (~is_q[None, :]) & (idx[None, :] <= idx[:, None])
    # every row sees all queries; text rows also see earlier-or-same text; query rows never see text
    allowed = key_is_query | causal_text
    return (allowed[None] & key_valid[:, None, :])[:, None]


# ---------------------------------------------------------------------------- Flamingo
def flamingo_media_mask(text_time, media_valid, latents_per_media: int) -> Array:
    """Flamingo cross-attention mask ``[B, 1, T, M*R]`` (R = ``latents_per_media``).

    ``text_time [B, T]`` (int): for each text token, the 1-based index of the most recent
    image at or before it (``cumsum`` of the ``<image>`` markers), 0 before the first image.
    ``media_valid [B, M]``: which media slots hold a real image. Token ``t`` attends only to
    the R latents of media ``text_time[t] - 1``; tokens with ``text_time == 0`` see nothing
    (their rows are all False: use ``MultiHeadAttention(zero_empty_rows=True)``).

    Example: tokens ``<image> a <image> b`` -> text_time = [1, 1, 2, 2], M=2, R=2::

        q\\k    m0r0 m0r1 m1r0 m1r1
        <image>  x    x    .    .
        a        x    x    .    .
        <image>  .    .    x    x
        b        .    .    x    x
    """
    tt = jnp.asarray(text_time)
    if tt.ndim != 2:
        raise ValueError(f"text_time must have shape [B, T]; got {tt.shape}.")
    mv = _as_bool_2d(media_valid, "media_valid")
    if mv.shape[0] != tt.shape[0] and mv.shape[0] != 1:
        raise ValueError(f"media_valid batch {mv.shape[0]} does not match text_time batch {tt.shape[0]}.")
    m = mv.shape[1]
    media_of_key = jnp.repeat(jnp.arange(1, m + 1), latents_per_media)      # [M*R], 1-based
    key_valid = jnp.repeat(mv, latents_per_media, axis=1)                   # [B, M*R]
    allowed = tt[:, :, None] == media_of_key[None, None, :]                 # [B, T, M*R]
    return (allowed & key_valid[:, None, :])[:, None]


def rows_with_any(mask: Array) -> Array:
    """``[B|1, 1|H, T, 1]`` bool: which query rows of a rank-4 mask see at least one key."""
    return jnp.any(_check4(jnp.asarray(mask, bool), "mask"), axis=-1, keepdims=True)
