"""Multi-head attention (self and cross) with an optional KV cache for incremental decoding.

Dimension letters: B batch (N = batch*beam while decoding), T query length, S key length
(the cache length while decoding), D query-input width, Dkv key/value-input width,
H heads, Hkv key/value heads (grouped-query attention; = H unless ``num_kv_heads``), G = H / Hkv,
K head dim.

Parameters (logical axes in brackets):
  query:           kernel ``[D, H, K]`` ('embed', 'heads', 'kv'), bias ``[H, K]`` ('heads', 'kv')
  key/value:       kernel ``[D|Dkv, Hkv, K]``, bias ``[Hkv, K]``; axes as the query's when Hkv = H,
                   else ('embed', 'kv_heads', 'kv') / ('kv_heads', 'kv') (a logical name of their
                   own: Hkv need not divide the mesh axis that shards 'heads'; a rule for
                   'kv_heads' may be added, without one they are replicated)
  out:             kernel ``[H, K, Dout]`` ('heads', 'kv', 'embed'), bias ``[Dout]`` ('embed',)

Grouped-query attention (``num_kv_heads`` = Hkv < H, LLaMA-2-70B / TinyLlama / Mistral): the
key/value projections have Hkv heads, query head h reads key/value head ``h // G`` (HF's
``repeat_kv``); the KV cache stores only the Hkv heads. `jax.nn.dot_product_attention` takes
the Hkv heads directly; the XLA path repeats them.

Rotary position embeddings (``rope_theta`` not None; self-attention only): q and k are
rotated by ``positions`` before the logits and before the keys enter the KV cache, in HF's
LLaMA "rotate-half" layout (`apply_rotary`): for pair i of the K/2 frequencies
``theta ** (-2i / K)``, dims i and i + K/2 form the rotated pair. Positions come from the
``positions [B|1, T]`` argument; without it, ``0..T-1``, or while decoding each row's
``cache_index + 0..T-1``. K must be even.
Activations: q/k/v ``('activation_batch', 'activation_length', 'activation_heads',
'activation_kv')``, output ``('activation_batch', 'activation_length', 'activation_embed')``;
for remat policies they are named (`jax.ad_checkpoint.checkpoint_name`) ``query_proj``,
``key_proj``, ``value_proj`` and ``attention_out``.

Masks are boolean, rank 4, ``[B|1, 1|H, T, S]``, True = may attend (build them with
`vlm_jax.layers.masks`). An additive ``bias`` ``[B|1, H|1, T, S]`` (T5 relative positions)
is added to the logits before the softmax.

Attention kernel (``implementation``; `attention_kernel` says which one runs):
  'cudnn'  `jax.nn.dot_product_attention(implementation='cudnn')`: the flash kernel on
           NVIDIA GPUs (bf16/fp16 compute); fails on other backends.
  None     on GPU: `jax.nn.dot_product_attention` and JAX picks (cuDNN where it applies);
           on CPU/TPU: the project's XLA path below.
  'xla'    the project's XLA path on every backend:
             logits = (q k^T) * scale + bias, masked to -inf-like  [B, H, T, S] float32
                      (`attention_logits`: the dot accumulates and returns float32, so
                      bf16 q/k are not rounded to bf16 first)
             probs  = softmax(logits)                              (`softmax_with_saved_probs`)
             out    = probs v                                      [B, T, H, K]
           Its softmax saves the probabilities for the backward pass
           (d logits = p * (dp - sum(dp * p))); on XLA:CPU this took the CLIP ViT-S/16
           forward+backward step (batch 8, 2 cores) from 964 to 829 ms against
           `jax.nn.dot_product_attention`, whose softmax is differentiated through its JVP
           (BENCHMARKS.md, towers).
Attention-probability dropout (``dropout_rate > 0`` and not deterministic) always takes the
XLA path, because the fused kernels have no dropout.

KV cache, in the Flax ``'cache'`` collection. Every leaf has a leading batch dim, so beam
search can reorder rows by a gather on axis 0 of every leaf (docs/interfaces.md, Decoding).

Self-attention (``inputs_kv`` None):
  cached_key, cached_value  ``[B, S, Hkv, K]`` (S = the maximum length; Hkv = H without GQA;
                            keys stored after the rotary rotation)
  cache_index               ``[B]`` int32 — the next slot of each row.
Create an empty cache by running the module once with ``decode=True`` on an input of the
full length S and ``mutable=['cache']`` (the first call only shapes the cache and computes
ordinary attention), or use `init_cache`. Every later ``decode=True`` call writes its T new
keys/values at each row's ``cache_index``, advances it by T and attends causally over the
cache: key slot s is visible to new token t of row b iff ``s <= cache_index[b] + t``. A
caller mask passed while decoding must cover the cache length S (e.g. a key padding mask
``[B, 1, 1, S]`` for left-padded prompts). Writing past S is not checked (it would clamp).

Cross-attention (keys/values from a fixed encoder/media input ``[B, S, Dkv]``):
  cached_cross_key, cached_cross_value  ``[B, S, H, K]`` (S = the encoder/media length)
A ``decode=True`` call that passes ``inputs_kv`` fills the cache: it projects and stores the
keys/values (creating the variables on the first call, overwriting them on later ones) and
attends over them. Later calls with ``decode=True, kv_from_cache=True`` reuse them: the
key/value projections are not computed and ``inputs_kv`` may be None (if given it is
ignored). There is no index and no implicit mask; pass the encoder padding mask
``[B, 1, 1, S]`` (or a media mask ``[B, 1, T, S]``) with every call. `init_cache` returns
these leaves already filled from the ``inputs_kv`` among its arguments. A call with
``inputs_kv [B, Sn, Dkv]`` and ``cross_cache_offset=o`` projects only those Sn and writes them
at slots o..o+Sn-1, leaving the others as they are (media that arrive one at a time: a
dialogue's new image is projected once, the earlier ones are never re-projected).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from vlm_jax.layers.mlp import DEFAULT_KERNEL_INIT, Dense

IMPLEMENTATIONS = (None, "xla", "cudnn")
QKV_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
GQA_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
OUT_AXES = ("activation_batch", "activation_length", "activation_embed")


@jax.custom_vjp
def softmax_with_saved_probs(logits):
    """``softmax(logits, axis=-1)`` whose VJP reuses the saved probabilities p:
    ``d logits = p * (g - sum(g * p, -1))``. Same values as `jax.nn.softmax`; a cheaper
    backward on XLA:CPU (one fused elementwise+reduce instead of re-deriving through exp)."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits):
    p = jax.nn.softmax(logits, axis=-1)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_with_saved_probs.defvjp(_softmax_fwd, _softmax_bwd)


def attention_kernel(implementation: str | None, *, dropout: bool = False) -> str:
    """Which kernel `MultiHeadAttention` runs: 'cudnn', 'dot_product_attention' (JAX picks)
    or 'xla' (the project's einsum/softmax path). See the module docstring."""
    if dropout or implementation == "xla":
        return "xla"
    if implementation == "cudnn":
        return "cudnn"
    return "dot_product_attention" if jax.default_backend() == "gpu" else "xla"


def _check_mask(mask, name, b, t, s):
    if mask is None:
        return None
    if mask.ndim != 4:
        raise ValueError(f"{name} must be rank 4 [B|1, 1|H, T, S]; got shape {mask.shape}. "
                         "Build it with vlm_jax.layers.masks (e.g. padding_mask(valid) gives [B,1,1,S]).")
    for got, want, letter in zip((mask.shape[0], mask.shape[2], mask.shape[3]), (b, t, s), "BTS"):
        if got not in (1, want):
            raise ValueError(f"{name} shape {mask.shape} does not broadcast to [B={b}, H, T={t}, S={s}] "
                             f"(dim {letter}: {got} vs {want}).")
    return mask


def rotary_angles(positions, head_dim: int, theta: float):
    """``positions`` int ``[B|1, T]`` -> ``(cos, sin)`` float32 ``[B|1, T, 1, K]`` (HF LLaMA layout:
    frequencies ``theta ** (-2i / K)``, i < K/2, repeated for both halves)."""
    if head_dim % 2:
        raise ValueError(f"rotary position embeddings need an even head dim; got K={head_dim}.")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))    # [K/2]
    freqs = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq                  # [B, T, K/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]                              # [B, T, 1, K]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, positions, theta: float):
    """Rotate ``x [B, T, H, K]`` by ``positions [B|1, T]`` ("rotate-half": dims i and i + K/2
    are a pair); computed in float32, returned in ``x.dtype``."""
    cos, sin = rotary_angles(positions, x.shape[-1], theta)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_logits(q, k, scale: float, bias=None):
    """``(q k^T) * scale + bias`` in float32: q ``[B, T, H, K]``, k ``[B, S, H, K]`` ->
    ``[B, H, T, S]``. The product accumulates and comes out in float32
    (``preferred_element_type``), so bf16 q/k are not rounded to bf16 before the softmax."""
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return logits


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``inputs_q [B, T, D]`` (+ ``inputs_kv [B, S, Dkv]``) -> ``[B, T, Dout]``.

    Attributes:
      num_heads, head_dim: H and K.
      out_features: Dout (default: D, the query input width).
      use_bias: bias on the q/k/v projections; out_bias: bias on the output projection.
      scale: logit scale; None -> 1/sqrt(K) (T5 uses 1.0).
      dropout_rate: dropout on attention probabilities (training only).
      implementation: None | 'xla' | 'cudnn': the attention kernel (module docstring).
      zero_empty_rows: rows whose mask has no True key return exactly 0, output bias
        included (Flamingo text before the first image), instead of the softmax's uniform
        average. With a per-head mask, a head whose row is empty contributes 0 to the
        output projection.
      num_kv_heads: Hkv key/value heads (grouped-query attention; must divide H); None = H.
      qk_norm: None | 'layernorm' | 'rmsnorm': a norm (``qk_norm_eps``) over every head's K dims of
        the queries and keys, after the projections (params ``query_norm``, ``key_norm``; IDEFICS'
        ``qk_layer_norms``); the cross cache stores the normed keys.
      rope_theta: rotary position embeddings on q and k with this base (LLaMA: 10000.0);
        None = none. Self-attention only.
    """
    num_heads: int
    head_dim: int
    out_features: int | None = None
    use_bias: bool = True
    out_bias: bool = True
    scale: float | None = None
    dropout_rate: float = 0.0
    implementation: str | None = None
    zero_empty_rows: bool = False
    num_kv_heads: int | None = None
    rope_theta: float | None = None
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = DEFAULT_KERNEL_INIT

    @property
    def kv_heads(self) -> int:
        """Hkv, the number of key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.num_heads

    def _proj(self, name, x, heads: int | None = None):
        heads = heads or self.num_heads
        head_axis = "kv_heads" if heads != self.num_heads else "heads"
        return Dense((heads, self.head_dim), ("embed", head_axis, "kv"), use_bias=self.use_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)(x)

    def _positions(self, positions, b: int, t: int, decode: bool):
        """Rotary positions ``[B|1, T]``: given, else the cache index + 0..T-1 while decoding, else 0..T-1."""
        if positions is not None:
            positions = jnp.asarray(positions)
            if positions.ndim != 2 or positions.shape[0] not in (1, b) or positions.shape[1] != t:
                raise ValueError(f"positions must be int [B|1, T] = [{b}|1, {t}]; got shape {positions.shape}.")
            return positions
        steps = jnp.arange(t, dtype=jnp.int32)[None, :]
        if decode and self.has_variable("cache", "cache_index"):
            return self.get_variable("cache", "cache_index")[:, None] + steps
        return steps

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, mask=None, bias=None, *,
                 deterministic: bool = True, decode: bool = False, is_causal: bool = False,
                 key_value_lengths=None, kv_from_cache: bool = False, positions=None,
                 cross_cache_offset=None):
        """Attention.

        Args:
          inputs_q: ``[B, T, D]``.
          inputs_kv: ``[B, S, Dkv]`` for cross-attention; None = self-attention (unless
            ``kv_from_cache``).
          mask: bool ``[B|1, 1|H, T, S]`` or None.
          bias: additive logits bias ``[B|1, H|1, T, S]`` or None.
          deterministic: False enables attention dropout (needs a 'dropout' rng).
          decode: use/update the KV cache (see module docstring). Self-attention: write the
            new keys/values at the cache index. Cross-attention (``inputs_kv`` given): store
            the projected keys/values in the cross cache (fill / refill).
          is_causal: causal masking (query t sees keys s <= t) without building a mask array,
            combined with ``mask``; lets cuDNN skip the masked blocks (fast path for LM
            training). Ignored while decoding from a filled cache (the cache mask is causal).
          key_value_lengths: int ``[B]``: keys ``s >= length[b]`` are masked (right padding)
            without a mask array (cuDNN's padding path).
          kv_from_cache: cross-attention while decoding with the keys/values stored by an
            earlier ``decode=True`` call that passed ``inputs_kv`` (needs ``decode=True``;
            ``inputs_kv`` is then optional and ignored).
          positions: int ``[B|1, T]`` rotary positions of the queries/new keys (only with
            ``rope_theta``; default ``0..T-1``, or the cache index onwards while decoding).
          cross_cache_offset: int (or i32 scalar) while decoding cross-attention with
            ``inputs_kv [B, Sn, Dkv]``: write the Sn new keys/values at slots ``offset ..
            offset+Sn-1`` of the existing cross cache ``[B, S, H, K]`` (made by `init_cache` for
            the full length S) instead of replacing it, and attend over all S slots (``mask``
            ``[B|1, 1, T, S]``). Grows the media cache one image at a time (multi-image dialogue).
        Returns:
          ``[B, T, Dout]``.
        """
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"MultiHeadAttention.implementation={self.implementation!r}; "
                             f"use one of {IMPLEMENTATIONS}.")
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [B, T, D]; got shape {inputs_q.shape}.")
        if kv_from_cache and not decode:
            raise ValueError("MultiHeadAttention(kv_from_cache=True) reads the cross-attention KV cache and needs "
                             "decode=True; without decode pass inputs_kv=[B, S, Dkv] instead.")
        self_attention = inputs_kv is None and not kv_from_cache
        if self_attention:
            inputs_kv = inputs_q
        elif inputs_kv is not None and (inputs_kv.ndim != 3 or inputs_kv.shape[0] != inputs_q.shape[0]):
            raise ValueError(f"inputs_kv must be [B, S, Dkv] with B={inputs_q.shape[0]}; got {inputs_kv.shape}.")

        if self.num_heads % self.kv_heads:
            raise ValueError(f"MultiHeadAttention.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}.")
        if self.rope_theta is not None and not self_attention:
            raise ValueError("MultiHeadAttention.rope_theta (rotary positions) is for self-attention only; "
                             "build the cross-attention layer with rope_theta=None.")
        out_dim = self.out_features or inputs_q.shape[-1]
        kv_axes = GQA_KV_AXES if self.grouped else QKV_AXES
        q = self._proj("query", inputs_q)            # [B, T, H, K]
        if kv_from_cache:
            k, v = self._cached_cross_kv(q.shape[0])  # [B, S, Hkv, K] each, no projection
        else:
            k = self._proj("key", inputs_kv, self.kv_heads)       # [B, S, Hkv, K]
            v = self._proj("value", inputs_kv, self.kv_heads)     # [B, S, Hkv, K]
        if self.qk_norm is not None:       # a norm over each head's K dims of q and of the new k (IDEFICS)
            from vlm_jax.layers.norms import make_norm
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            q = make_norm(self.qk_norm, self.qk_norm_eps, name="query_norm", **kw)(q).astype(self.dtype)
            if not kv_from_cache:
                k = make_norm(self.qk_norm, self.qk_norm_eps, name="key_norm", **kw)(k).astype(self.dtype)
        if self.rope_theta is not None:
            pos = self._positions(positions, q.shape[0], q.shape[1], decode)
            q = apply_rotary(q, pos, self.rope_theta)
            k = apply_rotary(k, pos, self.rope_theta)
        q = checkpoint_name(nn.with_logical_constraint(q, QKV_AXES), "query_proj")
        if not kv_from_cache:
            k = checkpoint_name(nn.with_logical_constraint(k, kv_axes), "key_proj")
            v = checkpoint_name(nn.with_logical_constraint(v, kv_axes), "value_proj")

        if decode and self_attention:
            k, v, cache_mask = self._update_cache(k, v)
            if cache_mask is not None:
                if mask is not None and mask.shape[-1] != k.shape[1]:
                    raise ValueError(f"While decoding the mask must cover the cache length S={k.shape[1]}; "
                                     f"got mask shape {mask.shape}.")
                mask = cache_mask if mask is None else jnp.logical_and(mask, cache_mask)
                is_causal = False
        elif decode and not kv_from_cache:
            k, v = self._store_cross_kv(k, v, cross_cache_offset)   # what kv_from_cache calls will read back
        elif cross_cache_offset is not None:
            raise ValueError("MultiHeadAttention(cross_cache_offset=...) writes new keys/values into the cross cache "
                             "and needs decode=True with inputs_kv (not kv_from_cache).")

        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        mask = _check_mask(mask, "mask", b, t, s)
        if bias is not None:
            if bias.ndim != 4:
                raise ValueError(f"bias must be rank 4 [B|1, H|1, T, S]; got shape {bias.shape}.")
            bias = bias.astype(self.dtype)

        if key_value_lengths is not None:
            key_value_lengths = jnp.asarray(key_value_lengths, jnp.int32)
            if key_value_lengths.shape != (b,):
                raise ValueError(f"key_value_lengths must be int [B={b}]; got shape {key_value_lengths.shape}.")
        dropout = self.dropout_rate > 0.0 and not deterministic
        kernel = attention_kernel(self.implementation, dropout=dropout)
        if kernel == "xla" or self.zero_empty_rows:
            # the XLA path and the empty-row test need the full boolean mask
            if is_causal:
                causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
                mask = causal[None, None] if mask is None else jnp.logical_and(mask, causal[None, None])
            if key_value_lengths is not None:
                kv_ok = (jnp.arange(s)[None, :] < key_value_lengths[:, None])[:, None, None, :]
                mask = kv_ok if mask is None else jnp.logical_and(mask, kv_ok)
            is_causal, key_value_lengths = False, None
        if kernel == "xla":
            out = self._xla_attention(q, k, v, mask, bias, dropout)
        else:
            out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=self.scale,
                                               is_causal=is_causal, key_value_seq_lengths=key_value_lengths,
                                               implementation="cudnn" if kernel == "cudnn" else None)
        row_has_key = None
        if self.zero_empty_rows and mask is not None:
            has_key = jnp.any(mask, axis=-1, keepdims=True)       # [B|1, 1|H, T, 1]
            # heads whose row is empty contribute nothing; a row empty in every head is zeroed
            # after the output projection too, so its bias does not leak in
            out = out * jnp.transpose(has_key, (0, 2, 1, 3)).astype(out.dtype)   # [B|1, T, 1|H, 1]
            row_has_key = jnp.any(has_key, axis=1)                                # [B|1, T, 1]
        out = Dense(out_dim, ("heads", "kv", "embed"), use_bias=self.out_bias, contract=2, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="out")(out)
        if row_has_key is not None:
            out = jnp.where(row_has_key, out, jnp.zeros((), out.dtype))
        out = nn.with_logical_constraint(out, OUT_AXES)
        return checkpoint_name(out, "attention_out")

    def _xla_attention(self, q, k, v, mask, bias, dropout: bool):
        """The XLA path: ``softmax(q k^T * scale + bias, masked)`` (float32 logits, dropout
        on the probabilities when ``dropout``) times v; q ``[B,T,H,K]``, k/v ``[B,S,Hkv,K]``
        (repeated to H heads: head h reads kv head h // G) -> ``[B,T,H,K]``."""
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        if k.shape[2] != q.shape[2]:
            groups = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        logits = attention_logits(q, k, scale, bias)                                # [B, H, T, S] f32
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = softmax_with_saved_probs(logits)
        if dropout:
            probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
        return jnp.einsum("bhts,bshk->bthk", probs.astype(self.dtype), v)

    def _store_cross_kv(self, k, v, offset=None):
        """Store cross-attention ``k, v [B, S, H, K]`` in the cache (create on the first call), or
        with ``offset`` write ``[B, Sn, H, K]`` into slots offset..offset+Sn-1 of the existing
        ``[B, S, H, K]`` one; -> the stored values (all S slots)."""
        if offset is not None:
            if not self.has_variable("cache", "cached_cross_key"):
                raise ValueError("cross_cache_offset writes into an existing cross-attention KV cache; make it first "
                                 "with init_cache(...) given inputs of the full encoder/media length.")
            cached_key = self.variable("cache", "cached_cross_key")
            cached_value = self.variable("cache", "cached_cross_value")
            full = cached_key.value.shape
            if k.shape[0] != full[0] or k.shape[2:] != full[2:] or k.shape[1] > full[1]:
                raise ValueError(f"cross_cache_offset: new keys {k.shape} [B, Sn, H, K] do not fit the cross cache "
                                 f"{full} [B, S, H, K].")
            off = jnp.asarray(offset, jnp.int32)
            concrete_check(off + k.shape[1] <= full[1],
                           f"cross_cache_offset={offset} + {k.shape[1]} new slots exceeds the cross cache length {full[1]}.")
            cached_key.value = jax.lax.dynamic_update_slice_in_dim(
                cached_key.value, k.astype(cached_key.value.dtype), off, axis=1)
            cached_value.value = jax.lax.dynamic_update_slice_in_dim(
                cached_value.value, v.astype(cached_value.value.dtype), off, axis=1)
            return cached_key.value, cached_value.value
        cached_key = self.variable("cache", "cached_cross_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_cross_value", jnp.zeros, v.shape, v.dtype)
        if cached_key.value.shape != k.shape:
            raise ValueError(f"the cross-attention KV cache holds keys {cached_key.value.shape} [B, S, H, K] but "
                             f"inputs_kv gives {k.shape}; re-create the cache (init_cache) for this batch and "
                             "encoder/media length.")
        cached_key.value = k.astype(cached_key.value.dtype)
        cached_value.value = v.astype(cached_value.value.dtype)
        return cached_key.value, cached_value.value

    def _cached_cross_kv(self, b):
        """The stored cross-attention keys/values ``[B, S, H, K]`` (for ``kv_from_cache``)."""
        if not self.has_variable("cache", "cached_cross_key"):
            raise ValueError("kv_from_cache=True but this attention layer has no cross-attention KV cache "
                             "('cached_cross_key'): fill it first with a decode=True call that passes inputs_kv, "
                             "or make the cache with init_cache(...) given the encoder/media input.")
        k = self.get_variable("cache", "cached_cross_key")
        v = self.get_variable("cache", "cached_cross_value")
        if k.shape[0] != b:
            raise ValueError(f"the cross-attention KV cache holds batch {k.shape[0]} but the input has batch {b}; "
                             "re-create the cache for this batch (beam search must repeat it to batch*beam).")
        axes = GQA_KV_AXES if self.grouped else QKV_AXES
        k = nn.with_logical_constraint(k, axes)
        v = nn.with_logical_constraint(v, axes)
        return k, v

    def _update_cache(self, k, v):
        """Write ``k, v [B, T, H, K]`` at each row's cache index; -> full cache and its mask."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index",
                                    lambda: jnp.zeros((k.shape[0],), jnp.int32))
        if not initialized:
            # First call only shapes the cache (length = this input's length); plain attention.
            return k, v, None
        b, t = k.shape[0], k.shape[1]
        cb, s = cached_key.value.shape[0], cached_key.value.shape[1]
        if cb != b:
            raise ValueError(f"KV cache holds batch {cb} but the input has batch {b}; re-create the cache "
                             "for this batch (beam search must repeat the cache to batch*beam).")
        if t > s:
            raise ValueError(f"decoding {t} new tokens does not fit a KV cache of length {s}.")
        idx = cache_index.value                                         # [B]
        write = jax.vmap(lambda c, n, i: lax.dynamic_update_slice(c, n.astype(c.dtype), (i, 0, 0)))
        cached_key.value = write(cached_key.value, k, idx)
        cached_value.value = write(cached_value.value, v, idx)
        cache_index.value = idx + t
        q_pos = idx[:, None] + jnp.arange(t)[None, :]                   # [B, T]
        mask = jnp.arange(s)[None, None, :] <= q_pos[:, :, None]        # [B, T, S]
        return cached_key.value, cached_value.value, mask[:, None]


CROSS_CACHE_LEAVES = ("cached_cross_key", "cached_cross_value")


def _is_cross_leaf(path) -> bool:
    return getattr(path[-1], "key", None) in CROSS_CACHE_LEAVES


def concrete_check(cond, message: str) -> None:
    """Raise ValueError(message) when ``cond`` is a concrete False (skipped under jit: traced
    values cannot be checked on the host)."""
    try:
        ok = bool(cond)
    except jax.errors.ConcretizationTypeError:
        return
    if not ok:
        raise ValueError(message)


def init_cache(module: nn.Module, params, *args, **kwargs):
    """KV cache ready for decoding with ``module`` (any module whose attention layers take
    ``decode``): runs ``module.apply`` with ``decode=True`` on full-length inputs ``*args``
    and returns the ``'cache'`` collection.

    Self-attention leaves are empty (zeros; indices 0): the arrays in ``args`` only fix B and
    the cache length S. Cross-attention leaves (``cached_cross_key/value``, present when an
    attention layer gets ``inputs_kv`` with ``decode=True``) hold the keys/values projected
    from the encoder/media input passed in ``args``/``kwargs``, so later calls can use
    ``kv_from_cache``. Without cross-attention this only traces the module (`jax.eval_shape`);
    with it the module runs once for real (under `jax.jit` XLA keeps only the key/value
    projections, the rest of that call is dead code)."""
    def shape_cache(p, *a):
        return module.apply({"params": p}, *a, decode=True, mutable=["cache"], **kwargs)[1]["cache"]
    shapes = jax.eval_shape(shape_cache, params, *args)
    if not any(_is_cross_leaf(path) for path, _ in jax.tree_util.tree_leaves_with_path(shapes)):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    filled = shape_cache(params, *args)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if _is_cross_leaf(path) else jnp.zeros(x.shape, x.dtype), filled)


# API-STABLE
