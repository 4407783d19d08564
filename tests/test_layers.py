"""Tests for vlm_jax.layers: masks, attention (+KV cache), MLP, transformer blocks/stacks.

Oracles: torch.nn.MultiheadAttention, HF BertLayer (post-LN + cross-attention), plain
numpy formulas. Tiny sizes only.
"""
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vlm_jax.layers import masks  # noqa: E402
from vlm_jax.layers.attention import (MultiHeadAttention, attention_kernel, init_cache,  # noqa: E402
                                      softmax_with_saved_probs)
from vlm_jax.layers.mlp import MLP  # noqa: E402
from vlm_jax.convert.common import stack_params  # noqa: E402
from vlm_jax.layers.attention import attention_logits  # noqa: E402
from vlm_jax.layers.transformer import (REMAT_POLICIES, BlockConfig, InsertSpec, TransformerBlock,  # noqa: E402
                                        TransformerStack, periodic_pattern)

torch.set_num_threads(1)
ATOL = 1e-4
B, T, D, H, K = 2, 6, 16, 4, 4


def _rand(*shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _x(seed=0, shape=(B, T, D)):
    return jnp.asarray(_rand(*shape, seed=seed))


def _perturb(params, seed=0, scale=0.3):
    """Random (non-default) values for every leaf so biases/norm params are exercised."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(size=l.shape).astype(np.float32) * scale) for l in leaves]
    return jax.tree.unflatten(tree, new)


# ------------------------------------------------------------------------------ masks
def test_causal_and_padding_masks():
    c = np.asarray(masks.causal_mask(4))
    assert c.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(c[0, 0], np.tril(np.ones((4, 4), bool)))
    c2 = np.asarray(masks.causal_mask(2, 4, offset=2))[0, 0]
    np.testing.assert_array_equal(c2, [[1, 1, 1, 0], [1, 1, 1, 1]])
    p = np.asarray(masks.padding_mask(np.array([[1, 1, 0], [1, 0, 0]])))
    assert p.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(p[:, 0, 0], [[1, 1, 0], [1, 0, 0]])
    comb = np.asarray(masks.combine(masks.causal_mask(3), None, masks.padding_mask([[1, 1, 0]])))
    np.testing.assert_array_equal(comb[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    assert masks.combine(None, None) is None
    with pytest.raises(ValueError, match="key_valid"):
        masks.padding_mask(np.ones(3))


def test_prefix_lm_mask():
    m = np.asarray(masks.prefix_lm_mask(np.array([2, 0]), 4))
    assert m.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(m[0, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(m[1, 0], np.tril(np.ones((4, 4), bool)))


def test_qformer_masks_hand_examples():
    tv = np.array([[1, 1, 0]])        # Q=2 queries, 3 text tokens, last padded
    itc = np.asarray(masks.qformer_itc_mask(2, tv))[0, 0].astype(int)
    np.testing.assert_array_equal(itc, [[1, 1, 0, 0, 0],
                                        [1, 1, 0, 0, 0],
                                        [0, 0, 1, 1, 0],
                                        [0, 0, 1, 1, 0],
                                        [0, 0, 1, 1, 0]])
    itm = np.asarray(masks.qformer_itm_mask(2, tv))[0, 0].astype(int)
    np.testing.assert_array_equal(itm, [[1, 1, 1, 1, 0]] * 5)
    itg = np.asarray(masks.qformer_itg_mask(2, tv))[0, 0].astype(int)
    np.testing.assert_array_equal(itg, [[1, 1, 0, 0, 0],
                                        [1, 1, 0, 0, 0],
                                        [1, 1, 1, 0, 0],
                                        [1, 1, 1, 1, 0],
                                        [1, 1, 1, 1, 0]])


def test_flamingo_media_mask_hand_example():
    # tokens: "a <image> b c <image> d" -> text_time = cumsum(is_image) = [0, 1, 1, 1, 2, 2]
    is_image = np.array([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]])
    text_time = np.cumsum(is_image, axis=1)
    media_valid = np.array([[1, 1], [1, 0]])
    m = np.asarray(masks.flamingo_media_mask(text_time, media_valid, latents_per_media=2)).astype(int)
    assert m.shape == (2, 1, 6, 4)
    np.testing.assert_array_equal(m[0, 0], [[0, 0, 0, 0],
                                            [1, 1, 0, 0],
                                            [1, 1, 0, 0],
                                            [1, 1, 0, 0],
                                            [0, 0, 1, 1],
                                            [0, 0, 1, 1]])
    np.testing.assert_array_equal(m[1, 0], [[0, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 4)
    rows = np.asarray(masks.rows_with_any(m))[:, 0, :, 0]
    np.testing.assert_array_equal(rows, [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


# -------------------------------------------------------------------------- attention
def _torch_mha_from(params, d_q, d_kv):
    """torch.nn.MultiheadAttention holding our MultiHeadAttention params."""
    p = jax.tree.map(np.array, nn.unbox(params))
    mha = torch.nn.MultiheadAttention(H * K, H, bias=True, batch_first=True, kdim=d_kv, vdim=d_kv)
    assert d_q == H * K
    with torch.no_grad():
        wq = p["query"]["kernel"].reshape(d_q, H * K).T
        wk = p["key"]["kernel"].reshape(d_kv, H * K).T
        wv = p["value"]["kernel"].reshape(d_kv, H * K).T
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([wq, wk, wv], 0)))
        else:
            mha.q_proj_weight.copy_(torch.from_numpy(wq))
            mha.k_proj_weight.copy_(torch.from_numpy(wk))
            mha.v_proj_weight.copy_(torch.from_numpy(wv))
        mha.in_proj_bias.copy_(torch.from_numpy(np.concatenate(
            [p[n]["bias"].reshape(-1) for n in ("query", "key", "value")])))
        mha.out_proj.weight.copy_(torch.from_numpy(p["out"]["kernel"].reshape(H * K, -1).T))
        mha.out_proj.bias.copy_(torch.from_numpy(p["out"]["bias"]))
    return mha.eval()


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_torch_with_padding(cross):
    s, d_kv = (5, 12) if cross else (T, D)
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    xq = _x(1)
    xkv = _x(2, (B, s, d_kv)) if cross else None
    params = _perturb(m.init(jax.random.key(0), xq, xkv)["params"], seed=3)
    mha = _torch_mha_from(params, D, d_kv)
    key_valid = np.ones((B, s), bool)
    key_valid[1, -2:] = False
    for seed in range(3):     # several random inputs
        xq = _x(10 + seed)
        xkv = _x(20 + seed, (B, s, d_kv)) if cross else None
        mask = masks.padding_mask(key_valid)
        if not cross:
            mask = masks.combine(mask, masks.causal_mask(T))
        ours = np.asarray(m.apply({"params": params}, xq, xkv, mask=mask))
        kv_t = torch.from_numpy(np.array(xkv if cross else xq))
        attn_mask = None if cross else torch.from_numpy(~np.tril(np.ones((T, T), bool)))
        with torch.no_grad():
            ref, _ = mha(torch.from_numpy(np.array(xq)), kv_t, kv_t, key_padding_mask=torch.from_numpy(~key_valid),
                         attn_mask=attn_mask, need_weights=False)
        np.testing.assert_allclose(ours, ref.numpy(), atol=ATOL, rtol=0)


def test_attention_bias_scale_and_dropout_path():
    """T5 style: no scaling, additive relative bias; the explicit (dropout) path agrees."""
    m = MultiHeadAttention(num_heads=H, head_dim=K, use_bias=False, out_bias=False, scale=1.0)
    x = _x(4)
    params = _perturb(m.init(jax.random.key(0), x)["params"], seed=5)
    bias = jnp.asarray(_rand(1, H, T, T, seed=6))
    mask = masks.combine(masks.causal_mask(T), masks.padding_mask(np.array([[1] * T, [1] * (T - 1) + [0]])))
    ours = np.asarray(m.apply({"params": params}, x, mask=mask, bias=bias))
    p = jax.tree.map(np.asarray, nn.unbox(params))
    xn = np.asarray(x)
    q = np.einsum("btd,dhk->bhtk", xn, p["query"]["kernel"])
    k = np.einsum("btd,dhk->bhtk", xn, p["key"]["kernel"])
    v = np.einsum("btd,dhk->bhtk", xn, p["value"]["kernel"])
    logits = q @ k.transpose(0, 1, 3, 2) + np.asarray(bias)
    logits = np.where(np.asarray(mask), logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bhsk,hkd->btd", w, v, p["out"]["kernel"])
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # The explicit einsum path (taken when dropout is active) with a negligible rate agrees.
    md = MultiHeadAttention(num_heads=H, head_dim=K, use_bias=False, out_bias=False, scale=1.0, dropout_rate=1e-7)
    expl = np.asarray(md.apply({"params": params}, x, mask=mask, bias=bias, deterministic=False,
                               rngs={"dropout": jax.random.key(1)}))
    np.testing.assert_allclose(expl, ref, atol=ATOL, rtol=0)
    # A real dropout rate changes the output; deterministic=True ignores it.
    md = MultiHeadAttention(num_heads=H, head_dim=K, use_bias=False, out_bias=False, scale=1.0, dropout_rate=0.5)
    dropped = np.asarray(md.apply({"params": params}, x, mask=mask, bias=bias, deterministic=False,
                                  rngs={"dropout": jax.random.key(1)}))
    assert np.abs(dropped - ref).max() > 1e-2
    np.testing.assert_allclose(np.asarray(md.apply({"params": params}, x, mask=mask, bias=bias)), ref,
                               atol=ATOL, rtol=0)


def test_attention_is_causal_and_lengths_equal_mask_arrays():
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    x = _x(30)
    params = _perturb(m.init(jax.random.key(0), x)["params"], seed=31)
    lengths = np.array([T, T - 2])
    mask = masks.combine(masks.causal_mask(T), masks.padding_mask(np.arange(T)[None] < lengths[:, None]))
    ref = np.asarray(m.apply({"params": params}, x, mask=mask))
    fused = np.asarray(m.apply({"params": params}, x, is_causal=True, key_value_lengths=lengths))
    np.testing.assert_allclose(fused, ref, atol=ATOL, rtol=0)
    # the explicit (dropout) path builds the same mask itself
    md = m.clone(dropout_rate=1e-7)
    expl = np.asarray(md.apply({"params": params}, x, is_causal=True, key_value_lengths=lengths, deterministic=False,
                               rngs={"dropout": jax.random.key(0)}))
    np.testing.assert_allclose(expl, ref, atol=ATOL, rtol=0)
    # causal alone differs from causal + lengths on the padded row only
    causal_only = np.asarray(m.apply({"params": params}, x, is_causal=True))
    np.testing.assert_allclose(causal_only[0], ref[0], atol=ATOL, rtol=0)
    assert np.abs(causal_only[1, -1] - ref[1, -1]).max() > 1e-3


def test_softmax_with_saved_probs_values_and_gradients():
    """The XLA path's softmax: same values and VJP as jax.nn.softmax (incl. masked logits at
    finfo.min), and its VJP agrees with finite differences."""
    logits = jnp.asarray(_rand(2, 3, 5, 7, seed=40, scale=3.0))
    masked = jnp.where(jnp.asarray(_rand(2, 1, 5, 7, seed=41)) > 0.5, jnp.finfo(jnp.float32).min, logits)
    cot = jnp.asarray(_rand(2, 3, 5, 7, seed=42))
    for z in (logits, masked):
        np.testing.assert_allclose(softmax_with_saved_probs(z), jax.nn.softmax(z, axis=-1), atol=1e-6, rtol=0)
        ours = jax.vjp(softmax_with_saved_probs, z)[1](cot)[0]
        ref = jax.vjp(lambda a: jax.nn.softmax(a, axis=-1), z)[1](cot)[0]
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    # finite differences of a float64 numpy softmax (independent of both JAX softmaxes)
    z0, g0 = np.asarray(logits[0, 0], np.float64), np.asarray(cot[0, 0], np.float64)   # [5, 7]

    def f(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return float(np.sum(g0 * e / e.sum(-1, keepdims=True)))

    eps, fd = 1e-6, np.zeros_like(z0)
    for idx in np.ndindex(*z0.shape):
        dz = np.zeros_like(z0)
        dz[idx] = eps
        fd[idx] = (f(z0 + dz) - f(z0 - dz)) / (2 * eps)
    ours = jax.vjp(softmax_with_saved_probs, logits[0, 0])[1](cot[0, 0])[0]
    np.testing.assert_allclose(ours, fd, atol=1e-5, rtol=0)


def test_attention_kernel_choice():
    assert attention_kernel(None) == ("dot_product_attention" if jax.default_backend() == "gpu" else "xla")
    assert attention_kernel("xla") == "xla"
    assert attention_kernel("cudnn") == "cudnn"
    assert attention_kernel("cudnn", dropout=True) == "xla"


@pytest.mark.parametrize("variant", ["mask_bias", "causal_lengths", "cross"])
def test_xla_attention_path_equals_dot_product_attention(variant):
    """The project's XLA attention path (default on CPU) gives the same outputs and gradients
    (wrt inputs and every parameter) as the same layer computed with
    jax.nn.dot_product_attention, JAX's own kernel."""
    m = MultiHeadAttention(num_heads=H, head_dim=K, implementation="xla")
    x = _x(50)
    media = _x(51, (B, T + 2, D)) if variant == "cross" else None
    s = T + 2 if variant == "cross" else T
    params = _perturb(m.init(jax.random.key(0), x, media)["params"], seed=52)
    kw, dpa_kw = {}, {}
    if variant == "mask_bias":
        mask = masks.combine(masks.causal_mask(T), masks.padding_mask(np.array([[1] * T, [1] * (T - 2) + [0, 0]])))
        bias = jnp.asarray(_rand(1, H, T, T, seed=53))
        kw = dpa_kw = dict(mask=mask, bias=bias)
    elif variant == "causal_lengths":
        lengths = jnp.array([T, T - 3])
        kw = dict(is_causal=True, key_value_lengths=lengths)
        dpa_kw = dict(is_causal=True, key_value_seq_lengths=lengths)
    else:
        kw = dpa_kw = dict(mask=masks.padding_mask(np.arange(s)[None] < np.array([[s], [s - 3]]).reshape(B, 1)))

    def ours(p, x, media):
        return m.apply({"params": p}, x, media, **kw)

    def reference(p, x, media):
        p = nn.unbox(p)
        kv = x if media is None else media
        proj = lambda n, a: jnp.einsum("btd,dhk->bthk", a, p[n]["kernel"]) + p[n]["bias"]  # noqa: E731
        o = jax.nn.dot_product_attention(proj("query", x), proj("key", kv), proj("value", kv), **dpa_kw)
        return jnp.einsum("bthk,hkd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]

    cot = jnp.asarray(_rand(B, T, D, seed=54))
    out, vjp = jax.vjp(ours, params, x, media)
    ref_out, ref_vjp = jax.vjp(reference, params, x, media)
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
    for g, r in zip(jax.tree.leaves(vjp(cot)), jax.tree.leaves(ref_vjp(cot))):
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=1e-4)


def test_attention_zero_empty_rows():
    text_time = np.array([[0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1]])
    mask = masks.flamingo_media_mask(text_time, np.ones((B, 2)), 3)
    media = _x(7, (B, 6, D))
    m = MultiHeadAttention(num_heads=H, head_dim=K, zero_empty_rows=True)      # with an output bias
    x = _x(8)
    params = _perturb(nn.unbox(m.init(jax.random.key(0), x, media)["params"]), seed=9)
    assert np.abs(np.asarray(params["out"]["bias"])).min() > 0
    out = np.asarray(m.apply({"params": params}, x, media, mask=mask))
    np.testing.assert_array_equal(out[0, 0], 0.0)                 # exactly zero, bias included
    np.testing.assert_array_equal(out[1, :2], 0.0)
    assert np.abs(out[0, 1:]).min() > 0
    plain = np.asarray(MultiHeadAttention(num_heads=H, head_dim=K).apply(
        {"params": params}, x, media, mask=mask))
    assert np.abs(plain[0, 0]).max() > 1e-3           # the softmax alone would not give zeros
    np.testing.assert_allclose(out[0, 1:], plain[0, 1:], atol=1e-6)


def test_attention_zero_empty_rows_per_head_mask():
    """A row empty in only some heads keeps the bias and the other heads; empty in all -> 0."""
    m = MultiHeadAttention(num_heads=2, head_dim=K, zero_empty_rows=True)
    x, media = _x(10), _x(11, (B, 3, D))
    params = _perturb(nn.unbox(m.init(jax.random.key(0), x, media)["params"]), seed=12)
    mask = np.ones((B, 2, T, 3), bool)
    mask[:, 0, 0] = False                    # row 0: head 0 empty, head 1 not
    mask[:, :, 1] = False                    # row 1: empty in both heads
    out = np.asarray(m.apply({"params": params}, x, media, mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(out[:, 1], 0.0)
    assert np.abs(out[:, 0]).min() > 0


def test_attention_logits_bf16_accumulate_in_float32():
    """bf16 q, k: the logits are the f32 product of the same bf16 values, not a bf16-rounded one."""
    q = jnp.asarray(_rand(2, 5, 3, 24, seed=13, scale=3.0)).astype(jnp.bfloat16)     # [B, T, H, K]
    k = jnp.asarray(_rand(2, 7, 3, 24, seed=14, scale=3.0)).astype(jnp.bfloat16)     # [B, S, H, K]
    got = attention_logits(q, k, 0.25)
    assert got.dtype == jnp.float32
    want = np.einsum("bthk,bshk->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 0.25
    rel = np.abs(np.asarray(got, np.float64) - want) / np.maximum(np.abs(want), 1.0)
    assert rel.max() < 1e-6, rel.max()
    rounded = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) * 0.25            # the old, rounded path
    assert (np.abs(np.asarray(rounded, np.float64) - want) / np.maximum(np.abs(want), 1.0)).max() > 1e-4


def test_attention_rejects_bad_masks():
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    x = _x(0)
    params = m.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="rank 4"):
        m.apply({"params": params}, x, mask=jnp.ones((B, T), bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        m.apply({"params": params}, x, mask=jnp.ones((B, 1, T, T + 1), bool))
    with pytest.raises(ValueError, match="implementation"):
        MultiHeadAttention(num_heads=H, head_dim=K, implementation="flash").apply({"params": params}, x)


def test_kv_cache_incremental_equals_full_causal():
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    x = _x(9)
    params = _perturb(m.init(jax.random.key(0), x)["params"], seed=11)
    full = np.asarray(m.apply({"params": params}, x, mask=masks.causal_mask(T)))
    cache = init_cache(m, params, x)
    for leaf in jax.tree.leaves(cache):        # decoding contract: leading batch dim everywhere
        assert leaf.shape[0] == B
    # token by token
    c, outs = cache, []
    step = jax.jit(lambda c, xt: m.apply({"params": params, "cache": c}, xt, decode=True, mutable=["cache"]))
    for t in range(T):
        y, v = step(c, x[:, t:t + 1])
        c, outs = v["cache"], outs + [np.asarray(y)]
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(c["cache_index"]), [T, T])
    # prefill a chunk of 4, then 2 more
    y1, v = m.apply({"params": params, "cache": cache}, x[:, :4], decode=True, mutable=["cache"])
    y2, _ = m.apply({"params": params, "cache": v["cache"]}, x[:, 4:], decode=True, mutable=["cache"])
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), full, atol=ATOL, rtol=0)
    # beam-style reorder: gather every cache leaf on axis 0, continue -> same as full on swapped rows
    y1, v = m.apply({"params": params, "cache": cache}, x[:, :4], decode=True, mutable=["cache"])
    swapped = jax.tree.map(lambda a: a[jnp.array([1, 0])], v["cache"])
    xs = x[jnp.array([1, 0])]
    y2, _ = m.apply({"params": params, "cache": swapped}, xs[:, 4:], decode=True, mutable=["cache"])
    full_s = np.asarray(m.apply({"params": params}, xs, mask=masks.causal_mask(T)))
    np.testing.assert_allclose(np.asarray(y2), full_s[:, 4:], atol=ATOL, rtol=0)


def test_kv_cache_per_row_index():
    """Rows at different cache positions: row 0 rewinds to position 2, row 1 continues at 4."""
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    x = _x(12)
    params = _perturb(m.init(jax.random.key(0), x)["params"], seed=13)
    cache = init_cache(m, params, x)
    _, v = m.apply({"params": params, "cache": cache}, x[:, :4], decode=True, mutable=["cache"])
    c = dict(v["cache"])
    c["cache_index"] = jnp.array([2, 4], jnp.int32)
    new = _x(14, (B, 1, D))
    y, v = m.apply({"params": params, "cache": c}, new, decode=True, mutable=["cache"])
    np.testing.assert_array_equal(np.asarray(v["cache"]["cache_index"]), [3, 5])
    seq0 = jnp.concatenate([x[:1, :2], new[:1]], 1)
    seq1 = jnp.concatenate([x[1:, :4], new[1:]], 1)
    ref0 = np.asarray(m.apply({"params": params}, seq0, mask=masks.causal_mask(3)))[:, -1]
    ref1 = np.asarray(m.apply({"params": params}, seq1, mask=masks.causal_mask(5)))[:, -1]
    np.testing.assert_allclose(np.asarray(y)[0, 0], ref0[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(y)[1, 0], ref1[0], atol=ATOL, rtol=0)


def test_kv_cache_left_padded_prompt():
    """Left padding + key padding mask over the cache length == unpadded sequence."""
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    x = _x(15)
    params = _perturb(m.init(jax.random.key(0), x)["params"], seed=16)
    cache = init_cache(m, params, x)
    valid = np.ones((B, T), bool)
    valid[1, :2] = False                       # row 1 is left-padded by 2
    pad = masks.padding_mask(valid)            # [B, 1, 1, S] over the whole cache
    y1, v = m.apply({"params": params, "cache": cache}, x[:, :4], mask=pad, decode=True, mutable=["cache"])
    y2, _ = m.apply({"params": params, "cache": v["cache"]}, x[:, 4:5], mask=pad, decode=True, mutable=["cache"])
    ref = np.asarray(m.apply({"params": params}, x[1:, 2:5], mask=masks.causal_mask(3)))
    np.testing.assert_allclose(np.asarray(y1)[1, 2:], ref[0, :2], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(y2)[1, 0], ref[0, 2], atol=ATOL, rtol=0)


def test_cross_attention_kv_cache_equals_uncached():
    """Cross-attention decode from the cache == uncached attention (encoder padding mask)."""
    s, d_kv = 5, 12
    m = MultiHeadAttention(num_heads=H, head_dim=K)
    x, enc = _x(40), _x(41, (B, s, d_kv))
    params = _perturb(jax.eval_shape(m.init, jax.random.key(0), x, enc)["params"], seed=42)   # no eager init
    valid = np.ones((B, s), bool)
    valid[1, -2:] = False                      # row 1: last two encoder positions are padding
    pad = masks.padding_mask(valid)
    full = np.asarray(m.apply({"params": params}, x, enc, mask=pad))
    assert np.abs(full[1] - np.asarray(m.apply({"params": params}, x, enc))[1]).max() > 1e-3   # the mask matters
    cache = init_cache(m, params, x, enc)
    assert set(cache) == {"cached_cross_key", "cached_cross_value"}
    for leaf in jax.tree.leaves(cache):
        assert leaf.shape == (B, s, H, K)
    p = jax.tree.map(np.asarray, nn.unbox(params))
    np.testing.assert_allclose(np.asarray(cache["cached_cross_key"]),
                               np.einsum("bsd,dhk->bshk", np.asarray(enc), p["key"]["kernel"]) + p["key"]["bias"],
                               atol=1e-5, rtol=0)
    # token by token from the cache, no inputs_kv
    step = jax.jit(lambda c, xt: m.apply({"params": params, "cache": c}, xt, mask=pad, decode=True,
                                         kv_from_cache=True, mutable=["cache"]))
    c, outs = cache, []
    for t in range(T):
        y, v = step(c, x[:, t:t + 1])
        c, outs = v["cache"], outs + [np.asarray(y)]
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=ATOL, rtol=0)
    for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(cache)):      # reading leaves the cache as it was
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fill with a decode call (no init_cache), then reuse; a given inputs_kv is ignored by kv_from_cache
    y1, v = m.apply({"params": params}, x[:, :2], enc, mask=pad, decode=True, mutable=["cache"])
    y2, _ = m.apply({"params": params, "cache": v["cache"]}, x[:, 2:], enc * 3.0, mask=pad, decode=True,
                    kv_from_cache=True, mutable=["cache"])
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), full, atol=ATOL, rtol=0)
    # a decode call with a new inputs_kv refills the cache
    enc2 = _x(43, (B, s, d_kv))
    _, v = m.apply({"params": params, "cache": cache}, x[:, :1], enc2, mask=pad, decode=True, mutable=["cache"])
    y3, _ = step(v["cache"], x)
    np.testing.assert_allclose(np.asarray(y3), np.asarray(m.apply({"params": params}, x, enc2, mask=pad)),
                               atol=ATOL, rtol=0)
    # beam-style reorder: gather every leaf on axis 0 -> rows follow
    swap = jnp.array([1, 0])
    y4, _ = m.apply({"params": params, "cache": jax.tree.map(lambda a: a[swap], cache)}, x[swap], mask=pad[swap],
                    decode=True, kv_from_cache=True, mutable=["cache"])
    np.testing.assert_allclose(np.asarray(y4), full[np.array([1, 0])], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no cross-attention KV cache"):
        m.apply({"params": params}, x, decode=True, kv_from_cache=True, mutable=["cache"])
    with pytest.raises(ValueError, match="needs decode=True"):
        m.apply({"params": params}, x, kv_from_cache=True)
    with pytest.raises(ValueError, match="re-create the cache"):
        m.apply({"params": params, "cache": cache}, x, enc[:, :3], decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="batch"):
        m.apply({"params": params, "cache": cache}, x[:1], decode=True, kv_from_cache=True, mutable=["cache"])


# -------------------------------------------------------------------------------- MLP
_ACTS = {
    "gelu": lambda h: torch.nn.functional.gelu(h),
    "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    "relu": torch.relu,
    "squared_relu": lambda h: torch.relu(h) ** 2,
}


@pytest.mark.parametrize("act", list(_ACTS) + ["gated_gelu"])
def test_mlp_variants(act):
    m = MLP(hidden_dim=24, activation=act)
    x = _x(17)
    params = _perturb(m.init(jax.random.key(0), x)["params"], seed=18)
    ours = np.asarray(m.apply({"params": params}, x))
    p = {k: {n: torch.from_numpy(np.array(a)) for n, a in v.items()} for k, v in nn.unbox(params).items()}
    xt = torch.from_numpy(np.array(x))
    if act == "gated_gelu":      # T5 v1.1: gelu_new(x wi_0) * (x wi_1) -> wo
        h = torch.nn.functional.gelu(xt @ p["wi_0"]["kernel"] + p["wi_0"]["bias"], approximate="tanh") * \
            (xt @ p["wi_1"]["kernel"] + p["wi_1"]["bias"])
    else:
        h = _ACTS[act](xt @ p["wi"]["kernel"] + p["wi"]["bias"])
    ref = (h @ p["wo"]["kernel"] + p["wo"]["bias"]).numpy()
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="activation"):
        MLP(hidden_dim=8, activation="swishy").init(jax.random.key(0), x)


# ------------------------------------------------------------------------ transformer
def test_post_ln_block_with_cross_attention_matches_hf_bert_layer():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer
    cfg = BertConfig(hidden_size=D, num_attention_heads=H, intermediate_size=32, is_decoder=True,
                     add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = BertLayer(cfg).eval()
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_(0, 0.3)
    blk = TransformerBlock(BlockConfig(num_heads=H, head_dim=K, mlp_dim=32, activation="gelu",
                                       norm_position="post", norm_eps=cfg.layer_norm_eps, cross_attention=True))
    sd = {k: v.numpy() for k, v in layer.state_dict().items()}
    hk = lambda w: w.T.reshape(w.shape[1], H, K)  # noqa: E731

    def attn(pre):
        return {n: {"kernel": hk(sd[f"{pre}.self.{n}.weight"]), "bias": sd[f"{pre}.self.{n}.bias"].reshape(H, K)}
                for n in ("query", "key", "value")} | {
            "out": {"kernel": sd[f"{pre}.output.dense.weight"].T.reshape(H, K, D),
                    "bias": sd[f"{pre}.output.dense.bias"]}}

    ln = lambda pre: {"scale": sd[f"{pre}.weight"], "bias": sd[f"{pre}.bias"]}  # noqa: E731
    params = {"attn": attn("attention"), "attn_norm": ln("attention.output.LayerNorm"),
              "cross_attn": attn("crossattention"), "cross_norm": ln("crossattention.output.LayerNorm"),
              "mlp": {"wi": {"kernel": sd["intermediate.dense.weight"].T, "bias": sd["intermediate.dense.bias"]},
                      "wo": {"kernel": sd["output.dense.weight"].T, "bias": sd["output.dense.bias"]}},
              "mlp_norm": ln("output.LayerNorm")}
    x, enc = _x(20), _x(21, (B, 5, D))
    valid = np.ones((B, T), bool)
    valid[0, -1] = False
    enc_valid = np.ones((B, 5), bool)
    enc_valid[1, -2:] = False
    self_mask = np.asarray(masks.combine(masks.causal_mask(T), masks.padding_mask(valid)))
    cross_mask = np.asarray(masks.padding_mask(enc_valid))
    ours = np.asarray(blk.apply({"params": params}, x, self_mask, encoded=enc, cross_mask=cross_mask))
    neg = torch.finfo(torch.float32).min
    add = lambda mk: torch.from_numpy(np.where(mk, 0.0, neg).astype(np.float32))  # noqa: E731
    with torch.no_grad():
        ref = layer(torch.from_numpy(np.array(x)), attention_mask=add(self_mask),
                    encoder_hidden_states=torch.from_numpy(np.array(enc)), encoder_attention_mask=add(cross_mask))
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def _stack_params_unrolled_to_scanned(p, n, **kw):
    return jax.tree.map(jnp.asarray, stack_params(p, n, **kw))


def test_stack_scan_remat_equals_unrolled_and_hidden_states():
    cfg = BlockConfig(num_heads=H, head_dim=K, mlp_dim=32, activation="quick_gelu")
    n = 2
    unrolled = TransformerStack(cfg, n)
    scanned = TransformerStack(cfg, n, scan_layers=True, remat_policy="full")
    unrolled_remat = TransformerStack(cfg, n, remat_policy="full")
    x = _x(22)
    mask = masks.padding_mask(np.array([[1] * T, [1] * (T - 2) + [0, 0]]))
    pu = _perturb(nn.unbox(unrolled.init(jax.random.key(0), x, mask)["params"]), seed=23, scale=0.2)
    ps = _stack_params_unrolled_to_scanned(pu, n)
    assert jax.tree.structure(ps) == jax.tree.structure(
        nn.unbox(jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, mask))["params"]))
    run = jax.jit(lambda m, p, layer, hs: m.apply({"params": p}, x, mask, output_layer=layer, output_hidden_states=hs),
                  static_argnums=(0, 2, 3))
    out_u, hs_u = run(unrolled, pu, -1, True)
    out_s, hs_s = run(scanned, ps, -1, True)
    assert len(hs_u) == len(hs_s) == n + 1
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_u), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out_u), np.asarray(hs_u[-1]), atol=0, rtol=0)
    for a, b in zip(hs_u, hs_s):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=ATOL, rtol=0)
    assert np.abs(np.asarray(hs_u[-2]) - np.asarray(hs_u[-1])).max() > 1e-3
    o_u, none = run(unrolled, pu, -2, False)
    o_s, _ = run(scanned, ps, -2, False)
    assert none is None
    np.testing.assert_allclose(np.asarray(o_u), np.asarray(hs_u[-2]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(o_s), np.asarray(hs_u[-2]), atol=ATOL, rtol=0)
    # gradients agree (scan and remat must not change them)
    grad = jax.jit(jax.grad(lambda p, m: (m.apply({"params": p}, x, mask)[0] ** 2).sum()), static_argnums=1)
    gu = grad(pu, unrolled)
    for g in (_stack_params_unrolled_to_scanned(grad(pu, unrolled_remat), n), grad(ps, scanned)):
        for a, b in zip(jax.tree.leaves(_stack_params_unrolled_to_scanned(gu, n)), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="output_layer"):
        unrolled.apply({"params": pu}, x, mask, output_layer=n + 1)


@pytest.mark.parametrize("scan", [False, True])
def test_stack_decode_equals_full(scan):
    cfg = BlockConfig(num_heads=H, head_dim=K, mlp_dim=32, activation="gelu_tanh", causal=True)
    st = TransformerStack(cfg, 2, scan_layers=scan)
    x = _x(24)
    params = _perturb(nn.unbox(st.init(jax.random.key(0), x)["params"]), seed=25, scale=0.2)
    full, _ = jax.jit(lambda p: st.apply({"params": p}, x))(params)       # causal via BlockConfig.causal
    noncausal = TransformerStack(cfg.__class__(**{**cfg.__dict__, "causal": False}), 2, scan_layers=scan)
    full_mask, _ = jax.jit(lambda p: noncausal.apply({"params": p}, x, masks.causal_mask(T)))(params)
    np.testing.assert_allclose(np.asarray(full), np.asarray(full_mask), atol=ATOL, rtol=0)
    cache = init_cache(st, params, x)
    for leaf in jax.tree.leaves(cache):
        assert leaf.shape[0] == B
    step = jax.jit(lambda c, xt: st.apply({"params": params, "cache": c}, xt, decode=True, mutable=["cache"]))
    (y1, _), v = step(cache, x[:, :3])
    outs = [np.asarray(y1)]
    c = v["cache"]
    for t in range(3, T):
        (yt, _), v = step(c, x[:, t:t + 1])
        c = v["cache"]
        outs.append(np.asarray(yt))
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=ATOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_stack_cross_attention_decode_uses_the_cache(scan):
    """Decoder stack with cross-attention: init_cache(encoded) then steps with encoded=None == full."""
    cfg = BlockConfig(num_heads=H, head_dim=K, mlp_dim=32, activation="gated_gelu", norm_type="rmsnorm",
                      causal=True, cross_attention=True)
    st = TransformerStack(cfg, 2, scan_layers=scan)
    x, enc = _x(50), _x(51, (B, 4, 8))
    cross = masks.padding_mask(np.array([[1, 1, 1, 1], [1, 1, 0, 0]]))
    params = _perturb(nn.unbox(jax.eval_shape(lambda: st.init(jax.random.key(0), x, encoded=enc))["params"]),
                      seed=52, scale=0.3)
    full, _ = jax.jit(lambda p: st.apply({"params": p}, x, encoded=enc, cross_mask=cross))(params)
    cache = init_cache(st, params, x, encoded=enc, cross_mask=cross)
    names = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        name = path[-1].key
        names.add(name)
        assert leaf.shape[0] == B
        if name.startswith("cached_cross_"):
            assert leaf.shape[-3:] == (4, H, K) and np.abs(np.asarray(leaf)).max() > 0     # filled
        else:
            assert not np.asarray(leaf).any()                                               # empty
    assert {"cached_cross_key", "cached_cross_value", "cached_key", "cache_index"} <= names
    step = jax.jit(lambda c, xt: st.apply({"params": params, "cache": c}, xt, cross_mask=cross, decode=True,
                                          mutable=["cache"]))
    outs, c = [], cache
    for t in range(T):
        (y, _), v = step(c, x[:, t:t + 1])
        outs.append(np.asarray(y))
        c = v["cache"]
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no cross-attention KV cache"):       # decode without a filled cache
        TransformerBlock(cfg).apply({"params": params["layers_0"] if not scan else
                                     jax.tree.map(lambda a: a[0], params["layers"])}, x, decode=True,
                                    mutable=["cache"])


def test_every_param_has_logical_axes_and_dtypes():
    cfg = BlockConfig(num_heads=H, head_dim=K, mlp_dim=32, activation="gated_gelu", norm_type="rmsnorm",
                      cross_attention=True)
    st = TransformerStack(cfg, 2, scan_layers=True, dtype=jnp.bfloat16)
    x, enc = _x(26), _x(27, (B, 4, 8))
    variables = jax.jit(lambda: st.init(jax.random.key(0), x, encoded=enc))()
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda l: isinstance(l, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and leaf.names[0] == "layers"
        assert leaf.value.dtype == jnp.float32          # param_dtype stays float32
    out, _ = jax.jit(lambda v: st.apply(v, x, encoded=enc))(variables)
    assert out.dtype == jnp.bfloat16 and out.shape == (B, T, D)
    with pytest.raises(ValueError, match="cross_attention"):
        TransformerBlock(cfg).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="norm_position"):
        BlockConfig(num_heads=H, head_dim=K, mlp_dim=8, norm_position="sandwich")


# ----------------------------------------------- one stack: patterns, insertion, scan, remat
W3, H3 = 24, 3                                       # odd sizes: width 24, 3 heads of 8


class _GatedAdd(nn.Module):
    """Inserted test block: x + tanh(gate) * tanh(Dense(mean over media)) (media [B, S, Dm])."""
    width: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, media, media_mask, *, deterministic: bool = True):
        w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                       (media.shape[-1], self.width))
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.ones, (None,)), ())
        pooled = (media * media_mask[..., None]).mean(1)                           # [B, Dm]
        return x + jnp.tanh(gate) * jnp.tanh(pooled @ w)[:, None]


class _AddConstant(nn.Module):
    """Inserted test block: records its input (sow) and adds ``value`` (no params)."""
    value: float

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        self.sow("intermediates", "seen", x)
        return x + self.value


def _odd_blocks(cross_every=0):
    plain = BlockConfig(num_heads=H3, head_dim=W3 // H3, mlp_dim=40, activation="gelu_tanh")
    if not cross_every:
        return plain
    cross = dataclasses.replace(plain, cross_attention=True)
    return (cross,) + (plain,) * (cross_every - 1)


def _odd_inputs():
    x = _x(60, (B, T, W3))
    enc = _x(61, (B, 4, 12))
    media = _x(62, (B, 3, 10))
    media_mask = jnp.asarray(np.array([[1, 1, 0], [1, 0, 0]], np.float32))
    cross_mask = masks.padding_mask(np.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
    return x, enc, cross_mask, media, media_mask


@pytest.mark.parametrize("cross_every,insert", [(0, False), (2, False), (0, True), (2, True), (3, True)])
def test_scanned_stack_equals_unrolled_outputs_and_gradients(cross_every, insert):
    """Cross-attention patterns and insertion every 2 (offset 1): scan == unrolled (f32, 1e-5)."""
    n = 6
    spec = InsertSpec(_GatedAdd, {"width": W3}, every=2, offset=1) if insert else None
    blocks = _odd_blocks(cross_every)
    unrolled = TransformerStack(blocks, n, insert=spec)
    x, enc, cross_mask, media, media_mask = _odd_inputs()
    kw = dict(encoded=enc, cross_mask=cross_mask) if cross_every else {}
    if insert:
        kw["inserted_inputs"] = (media, media_mask)
    pu = _perturb(nn.unbox(unrolled.init(jax.random.key(0), x, **kw)["params"]), seed=63, scale=0.2)
    assert all(k.startswith(("layers_", "inserted_")) for k in pu)
    assert len([k for k in pu if k.startswith("inserted_")]) == (3 if insert else 0)
    assert all(not k.startswith("inserted") for i in range(n) for k in pu[f"layers_{i}"])   # own scope
    size = int(np.lcm(len(blocks) if isinstance(blocks, tuple) else 1, 2 if insert else 1))
    ps = _stack_params_unrolled_to_scanned(pu, n, group=size, inserts_per_group=size // 2 if insert else 0)
    policies = ("none", "full", "dots", "save_attention_out") if (cross_every, insert) == (2, True) else ("full",)
    for policy in policies:
        scanned = TransformerStack(blocks, n, insert=spec, scan_layers=True, remat_policy=policy)
        shapes = nn.unbox(jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, **kw))["params"])
        assert jax.tree.structure(shapes) == jax.tree.structure(ps)
        assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(ps)))

        def loss(p, m):
            out, hs = m.apply({"params": p}, x, **kw, output_hidden_states=True)
            return (out ** 2).sum() + sum((h * 0.1).sum() for h in hs), (out, hs)
        grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
        gu, (out_u, hs_u) = grad(pu, unrolled)
        gs, (out_s, hs_s) = grad(ps, scanned)
        np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_u), atol=1e-5, rtol=0)
        assert len(hs_u) == len(hs_s) == n + 1
        for a, b in zip(hs_u, hs_s):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
        for a, b in zip(jax.tree.leaves(_stack_params_unrolled_to_scanned(
                gu, n, group=size, inserts_per_group=size // 2 if insert else 0)), jax.tree.leaves(gs)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    if insert:      # the inserted blocks matter
        no_gate = jax.tree_util.tree_map_with_path(
            lambda path, v: v * 0 if getattr(path[-1], "key", "") == "gate" else v, pu)
        off = unrolled.apply({"params": no_gate}, x, **kw)[0]
        assert np.abs(np.asarray(off) - np.asarray(out_u)).max() > 1e-3


@pytest.mark.parametrize("offset", [1, 0])
def test_inserted_block_lands_before_the_right_layers(offset):
    """every=2: open_flamingo (offset 1) inserts before layers 1, 3, 5; IDEFICS (offset 0) before 0, 2, 4."""
    n, value = 5, 0.5
    plain = _odd_blocks()
    x = _x(64, (B, T, W3))
    bare = TransformerStack(plain, n)
    params = _perturb(nn.unbox(bare.init(jax.random.key(0), x)["params"]), seed=65, scale=0.2)
    st = TransformerStack(plain, n, insert=InsertSpec(_AddConstant, {"value": value}, every=2, offset=offset,
                                                      pass_dtypes=False))
    (out, hs), inter = st.apply({"params": params}, x, output_hidden_states=True, mutable=["intermediates"])
    # reference: the same blocks one by one, adding the constant by hand before layers i % 2 == offset
    h, seen = x, []
    for i in range(n):
        if i % 2 == offset:
            seen.append(h)
            h = h + value
        h = TransformerBlock(plain).apply({"params": params[f"layers_{i}"]}, h)
        np.testing.assert_allclose(np.asarray(hs[i + 1]), np.asarray(h), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(h), atol=1e-5, rtol=0)
    recorded = inter["intermediates"]
    assert sorted(recorded) == [f"inserted_{m}" for m in range(len(seen))]
    for m, want in enumerate(seen):
        np.testing.assert_allclose(np.asarray(recorded[f"inserted_{m}"]["seen"][0]), np.asarray(want),
                                   atol=1e-6, rtol=0)
    plain_out = bare.apply({"params": params}, x)[0]
    assert np.abs(np.asarray(plain_out) - np.asarray(out)).max() > 1e-2


def test_stack_layout_errors_are_clear():
    x = _x(66, (B, T, W3))
    spec = InsertSpec(_AddConstant, {"value": 1.0}, every=2, offset=1, pass_dtypes=False)
    with pytest.raises(ValueError, match=r"num_layers=5 to be a multiple of the group size 2"):
        TransformerStack(_odd_blocks(), 5, insert=spec, scan_layers=True).init(jax.random.key(0), x)
    TransformerStack(_odd_blocks(), 5, insert=spec).init(jax.random.key(0), x)          # unrolled is fine
    with pytest.raises(ValueError, match=r"remat_policy='sometimes'.*'full'"):
        TransformerStack(_odd_blocks(), 2, remat_policy="sometimes").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"True -> 'full'"):
        TransformerStack(_odd_blocks(), 2, remat_policy=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="offset"):
        InsertSpec(_AddConstant, every=2, offset=2)
    with pytest.raises(ValueError, match="no InsertSpec"):
        TransformerStack(_odd_blocks(), 2).init(jax.random.key(0), x, inserted_inputs=(x,))
    a, b = _odd_blocks(2)
    assert periodic_pattern([a, b, a, b]) == (a, b)
    assert periodic_pattern([a, b, b, a]) == (a, b, b, a)


def _temp_bytes(policy, n=8):
    cfg = BlockConfig(num_heads=4, head_dim=16, mlp_dim=256, activation="gelu")
    st = TransformerStack(cfg, n, scan_layers=True, remat_policy=policy)
    x = jnp.ones((4, 64, 64), jnp.float32)
    params = nn.unbox(jax.eval_shape(lambda: st.init(jax.random.key(0), x))["params"])
    grad = jax.jit(jax.grad(lambda p, x: (st.apply({"params": p}, x)[0] ** 2).sum()))
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_remat_policy_lowers_train_step_temp_memory():
    """'full' saves nothing per layer, so the compiled backward needs less temporary memory."""
    none, full = _temp_bytes("none"), _temp_bytes("full")
    assert full < 0.7 * none, (none, full)
    assert set(REMAT_POLICIES) >= {"none", "full", "dots", "save_attention_out"}
