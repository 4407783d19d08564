"""Flamingo's two mechanisms (vlm_jax/models/flamingo.py): the Perceiver Resampler and the
GATED XATTN-DENSE block, against flamingo-pytorch 0.1.2 on copied weights (gates nonzero, f32),
and inserted into a tiny frozen `DecoderLM` through `InsertSpec`: gates at 0 give the LM exactly,
an image changes only the tokens at/after its marker, text before the first image never sees an
image. The LM integration itself (task, tokenizer, loss masks) is tested elsewhere."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params  # noqa: E402

from vlm_jax.convert.common import stack_params
from vlm_jax.layers.decoder_lm import DecoderLM, DecoderLMConfig
from vlm_jax.models import flamingo

# odd sizes so that a transposed or mis-split weight cannot pass: width 20, 3 heads of 7 (H*K = 21),
# 5 latents, depth 2, FFN 30 (flamingo-pytorch ff_mult 1.5), 2 images x 1 frame x 6 patches
D, H, K, R, DEPTH, FH = 20, 3, 7, 5, 2, 30
TOL = 1e-5


def _torch_oracle():
    torch = pytest.importorskip("torch")
    fp = pytest.importorskip("flamingo_pytorch", reason="needs flamingo-pytorch==0.1.2 (requirements-test.txt)")
    return torch, fp


def _randomize(torch, module, seed):
    """Non-trivial LayerNorms and O(1) activations, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)


def _np(t):
    return t.detach().numpy().astype(np.float32)


def _ln(sd, prefix):
    return {"scale": _np(sd[prefix + ".weight"]), "bias": _np(sd[prefix + ".bias"])}


def _attention(sd, prefix):
    """torch to_q [H*K, Din], to_kv [2*H*K, Dkv] (k rows first), to_out [D, H*K] ->
    MultiHeadAttention kernels [Din, H, K] / [H, K, D] (no biases)."""
    wq, wkv, wo = (_np(sd[f"{prefix}.{n}.weight"]) for n in ("to_q", "to_kv", "to_out"))
    wk, wv = wkv[:H * K], wkv[H * K:]
    heads = lambda w: {"kernel": w.T.reshape(w.shape[1], H, K)}  # noqa: E731
    return {"query": heads(wq), "key": heads(wk), "value": heads(wv),
            "out": {"kernel": wo.T.reshape(H, K, wo.shape[0])}}


def _ffw(sd, prefix):
    """flamingo-pytorch FeedForward = Sequential(LayerNorm, Linear, GELU, Linear) -> (norm, MLP)."""
    return _ln(sd, prefix + ".0"), {"wi": {"kernel": _np(sd[prefix + ".1.weight"]).T},
                                    "wo": {"kernel": _np(sd[prefix + ".3.weight"]).T}}


def _same_structure(ours, init_params):
    want = jax.tree.map(lambda x: x.shape, nn.unbox(init_params))
    got = jax.tree.map(lambda x: x.shape, ours)
    assert got == want




# ------------------------------------------------------------------- flamingo-pytorch parity
def test_resampler_matches_flamingo_pytorch():
    """Resampler on 2 images x 1 frame x 6 patches equals flamingo-pytorch's `PerceiverResampler`
    (GELU FFN) fed each image as its own row: both add time embedding 0 to a single frame and
    resample each image independently."""
    torch, fp = _torch_oracle()
    torch.manual_seed(0)
    ref = fp.PerceiverResampler(dim=D, depth=DEPTH, dim_head=K, heads=H, num_latents=R, num_media_embeds=3,
                                ff_mult=FH / D)
    _randomize(torch, ref, seed=1)
    sd = ref.state_dict()
    b, m, f, p = 2, 2, 1, 6
    media = np.random.default_rng(0).normal(size=(b, m, f, p, D)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(media.reshape(b * m, f, p, D))).numpy().reshape(b, m, R, D)

    cfg = flamingo.PerceiverResamplerConfig(width=D, depth=DEPTH, num_heads=H, head_dim=K, num_latents=R,
                                            mlp_dim=FH, activation="gelu", max_frames=3)
    model = flamingo.PerceiverResampler(cfg)
    params = {"latents": _np(sd["latents"]), "time_embed": _np(sd["media_pos_emb"])[:, 0],
              "final_norm": _ln(sd, "norm")}
    for i in range(DEPTH):
        norm, mlp = _ffw(sd, f"layers.{i}.1")
        params[f"layers_{i}"] = {"media_norm": _ln(sd, f"layers.{i}.0.norm_media"),
                                 "latents_norm": _ln(sd, f"layers.{i}.0.norm_latents"),
                                 "attn": _attention(sd, f"layers.{i}.0"), "mlp_norm": norm, "mlp": mlp}
    _same_structure(params, jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(media))["params"])
    got = np.asarray(model.apply({"params": params}, jnp.asarray(media)))
    assert got.shape == (b, m, R, D)
    err = np.abs(got - want).max()
    print(f"resampler max |diff| vs flamingo-pytorch: {err:.2e}")
    assert err <= TOL


def test_gated_block_matches_flamingo_pytorch():
    """GATED XATTN-DENSE with gates 0.6 / -0.8 equals flamingo-pytorch's `GatedCrossAttentionBlock`
    (only_attend_immediate_media=True) on rows with two images, one image, and none (every token
    of that row, and tokens before a row's first image, get zero cross-attention output)."""
    torch, fp = _torch_oracle()
    torch.manual_seed(0)
    ref = fp.GatedCrossAttentionBlock(dim=D, dim_head=K, heads=H, ff_mult=FH / D, only_attend_immediate_media=True)
    _randomize(torch, ref, seed=2)
    with torch.no_grad():
        ref.attn_gate.fill_(0.6)
        ref.ff_gate.fill_(-0.8)
    sd = ref.state_dict()
    rng = np.random.default_rng(1)
    b, t, m = 3, 9, 2
    x = rng.normal(size=(b, t, D)).astype(np.float32)
    latents = rng.normal(size=(b, m, R, D)).astype(np.float32)
    markers = np.zeros((b, t), bool)
    markers[0, [2, 5]] = True                 # row 0: two tokens before image 1, then image 2 at 5
    markers[1, 0] = True                      # row 1: one image, slot 2 never referenced
    #                                           row 2: no image at all
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(latents), media_locations=torch.from_numpy(markers)).numpy()

    cfg = flamingo.GatedXAttnConfig(num_heads=H, head_dim=K, mlp_dim=FH, activation="gelu")
    block = flamingo.GatedCrossAttentionBlock(cfg)
    media, mask = flamingo.cross_attention_inputs(jnp.asarray(latents), flamingo.media_text_time(markers))
    assert media.shape == (b, m * R, D) and mask.shape == (b, 1, t, m * R)
    norm, mlp = _ffw(sd, "ff")
    params = {"cross_norm": _ln(sd, "attn.norm"), "cross_attn": _attention(sd, "attn"), "mlp_norm": norm,
              "mlp": mlp, "alpha_xattn": np.float32(0.6), "alpha_dense": np.float32(-0.8)}
    _same_structure(params, jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x), media, mask)["params"])
    got = np.asarray(block.apply({"params": params}, jnp.asarray(x), media, mask))
    err = np.abs(got - want).max()
    print(f"gated xattn-dense max |diff| vs flamingo-pytorch: {err:.2e}")
    assert err <= TOL

    # zero cross-attention output where no image precedes: with the dense gate at 0, those rows are x
    params0 = dict(params, alpha_dense=np.float32(0.0))
    y = np.asarray(block.apply({"params": params0}, jnp.asarray(x), media, mask))
    before = np.cumsum(markers, axis=1) == 0
    np.testing.assert_array_equal(y[before], x[before])
    assert np.abs(y[~before] - x[~before]).max(axis=-1).min() > 1e-4


def test_resampler_frames_are_one_key_set_with_time_embeddings():
    """With F frames per image the F*P features form one key set per image: swapping two frames
    changes the latents only through the time embeddings (equal embeddings -> no change)."""
    cfg = flamingo.PerceiverResamplerConfig(width=12, depth=1, num_heads=2, head_dim=5, num_latents=3, mlp_dim=14,
                                            max_frames=4)
    model = flamingo.PerceiverResampler(cfg)
    media = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 3, 4, 12)), jnp.float32)   # [B, M, F, P, D]
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), media)["params"], seed=3)
    swapped = media[:, :, ::-1]
    run = jax.jit(lambda p, x: model.apply({"params": p}, x))
    assert run(params, media).shape == (1, 2, 3, 12)
    assert np.abs(np.asarray(run(params, media) - run(params, swapped))).max() > 1e-2
    flat = dict(params, time_embed=jnp.broadcast_to(params["time_embed"][:1], params["time_embed"].shape))
    np.testing.assert_allclose(run(flat, media), run(flat, swapped), atol=1e-5)
    with pytest.raises(ValueError, match="max_frames"):
        model.apply({"params": params}, jnp.zeros((1, 1, 5, 4, 12)))


# ------------------------------------------------------------------- insertion into a frozen LM
IMAGE = 1                                           # the <image> token id of the tiny vocabulary
LM_KW = dict(vocab_size=23, width=20, num_layers=4, num_heads=4, mlp_dim=36, max_positions=16)
XATTN = flamingo.GatedXAttnConfig(num_heads=3, head_dim=7, mlp_dim=30)       # Squared-ReLU, as the paper
RESAMPLER = flamingo.PerceiverResamplerConfig(width=12, depth=2, num_heads=3, head_dim=5, num_latents=R,
                                              mlp_dim=18, max_frames=2)       # media width 12 != LM width 20


class _TinyFlamingo(nn.Module):
    """Test-only composition: resampler -> media latents + per-image mask -> DecoderLM whose stack
    has a GATED XATTN-DENSE before layers 1 and 3 (every 2, open_flamingo's offset 1)."""
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens, media, media_valid):
        latents = flamingo.PerceiverResampler(RESAMPLER, name="resampler")(media)           # [B, M, R, 12]
        inputs = flamingo.cross_attention_inputs(latents, flamingo.media_text_time(tokens == IMAGE), media_valid)
        lm = DecoderLMConfig(**LM_KW, insert=flamingo.gated_xattn_insert(XATTN, every=2),
                             scan_layers=self.scan_layers)
        return DecoderLM(lm, name="lm")(tokens, inserted_inputs=inputs).logits


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 23, size=(2, 12)).astype(np.int32)
    tokens[0, [3, 7]] = IMAGE                 # row 0: 3 tokens before the first image
    tokens[1, [1, 9]] = IMAGE                 # row 1: 1 token before the first image
    media = rng.normal(size=(2, 2, 2, 4, 12)).astype(np.float32)      # [B, M=2, F=2, P=4, 12]
    return jnp.asarray(tokens), jnp.asarray(media), jnp.ones((2, 2), bool)


def _with_gates(params, gates):
    """A copy of the composition's params with ``inserted_m``'s (alpha_xattn, alpha_dense) = gates[m]."""
    out = jax.tree.map(lambda x: x, params)
    for m, (a, d) in enumerate(gates):
        out["lm"][f"inserted_{m}"]["alpha_xattn"] = jnp.float32(a)
        out["lm"][f"inserted_{m}"]["alpha_dense"] = jnp.float32(d)
    return out


@pytest.fixture(scope="module")
def composed():
    """(jitted apply, params with gates at 0, params with gates nonzero, the plain LM's logits, batch)."""
    tokens, media, valid = _batch()
    model = _TinyFlamingo()
    plain = DecoderLM(DecoderLMConfig(**LM_KW))
    lm_params = random_params(jax.eval_shape(plain.init, jax.random.key(1), tokens)["params"], seed=1)
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), tokens, media, valid)["params"], seed=0)
    # the frozen LM's own weights, copied in; the resampler and inserted blocks are new
    assert set(params["lm"]) - set(lm_params) == {"inserted_0", "inserted_1"}
    params = {**params, "lm": {**params["lm"], **lm_params}}
    gated = _with_gates(params, [(0.7, -0.5), (-0.9, 0.6)])
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    plain_logits = np.asarray(jax.jit(lambda p, t: plain.apply({"params": p}, t).logits)(lm_params, tokens))
    return apply, params, gated, plain_logits, (tokens, media, valid)


def test_gates_at_zero_give_the_frozen_lm_exactly(composed):
    """The block inits its gates to 0, and with them at 0 the composition's logits are the plain LM's,
    bit for bit (same LM params, both jitted)."""
    apply, params, gated, plain_logits, (tokens, media, valid) = composed
    x, lat = jnp.zeros((1, 2, LM_KW["width"])), jnp.zeros((1, R, RESAMPLER.width))
    init = nn.unbox(flamingo.GatedCrossAttentionBlock(XATTN).init(jax.random.key(0, impl="rbg"), x, lat)["params"])
    assert float(init["alpha_xattn"]) == 0.0 and float(init["alpha_dense"]) == 0.0
    np.testing.assert_array_equal(np.asarray(apply(params, tokens, media, valid)), plain_logits)
    assert np.abs(np.asarray(apply(gated, tokens, media, valid)) - plain_logits).max() > 1e-3


def test_image_j_changes_only_tokens_from_its_marker_on(composed):
    apply, _, gated, _, (tokens, media, valid) = composed
    base = np.asarray(apply(gated, tokens, media, valid))
    marker_pos = [np.flatnonzero(np.asarray(tokens[b]) == IMAGE) for b in range(2)]
    for j in (0, 1):
        other = np.array(media)
        other[:, j] = np.random.default_rng(10 + j).normal(size=other[:, j].shape)
        diff = np.abs(np.asarray(apply(gated, tokens, other, valid)) - base).max(axis=-1)     # [B, T]
        for b in range(2):
            start = marker_pos[b][j]
            np.testing.assert_array_equal(diff[b, :start], 0.0)
            assert diff[b, start:].min() > 1e-5, (j, b, diff[b])


def test_tokens_before_the_first_image_see_no_image(composed):
    apply, _, gated, plain_logits, (tokens, media, valid) = composed
    base = np.asarray(apply(gated, tokens, media, valid))
    other = np.asarray(apply(gated, tokens, -3.0 * media[:, ::-1], ~valid))       # every image changed or dropped
    first = [int(np.flatnonzero(np.asarray(tokens[b]) == IMAGE)[0]) for b in range(2)]
    for b in range(2):
        np.testing.assert_array_equal(other[b, :first[b]], base[b, :first[b]])
    # their cross-attention output is exactly 0: with the dense gates at 0 they are the frozen LM's logits
    xattn_only = _with_gates(gated, [(0.7, 0.0), (-0.9, 0.0)])
    out = np.asarray(apply(xattn_only, tokens, media, valid))
    for b in range(2):
        np.testing.assert_array_equal(out[b, :first[b]], plain_logits[b, :first[b]])
        assert np.abs(out[b, first[b]:] - plain_logits[b, first[b]:]).max(axis=-1).min() > 1e-5


def test_scanned_stack_with_inserted_blocks_matches_unrolled(composed):
    """The insertion stays scannable: groups of 2 layers + 1 gated block, same logits."""
    apply, _, gated, _, (tokens, media, valid) = composed
    scanned = _TinyFlamingo(scan_layers=True)
    params = {**gated, "lm": stack_params(gated["lm"], LM_KW["num_layers"], group=2, inserts_per_group=1)}
    got = jax.jit(lambda p: scanned.apply({"params": p}, tokens, media, valid))(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(apply(gated, tokens, media, valid)), atol=1e-5)
