"""The Flamingo model (vlm_jax/models/flamingo.py: `Flamingo`, `interleaved_loss_mask`,
`param_groups`) on tiny odd sizes: frozen ViT -> (media_proj) -> Perceiver Resampler -> frozen
DecoderLM with GATED XATTN-DENSE every 2 layers, `<image>` / `<|endofchunk|>` from a separate
trainable table.

  - gates at 0: the LM's logits exactly (the added tokens' rows made equal to two LM rows, so the
    plain LM can be fed the same sequence);
  - image j changes only the logits at/after its marker; text before the first image sees no image;
  - training steps on the trainable subset that `param_groups` selects leave the vision tower and the
    whole LM (its token table included) bit-identical, while the resampler, gates and new rows move;
  - open_flamingo's interleaved loss mask on hand-made rows.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_params  # noqa: E402

from vlm_jax import optim
from vlm_jax.layers.decoder_lm import DecoderLM, DecoderLMConfig
from vlm_jax.layers.vit import ViTConfig
from vlm_jax.models import flamingo
from vlm_jax.objectives.captioning import masked_cross_entropy

V, PAD = 23, 0
IMG, EOC = V, V + 1                       # the defaults: the two ids after the LM's vocabulary
VISION = ViTConfig(image_size=8, patch_size=4, hidden_size=10, num_layers=2, num_heads=2, mlp_dim=14,
                   norm_eps=1e-5)        # 4 patches + [CLS], width 10
RESAMPLER = flamingo.PerceiverResamplerConfig(width=12, depth=2, num_heads=3, head_dim=5, num_latents=3,
                                              mlp_dim=18, max_frames=2)      # 12 != 10: media_proj
LM = DecoderLMConfig(vocab_size=V, width=20, num_layers=4, num_heads=4, mlp_dim=36, max_positions=16)
XATTN = flamingo.GatedXAttnConfig(num_heads=3, head_dim=7, mlp_dim=30)
CFG = flamingo.FlamingoConfig(vision=VISION, resampler=RESAMPLER, lm=LM, xattn=XATTN, xattn_every=2,
                              feature_layer=-2)




def _batch():
    tokens = np.array([[5, 6, 7, IMG, 8, 9, 10, EOC, 11, IMG, 12, 13, EOC, 14],      # 3 tokens before image 1
                       [3, IMG, 4, 5, EOC, IMG, 6, 7, 8, EOC, PAD, PAD, PAD, PAD]],   # right-padded
                      np.int32)
    images = np.random.default_rng(0).normal(size=(2, 2, 8, 8, 3)).astype(np.float32)   # [B, M, S, S, C]
    return jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(tokens != PAD)


def _with_gates(params, gates):
    out = jax.tree.map(lambda x: x, params)
    for m, (a, d) in enumerate(gates):
        out["lm"][f"inserted_{m}"] = dict(out["lm"][f"inserted_{m}"], alpha_xattn=jnp.float32(a),
                                          alpha_dense=jnp.float32(d))
    return out


def _markers(tokens):
    return [np.flatnonzero(np.asarray(tokens[b]) == IMG) for b in range(tokens.shape[0])]


@pytest.fixture(scope="module")
def setup():
    tokens, images, mask = _batch()
    model = flamingo.Flamingo(CFG)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens, images, attention_mask=mask)["params"]
    params = random_params(abstract, seed=0)
    lm_params = {k: v for k, v in params["lm"].items() if not k.startswith("inserted_")}
    plain = DecoderLM(LM)
    want = jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(plain.init, jax.random.key(0), tokens)["params"]))
    assert jax.tree.map(lambda x: x.shape, lm_params) == want          # the frozen LM's own tree, unchanged
    apply = jax.jit(lambda p, t, im, am, mv=None: model.apply({"params": p}, t, im, attention_mask=am,
                                                              media_valid=mv).logits)
    plain_apply = jax.jit(lambda p, t, am: plain.apply({"params": p}, t, attention_mask=am).logits)
    gated = _with_gates(params, [(0.7, -0.5), (-0.9, 0.6)])
    return dict(model=model, params=params, gated=gated, lm_params=lm_params, apply=apply,
                plain_apply=plain_apply, batch=(tokens, images, mask))


def test_param_tree_and_groups(setup):
    params = setup["params"]
    assert set(params) == {"vision", "media_proj", "resampler", "lm", "extra_embed"}     # tied LM: no extra head
    assert params["extra_embed"]["embedding"].shape == (2, LM.width)
    assert params["media_proj"]["kernel"].shape == (VISION.hidden_size, RESAMPLER.width)
    groups = flamingo.param_groups()
    labels = optim.assign_groups(params, [], groups)
    flat = {optim.path_str(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    assert all(l == "frozen_vision" for p, l in flat.items() if p.startswith("vision/"))
    assert all(l == "default" for p, l in flat.items() if p.startswith("lm/inserted_"))
    assert flat["lm/token_embed/embedding"] == "frozen_lm"
    assert {p.split("/")[0] for p, l in flat.items() if l == "default"} == {"media_proj", "resampler", "lm",
                                                                           "extra_embed"}

    # an untied, scanned LM with the vision width = the resampler width: no media_proj, an extra
    # head, the inserted blocks under lm/layers/ -- still trainable, the scanned LM blocks frozen
    cfg = flamingo.FlamingoConfig(vision=VISION, resampler=flamingo.PerceiverResamplerConfig(
        width=10, depth=1, num_heads=2, head_dim=5, num_latents=3, mlp_dim=12),
        lm=dataclasses.replace(LM, tie_embeddings=False, scan_layers=True),
        xattn=XATTN, xattn_every=2)
    tokens, images, _ = _batch()
    ab = nn.unbox(jax.eval_shape(flamingo.Flamingo(cfg).init, jax.random.key(0), tokens, images)["params"])
    assert "media_proj" not in ab and ab["extra_lm_head"]["kernel"].shape == (LM.width, 2)
    flat = {optim.path_str(p): l for p, l in jax.tree_util.tree_leaves_with_path(optim.assign_groups(ab, [], groups))}
    inserted = [p for p in flat if p.startswith("lm/layers/inserted_")]
    assert inserted and all(flat[p] == "default" for p in inserted)
    assert flat["lm/lm_head/kernel"] == "frozen_lm" and flat["extra_lm_head/kernel"] == "default"
    assert all(flat[p] == "frozen_lm" for p in flat if p.startswith("lm/layers/block_"))
    # video: F frames per media share one key set in the resampler
    frames = jax.ShapeDtypeStruct((2, 2, 2, 8, 8, 3), jnp.float32)                      # [B, M, F, S, S, C]
    out = jax.eval_shape(lambda p, im: flamingo.Flamingo(CFG).apply({"params": p}, tokens, im), params, frames)
    assert out.logits.shape == (2, tokens.shape[1], V + 2)
    with pytest.raises(ValueError, match="insert"):
        flamingo.FlamingoConfig(vision=VISION, resampler=RESAMPLER, lm=CFG.lm_config, xattn=XATTN)


def test_gates_at_zero_give_the_frozen_lm_exactly(setup):
    """With the gates at 0 (their init) and the two new rows set to LM rows 15 and 16, Flamingo's
    logits equal the plain LM's on the sequence with <image> -> 15, <|endofchunk|> -> 16, bit for
    bit, at every position; the extra (tied) output columns are the LM's columns 15 and 16."""
    tokens, images, mask = setup["batch"]
    params = setup["params"]
    table = params["lm"]["token_embed"]["embedding"]
    params = dict(params, extra_embed={"embedding": table[jnp.array([15, 16])]})
    got = np.asarray(setup["apply"](params, tokens, images, mask))
    assert got.shape == (2, tokens.shape[1], V + 2)
    as_lm = jnp.where(tokens == IMG, 15, jnp.where(tokens == EOC, 16, tokens))
    want = np.asarray(setup["plain_apply"](setup["lm_params"], as_lm, mask))
    np.testing.assert_array_equal(got[..., :V], want)
    np.testing.assert_allclose(got[..., V:], want[..., [15, 16]], rtol=1e-5, atol=1e-5)
    gated = dict(setup["gated"], extra_embed=params["extra_embed"])
    assert np.abs(np.asarray(setup["apply"](gated, tokens, images, mask))[..., :V] - want).max() > 1e-3


def test_image_j_changes_only_logits_from_its_marker_on(setup):
    tokens, images, mask = setup["batch"]
    apply, gated = setup["apply"], setup["gated"]
    base = np.asarray(apply(gated, tokens, images, mask))
    for j in (0, 1):
        other = np.array(images)
        other[:, j] = np.random.default_rng(10 + j).normal(size=other[:, j].shape)
        diff = np.abs(np.asarray(apply(gated, tokens, jnp.asarray(other), mask)) - base).max(axis=-1)   # [B, T]
        for b, marks in enumerate(_markers(tokens)):
            start = marks[j]
            np.testing.assert_array_equal(diff[b, :start], 0.0)
            real = np.asarray(mask[b, start:])
            assert diff[b, start:][real].min() > 1e-6, (j, b, diff[b])


def test_tokens_before_the_first_image_see_no_image(setup):
    tokens, images, mask = setup["batch"]
    apply, gated = setup["apply"], setup["gated"]
    first = [int(m[0]) for m in _markers(tokens)]
    base = np.asarray(apply(gated, tokens, images, mask))
    other = np.asarray(apply(gated, tokens, -3.0 * images[:, ::-1], mask))                 # every image changed
    dropped = np.asarray(apply(gated, tokens, images, mask, jnp.zeros((2, 2), bool)))    # or dropped
    text_only = np.asarray(apply(gated, tokens, None, mask))                              # no images at all
    np.testing.assert_array_equal(text_only, dropped)
    for b in range(2):
        np.testing.assert_array_equal(other[b, :first[b]], base[b, :first[b]])
        np.testing.assert_array_equal(dropped[b, :first[b]], base[b, :first[b]])
        assert np.abs(other[b, first[b]:] - base[b, first[b]:]).max() > 1e-4
    # their cross-attention output is exactly 0: with the dense gates at 0 they are the frozen LM's logits
    xattn_only = _with_gates(gated, [(0.7, 0.0), (-0.9, 0.0)])
    out = np.asarray(apply(xattn_only, tokens, images, mask))
    plain = np.asarray(setup["plain_apply"](setup["lm_params"], jnp.where(tokens >= V, 1, tokens), mask))
    for b in range(2):
        np.testing.assert_array_equal(out[b, :first[b], :V], plain[b, :first[b]])


def test_training_moves_only_the_trainable_subset(setup):
    """Three Adam steps on the open_flamingo-masked LM loss over the trainable subset of
    `param_groups`: vision + LM (token table included) bit-identical, every trainable leaf moved
    (the gates at step 1; the resampler and block weights, which get no gradient while the gates
    are 0, from step 2), both new token rows moved."""
    tokens, images, mask = setup["batch"]
    model, params = setup["model"], setup["params"]
    groups = flamingo.param_groups()
    labels = optim.assign_groups(params, [], groups)
    table = optim.group_table([], groups)
    trainable, frozen = optim.split(params, jax.tree.map(lambda l: table[l].trainable, labels))
    assert set(frozen) == {"vision", "lm"} and set(trainable) == {"media_proj", "resampler", "lm", "extra_embed"}
    assert set(trainable["lm"]) == {"inserted_0", "inserted_1"}
    loss_mask = flamingo.interleaved_loss_mask(tokens, IMG, EOC, PAD)

    def loss_fn(tr, fr):
        logits = model.apply({"params": optim.merge(tr, fr)}, tokens, images, attention_mask=mask).logits
        return masked_cross_entropy(logits[:, :-1], tokens[:, 1:], loss_mask[:, :-1]).loss

    tx = optax.adam(1e-2)

    @jax.jit
    def step(tr, opt_state, fr):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr)
        updates, opt_state = tx.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    tr, opt_state = trainable, tx.init(trainable)
    losses = []
    for _ in range(3):
        tr, opt_state, loss = step(tr, opt_state, frozen)
        losses.append(float(loss))
    print("losses", losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = optim.merge(tr, frozen)
    before_flat = {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    after_flat = {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(after)}
    assert before_flat.keys() == after_flat.keys()
    frozen_paths = {optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen)}
    assert "lm/token_embed/embedding" in frozen_paths and any(p.startswith("vision/") for p in frozen_paths)
    for p in before_flat:
        if p in frozen_paths:
            np.testing.assert_array_equal(after_flat[p], before_flat[p], err_msg=p)
        else:
            assert np.any(after_flat[p] != before_flat[p]), f"trainable {p} did not move"
    rows = np.abs(after_flat["extra_embed/embedding"] - before_flat["extra_embed/embedding"]).max(axis=-1)
    assert rows.min() > 0, rows                      # <image> and <|endofchunk|> rows both moved


def test_kv_cache_decoding_with_precomputed_latents(setup):
    """Prefill 9 tokens (both rows) into the KV cache, then feed the rest one at a time with the images'
    latents computed once (``latents=``) and each new token's ``text_time`` / position given:
    the logits equal the full forward's (so the one decoding module can drive Flamingo). ``key_valid``
    must cover the whole cache: `DecoderLM` defaults it to the new tokens' length only."""
    from vlm_jax.layers.attention import init_cache
    tokens, images, mask = setup["batch"]
    model, gated = setup["model"], setup["gated"]
    full = np.asarray(setup["apply"](gated, tokens, images, mask))
    latents = jax.jit(lambda p, im: model.apply({"params": p}, im, method=flamingo.Flamingo.encode_images))(
        gated, images)
    tt = flamingo.media_text_time(tokens == IMG)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    @jax.jit
    def run(p, cache, tok, tt_, pos_):
        out, upd = model.apply({"params": p, "cache": cache}, tok, latents=latents, text_time=tt_, position_ids=pos_,
                               decode=True, key_valid=jnp.ones((b, t), bool), mutable=["cache"])
        return out.logits, upd["cache"]

    cache = init_cache(model, gated, tokens, latents=latents)
    logits, cache = run(gated, cache, tokens[:, :9], tt[:, :9], pos[:, :9])
    got = [np.asarray(logits)]
    for i in range(9, t):
        logits, cache = run(gated, cache, tokens[:, i:i + 1], tt[:, i:i + 1], pos[:, i:i + 1])
        got.append(np.asarray(logits))
    real = np.asarray(mask)            # row 1's trailing pads see each other in the cache: compare real tokens
    np.testing.assert_allclose(np.concatenate(got, axis=1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_interleaved_loss_mask_by_hand():
    a, b, c, d, e = 3, 4, 5, 6, 7
    I, E, _ = IMG, EOC, PAD  # noqa: E741
    tokens = np.array([
        [a, I, b, c, E, d, I, e, E, _, _],     # the docstring's example
        [a, b, c, d, e, a, b, c, d, e, _],     # no image: nothing is trained
        [I, a, E, E, b, I, I, c, E, d, e],     # E E: the second E is after an E; I I: neither is a target
        [_, _, a, I, b, E, c, I, d, _, _],     # left padding, text before the image
    ], np.int32)
    x, o = True, False
    target = np.array([
        [o, o, x, x, x, o, o, x, x, o, o],
        [o] * 11,
        [o, x, x, o, o, o, o, x, x, o, o],
        [o, o, o, o, x, x, o, o, x, o, o],
    ])
    got = np.asarray(flamingo.interleaved_label_mask(tokens, IMG, EOC, PAD))
    np.testing.assert_array_equal(got, target)
    mask = np.asarray(flamingo.interleaved_loss_mask(jnp.asarray(tokens), IMG, EOC, PAD))
    np.testing.assert_array_equal(mask[0], [o, x, x, x, o, o, x, x, o, o, o])
    np.testing.assert_array_equal(mask[:, :-1], target[:, 1:])
    assert not mask[:, -1].any()
    # the same under jit, and as open_flamingo's loop writes it
    np.testing.assert_array_equal(np.asarray(jax.jit(flamingo.interleaved_label_mask, static_argnums=(1, 2, 3))(
        tokens, IMG, EOC, PAD)), target)
    theirs = _open_flamingo_labels(tokens, IMG, EOC, PAD) != -100
    np.testing.assert_array_equal(theirs[[0, 1, 3]], target[[0, 1, 3]])
    # the one difference: open_flamingo blanks label 0 *before* looking for the first <image>, so a row
    # that opens with <image> at t=0 loses its whole first chunk too (a, E at t=1, 2); we train it
    np.testing.assert_array_equal(theirs[2], target[2] & (np.arange(11) > 2))


def _open_flamingo_labels(tokens, media_id, eoc_id, pad_id):
    """open_flamingo's MMC4 label loop (train_utils.train_one_epoch), restated in numpy."""
    labels = tokens.copy()
    labels[labels == pad_id] = -100
    labels[:, 0] = -100
    for i in range(labels.shape[0]):
        j = 0
        while j < labels.shape[1] and labels[i, j] != media_id:
            labels[i, j] = -100
            j += 1
        for k in np.flatnonzero(labels[i] == eoc_id):
            j = k + 1
            while j < labels.shape[1] and labels[i, j] != media_id:
                labels[i, j] = -100
                j += 1
    labels[labels == media_id] = -100
    return labels
