"""Show, Attend and Tell: model shapes and attention invariants, step-by-step decoding == teacher
forcing, the caption losses on hand-computed examples, hard-attention gradients, encoder freezing,
beam-search predict, and overfitting a 2-example batch. Tiny sizes (S=16, G=4, widths 16)."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax import config_lib
from vlm_jax.layers.cnn import GridCNN, adaptive_avg_pool, grid_sincos_embedding
from vlm_jax.models.sat import SATModel
from vlm_jax.objectives import captioning
from vlm_jax.tasks import sat as sat_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAT_CONFIG = os.path.join(ROOT, "configs", "sat.py")

V, B, T, S, G = 13, 2, 8, 16, 4
L = G * G


def tiny_config(**overrides):
    ov = {"data.image_size": S, "data.max_caption_len": T - 2, "model.vocab_size": V,
          "model.cnn_widths": "16:16", "model.grid": G, "model.annotation_dim": 16, "model.embed_dim": 16,
          "model.hidden_dim": 32, "model.attention_dim": 16, "model.dropout": 0.0}
    ov.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return config_lib.load_config(f"{SAT_CONFIG}:tiny", ov)


def make_batch(seed=0):
    """Two images and captions <bos> w.. <eos> <pad>.. (second caption shorter, so it has pads)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, S, S, 3)).astype(np.float32)
    tokens = np.zeros((B, T), np.int32)
    tokens[0] = [1, 5, 6, 7, 8, 9, 10, 2]
    tokens[1, :5] = [1, 11, 4, 12, 2]
    return {"image": images, "tokens": tokens}


@pytest.fixture(scope="module")
def soft():
    task = sat_task.make_task(tiny_config())
    batch = make_batch()
    variables = jax.jit(task.init)(jax.random.key(0), batch)
    return task, batch, nn.meta.unbox(variables)


@pytest.fixture(scope="module")
def hard():
    task = sat_task.make_task(tiny_config(model__attention="hard"))
    batch = make_batch()
    variables = jax.jit(task.init)(jax.random.key(0), batch)
    return task, batch, nn.meta.unbox(variables)


def _apply(task, variables, batch, *, train, seed=1):
    fn = jax.jit(lambda p, im, tok, r: task.model.apply(
        {"params": p}, im, tok, train=train,
        rngs={"dropout": jax.random.fold_in(r, 0), "hard": jax.random.fold_in(r, 1)}))
    return fn(variables["params"], batch["image"], batch["tokens"], jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _step_loop(model, params, images, inputs, greedy=False):
    """encode -> init_decode_state -> decode_step over inputs i32[steps, B] (teacher forcing), or
    feeding back the argmax (greedy, inputs[0] is <bos>). -> (logits [B, steps, V], alphas, final state)."""
    ann = model.apply(params, images, method=SATModel.encode)
    state = model.apply(params, ann, method=SATModel.init_decode_state)

    def body(carry, tok):
        state, prev = carry
        logits, state, alpha = model.apply(params, jnp.where(greedy, prev, tok), state, method=SATModel.decode_step)
        return (state, jnp.argmax(logits, -1).astype(jnp.int32)), (logits, alpha)

    (state, _), (logits, alphas) = jax.lax.scan(body, (state, inputs[0]), inputs)
    return jnp.swapaxes(logits, 0, 1), jnp.swapaxes(alphas, 0, 1), state


# ---------------------------------------------------------------------------- encoder
def test_grid_cnn_shapes_and_adaptive_pool():
    """S=64 -> G=14 through the stride/pool rule; adaptive pooling averages the right bins."""
    cnn = GridCNN(widths=(4, 4, 4), grid=14)
    out = jax.eval_shape(lambda x: cnn.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, 64, 64, 3)))
    assert out.shape == (1, 14, 14, 4)
    x = jnp.arange(5.0).reshape(1, 5, 1, 1) * jnp.ones((1, 5, 2, 1))
    pooled = adaptive_avg_pool(x, (2, 1))
    # bins [0, 3) and [2, 5) of rows 0..4
    np.testing.assert_allclose(np.asarray(pooled)[0, :, 0, 0], [1.0, 3.0])


# ---------------------------------------------------------------------------- model
def test_output_shapes_alpha_beta(soft, hard):
    for task, batch, variables in (soft, hard):
        out = _apply(task, variables, batch, train=True)
        assert out["logits"].shape == (B, T - 1, V)
        assert out["alphas"].shape == (B, T - 1, L)
        assert out["betas"].shape == (B, T - 1)
        np.testing.assert_allclose(np.asarray(out["alphas"]).sum(-1), 1.0, atol=1e-5)
        betas = np.asarray(out["betas"])
        assert np.all(betas > 0) and np.all(betas < 1)
        assert np.all(np.isfinite(np.asarray(out["logits"])))
        if task.hard:
            assert out["sample_logp"].shape == (B, T - 1) and out["entropy"].shape == (B, T - 1)
            # per caption: either sampled at every step (log p(s_t) = log alpha_t at one location < 0)
            # or used the expectation at every step (0)
            logp = np.asarray(out["sample_logp"])
            assert np.all((logp < 0).all(1) | (logp == 0).all(1))
            np.testing.assert_array_equal(np.asarray(out["sampled"]), (logp < 0).all(1))
            near = np.min(np.abs(np.log(np.asarray(out["alphas"])) - logp[..., None]), axis=-1)
            assert np.all(near[(logp < 0)] < 1e-5)
            ent = np.asarray(out["entropy"])
            assert np.all(ent > 0) and np.all(ent <= np.log(L) + 1e-5)
        else:
            assert "sample_logp" not in out


def test_decode_step_matches_teacher_forcing(soft, hard):
    """encode -> init_decode_state -> decode_step loop == __call__ (train=False), logits and alphas."""
    for task, batch, variables in (soft, hard):
        model = task.model
        params = {"params": variables["params"]}
        ref = _apply(task, variables, batch, train=False)

        logits, alphas, state = _step_loop(model, params, batch["image"], batch["tokens"][:, :-1].T)
        assert set(state) == {"h", "c", "annotations", "projected"}
        width = 16 + (model.position_dim if model.position_embedding != "none" else 0)   # [a_i; p_i]
        assert state["annotations"].shape == (B, L, width) and state["projected"].shape == (B, L, 16)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref["logits"]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(alphas), np.asarray(ref["alphas"]), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def deviations():
    """The deviations in several combinations: an added learned table with the word-conditioned
    query; the added sin-cos table with the paper's query; concatenated sin-cos (P = 8) and
    learned (P = 12) tables."""
    out = []
    for pe, query, pdim in (("learned", "hidden+word", 0), ("sincos", "hidden", 0), ("sincos", "hidden+word", 8),
                            ("learned", "hidden", 12)):
        task = sat_task.make_task(tiny_config(model__position_embedding=pe, model__attention_query=query,
                                              model__position_dim=pdim))
        batch = make_batch()
        out.append((task, batch, nn.meta.unbox(jax.jit(task.init)(jax.random.key(0), batch))))
    return out


def test_grid_sincos_embedding_values():
    """Row half depends on the row only, column half on the column only; the k = 0 pair is
    (sin(pos), cos(pos)); every cell's vector is distinct; dim not divisible by 4 is refused."""
    g, d = 5, 8
    table = np.asarray(grid_sincos_embedding(g, d)).reshape(g, g, d)
    np.testing.assert_allclose(table[:, :, :4], np.broadcast_to(table[:, :1, :4], (g, g, 4)))
    np.testing.assert_allclose(table[:, :, 4:], np.broadcast_to(table[:1, :, 4:], (g, g, 4)))
    np.testing.assert_allclose(table[3, 1, [0, 2]], [np.sin(3.0), np.cos(3.0)], atol=1e-6)
    np.testing.assert_allclose(table[3, 1, [4, 6]], [np.sin(1.0), np.cos(1.0)], atol=1e-6)
    np.testing.assert_allclose(table[0, 0, [1, 3]], [0.0, 1.0], atol=1e-6)   # w_1 = 10000**-0.5
    np.testing.assert_allclose(table[2, 0, 1], np.sin(2 * 0.01), atol=1e-6)
    flat = table.reshape(g * g, d)
    assert len({tuple(np.round(r, 5)) for r in flat}) == g * g
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_sincos_embedding(4, 6)


def test_position_embedding_enters_annotations(deviations):
    """encode adds p_i to every annotation: learned = the 'pos_embed' param [L, D], sincos = the fixed
    table; removing it recovers the paper's annotations exactly. With position_dim = P the table
    has P columns and is concatenated: a = [a_paper; p] of width D + P."""
    for task, batch, variables in deviations:
        params = {"params": variables["params"]}
        ann = np.asarray(task.model.apply(params, batch["image"], method=SATModel.encode))
        plain = task.model.clone(position_embedding="none")
        ann0 = np.asarray(plain.apply(params, batch["image"], method=SATModel.encode))
        pdim = task.model.position_dim
        table = (np.asarray(variables["params"]["pos_embed"]) if task.model.position_embedding == "learned"
                 else np.asarray(grid_sincos_embedding(G, pdim or 16)))
        assert table.shape == (L, pdim or 16)
        if pdim:
            assert ann.shape == (B, L, 16 + pdim)
            np.testing.assert_array_equal(ann[..., :16], ann0)
            np.testing.assert_allclose(ann[..., 16:], np.broadcast_to(table, (B, L, pdim)), atol=1e-6)
            continue
        np.testing.assert_allclose(ann - ann0, np.broadcast_to(table, ann.shape), atol=1e-5)
        if task.model.position_embedding == "sincos":     # position_scale multiplies the fixed table
            scaled = task.model.clone(position_scale=0.3)
            ann3 = np.asarray(scaled.apply(params, batch["image"], method=SATModel.encode))
            np.testing.assert_allclose(ann3 - ann0, np.broadcast_to(0.3 * table, ann.shape), atol=1e-5)


def test_word_conditioned_attention_query(deviations):
    """attention_query='hidden+word': the alphas at step t depend on the word fed at step t (y_{t-1});
    with the paper's query they do not (h_{t-1} has not seen it). Decoding still equals teacher forcing."""
    task, batch, variables = deviations[0]
    assert "att_y" in variables["params"]
    other = dict(batch, tokens=batch["tokens"].copy())
    other["tokens"][0, 3] = 4                            # change y at position 3 only
    for query, changes in (("hidden+word", True), ("hidden", False)):
        model = task.model.clone(attention_query=query)
        run = jax.jit(lambda p, tok: model.apply({"params": p}, batch["image"], tok, train=False)["alphas"])
        a, b = np.asarray(run(variables["params"], batch["tokens"])), np.asarray(run(variables["params"], other["tokens"]))
        np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)      # steps before position 3: same
        assert (np.abs(a[0, 3] - b[0, 3]).max() > 1e-6) == changes    # the step that reads y = tokens[3]
    for task, batch, variables in deviations:
        ref = _apply(task, variables, batch, train=False)
        logits, alphas, _ = _step_loop(task.model, {"params": variables["params"]}, batch["image"],
                                       batch["tokens"][:, :-1].T)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref["logits"]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(alphas), np.asarray(ref["alphas"]), atol=1e-5, rtol=0)


def test_every_param_has_logical_axes():
    boxed = jax.eval_shape(sat_task.make_task(tiny_config(model__annotation_dim=24)).init, jax.random.key(0),
                           make_batch())
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    names = {path[0].key for path, _ in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed["params"]))}
    assert {"encoder", "encoder_proj", "att_a", "att_h", "att_w", "gate_beta", "lstm_x", "lstm_h", "out_o"} <= names


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="model.encoder"):
        sat_task.make_task(tiny_config(model__encoder="vgg")).init(jax.random.key(0), make_batch())
    with pytest.raises(ValueError, match="model.vocab_size=-1"):
        sat_task.validate(tiny_config(model__vocab_size=-1))
    with pytest.raises(ValueError, match="model.position_embedding"):
        sat_task.validate(tiny_config(model__position_embedding="rope"))
    with pytest.raises(ValueError, match="model.attention_query"):
        sat_task.validate(tiny_config(model__attention_query="word"))
    with pytest.raises(ValueError, match=r"model.position_dim=6.*divisible by 4"):
        sat_task.validate(tiny_config(model__position_embedding="sincos", model__position_dim=6))
    with pytest.raises(ValueError, match="model.position_scale"):
        sat_task.validate(tiny_config(model__position_scale=0.0))
    with pytest.raises(ValueError, match="model.hard_expectation_warmup"):
        sat_task.validate(tiny_config(model__hard_expectation_warmup=-5))
    task = sat_task.make_task(tiny_config())
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        jax.eval_shape(task.init, jax.random.key(0), {"image": np.zeros((B, S, S)), "tokens": np.zeros((B, T), np.int32)})


# ---------------------------------------------------------------------------- losses
def test_masked_cross_entropy_ignores_pad():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    targets = np.array([[1, 2, 3, 0], [4, 0, 0, 0]])
    mask = targets != 0
    res = captioning.masked_cross_entropy(logits, targets, mask)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([logp[0, 0, 1], logp[0, 1, 2], logp[0, 2, 3], logp[1, 0, 4]])
    np.testing.assert_allclose(float(res.loss), expected, rtol=1e-6)
    assert float(res.num_tokens) == 4
    acc = np.mean([logits[0, 0].argmax() == 1, logits[0, 1].argmax() == 2, logits[0, 2].argmax() == 3,
                   logits[1, 0].argmax() == 4])
    np.testing.assert_allclose(float(res.accuracy), acc)
    # changing logits and target ids at pad positions changes nothing
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[~mask] = 100.0 * rng.normal(size=logits2[~mask].shape)
    targets2[~mask] = 3
    res2 = captioning.masked_cross_entropy(logits2, targets2, mask)
    np.testing.assert_allclose(float(res2.loss), float(res.loss), rtol=1e-6)
    assert np.all(np.asarray(res2.nll)[~mask] == 0)


def test_doubly_stochastic_hand_computed():
    # B=1, T=3 (last step is pad), L=2
    alphas = np.array([[[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]], np.float32)
    mask = np.array([[True, True, False]])
    # sum_t alpha over valid steps: [0.75, 1.25] -> (1-0.75)^2 + (1-1.25)^2 = 0.125; lambda=2;
    # divided by the 2 target tokens (same normaliser as the token cross-entropy)
    np.testing.assert_allclose(float(captioning.doubly_stochastic_reg(alphas, mask, 2.0)), 0.125, rtol=1e-6)
    # a second caption with coverage [1, 1] adds 0 to the sum but 2 tokens to the normaliser
    alphas2 = np.concatenate([alphas, np.array([[[0.5, 0.5], [0.5, 0.5], [0.3, 0.7]]], np.float32)])
    mask2 = np.array([[True, True, False], [True, True, False]])
    np.testing.assert_allclose(float(captioning.doubly_stochastic_reg(alphas2, mask2, 2.0)), 0.0625, rtol=1e-6)


def test_reinforce_baseline_and_surrogate_arithmetic():
    reward = jnp.array([-2.0, -4.0])
    sample_logp = jnp.array([[-0.5, -1.0, -7.0], [-0.25, 0.0, 0.0]])
    mask = jnp.array([[True, True, False], [True, True, True]])
    res = captioning.reinforce_hard_attention(reward, sample_logp, mask, jnp.float32(-1.0), decay=0.9,
                                              normalizer=jnp.float32(5.0))
    # b_new = 0.9 * (-1) + 0.1 * mean(-2, -4) = -1.2
    np.testing.assert_allclose(float(res.new_baseline), -1.2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(res.advantage), [-1.0, -3.0])
    # loss = -[(-1)(-1.5) + (-3)(-0.25)] / 5 = -0.45
    np.testing.assert_allclose(float(res.loss), -0.45, rtol=1e-6)
    # gradient flows only through log p(s): d loss / d sample_logp = -(r - b) m / normalizer
    g = jax.grad(lambda lp, r: captioning.reinforce_hard_attention(
        r, lp, mask, jnp.float32(-1.0), decay=0.9, normalizer=jnp.float32(5.0)).loss, argnums=(0, 1))(sample_logp, reward)
    np.testing.assert_allclose(np.asarray(g[0]), [[0.2, 0.2, 0.0], [0.6, 0.6, 0.6]], rtol=1e-6)
    assert np.all(np.asarray(g[1]) == 0)
    # the baseline moves with the captions that sampled: caption 1 used the expectation
    part = captioning.reinforce_hard_attention(reward, sample_logp.at[1].set(0.0), mask, jnp.float32(-1.0), decay=0.9,
                                               normalizer=jnp.float32(5.0), sampled=jnp.array([True, False]))
    np.testing.assert_allclose(float(part.new_baseline), 0.9 * -1 + 0.1 * -2, rtol=1e-6)
    none = captioning.reinforce_hard_attention(reward, jnp.zeros_like(sample_logp), mask, jnp.float32(-1.0), decay=0.9,
                                               normalizer=jnp.float32(5.0), sampled=jnp.array([False, False]))
    assert float(none.new_baseline) == -1.0 and float(none.loss) == 0.0
    # a per-caption reference replaces b in the advantage; b still moves
    ref = captioning.reinforce_hard_attention(reward, sample_logp, mask, jnp.float32(-1.0), decay=0.9,
                                              normalizer=jnp.float32(5.0), reference=jnp.array([-2.5, -3.0]))
    np.testing.assert_allclose(np.asarray(ref.advantage), [0.5, -1.0])
    np.testing.assert_allclose(float(ref.loss), -(0.5 * -1.5 + -1.0 * -0.25) / 5, rtol=1e-6)
    np.testing.assert_allclose(float(ref.new_baseline), -1.2, rtol=1e-6)


def test_multi_sample_reinforce_leave_one_out_baseline():
    """K = 3 copies of each of 2 captions: a sampled copy's advantage is its reward minus the mean
    of the other *sampled* copies of the same caption; a copy with no other sampled copy falls
    back to the reference (or the running baseline); copies that did not sample add nothing."""
    reward = jnp.array([-1.0, -2.0, -6.0, -3.0, -5.0, -4.0])
    sampled = jnp.array([True, True, True, True, False, False])
    logp = jnp.array([[-1.0], [-2.0], [-0.5], [-1.0], [0.0], [0.0]])
    mask = jnp.ones((6, 1), bool)
    res = captioning.reinforce_hard_attention(reward, logp, mask, jnp.float32(-10.0), decay=0.5,
                                              normalizer=jnp.float32(6.0), sampled=sampled, samples_per_caption=3)
    # caption 0: -1 - (-2 - 6)/2 = 3; -2 - (-1 - 6)/2 = 1.5; -6 - (-1 - 2)/2 = -4.5
    # caption 1: copy 0 alone sampled -> the running baseline: -3 - (-10) = 7
    np.testing.assert_allclose(np.asarray(res.advantage)[:4], [3.0, 1.5, -4.5, 7.0], rtol=1e-6)
    np.testing.assert_allclose(float(res.loss), -(3.0 * -1 + 1.5 * -2 + -4.5 * -0.5 + 7.0 * -1) / 6, rtol=1e-6)
    ref = captioning.reinforce_hard_attention(reward, logp, mask, jnp.float32(-10.0), decay=0.5,
                                              normalizer=jnp.float32(6.0), sampled=sampled, samples_per_caption=3,
                                              reference=jnp.full((6,), -3.5))
    np.testing.assert_allclose(np.asarray(ref.advantage)[:4], [3.0, 1.5, -4.5, 0.5], rtol=1e-6)
    # the leave-one-out advantages of a caption whose copies all sampled sum to 0 (the K/(K-1)
    # scaled centred rewards)
    np.testing.assert_allclose(float(jnp.sum(res.advantage[:3])), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="samples_per_caption"):
        captioning.reinforce_hard_attention(reward[:5], logp[:5], mask[:5], jnp.float32(0.0), decay=0.5,
                                            normalizer=jnp.float32(5.0), samples_per_caption=3)


def test_reward_to_go_and_per_step_reinforce():
    """model.hard_reward='to_go': step t's sample is weighted by the log-likelihood of the words
    from t on (discounted by gamma), minus the same sum under the reference / the other copies."""
    nll = jnp.array([[1.0, 2.0, 4.0, 0.0], [0.5, 0.5, 0.0, 0.0]])   # 0 at pad
    np.testing.assert_allclose(np.asarray(captioning.reward_to_go(nll)),
                               [[-7.0, -6.0, -4.0, 0.0], [-1.0, -0.5, 0.0, 0.0]], rtol=1e-6)
    # gamma 0.5: r_0 = -(1 + 0.5*2 + 0.25*4) = -3, r_1 = -(2 + 0.5*4) = -4, r_2 = -4
    np.testing.assert_allclose(np.asarray(captioning.reward_to_go(nll, 0.5))[0], [-3.0, -4.0, -4.0, 0.0], rtol=1e-6)
    # gamma 0: each step's own word only
    np.testing.assert_allclose(np.asarray(captioning.reward_to_go(nll, 0.0)), -np.asarray(nll), rtol=1e-6)
    # r_b0 with gamma 1 is the caption's log-likelihood
    np.testing.assert_allclose(np.asarray(captioning.reward_to_go(nll))[:, 0],
                               np.asarray(captioning.caption_log_likelihood(nll)), rtol=1e-6)

    mask = nll > 0
    reward = captioning.reward_to_go(nll)
    reference = captioning.reward_to_go(jnp.array([[2.0, 1.0, 3.0, 0.0], [0.5, 0.25, 0.0, 0.0]]))
    logp = jnp.array([[-1.0, -2.0, -0.5, -9.0], [-0.25, -1.0, -9.0, -9.0]])
    res = captioning.reinforce_hard_attention(reward, logp, mask, jnp.float32(-1.0), decay=0.5,
                                              normalizer=jnp.float32(5.0), reference=reference)
    # advantages: [-7+6, -6+4, -4+3] = [-1, -2, -1]; [-1+0.75, -0.5+0.25] = [-0.25, -0.25]
    np.testing.assert_allclose(np.asarray(res.advantage)[0, :3], [-1.0, -2.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(res.advantage)[1, :2], [-0.25, -0.25], rtol=1e-6)
    want = -(-1.0 * -1 + -2.0 * -2 + -1.0 * -0.5 + -0.25 * -0.25 + -0.25 * -1.0) / 5   # pad steps add nothing
    np.testing.assert_allclose(float(res.loss), want, rtol=1e-6)
    # a step's gradient is minus its own advantage / 5 (the paper's: the caption's, -7 + 6 = -1, at every step)
    g = jax.grad(lambda lp: captioning.reinforce_hard_attention(
        reward, lp, mask, jnp.float32(-1.0), decay=0.5, normalizer=jnp.float32(5.0), reference=reference).loss)(logp)
    np.testing.assert_allclose(np.asarray(g)[0], [0.2, 0.4, 0.2, 0.0], rtol=1e-6)
    # the running baseline still tracks the caption log-likelihood r_b0: 0.5 * -1 + 0.5 * mean(-7, -1)
    np.testing.assert_allclose(float(res.new_baseline), -2.5, rtol=1e-6)
    # with a discount, r_b0 is no longer log p(y): the caller passes the caption's own
    disc = captioning.reinforce_hard_attention(captioning.reward_to_go(nll, 0.5), logp, mask, jnp.float32(-1.0),
                                               decay=0.5, normalizer=jnp.float32(5.0),
                                               reference=captioning.reward_to_go(nll, 0.5),
                                               caption_reward=captioning.caption_log_likelihood(nll))
    np.testing.assert_allclose(float(disc.new_baseline), -2.5, rtol=1e-6)
    assert float(disc.loss) == 0.0                    # reward == reference: no advantage anywhere
    # leave-one-out per step: 2 copies of caption 0 -> each step's advantage is r_t minus the other's r_t
    two = jnp.stack([reward[0], reference[0]])
    loo = captioning.reinforce_hard_attention(two, logp[:1].repeat(2, 0), mask[:1].repeat(2, 0), jnp.float32(0.0),
                                              decay=0.5, normalizer=jnp.float32(3.0), samples_per_caption=2)
    np.testing.assert_allclose(np.asarray(loo.advantage)[:, :3], [[-1.0, -2.0, -1.0], [1.0, 2.0, 1.0]], rtol=1e-6)
    # per-step rewards without a per-caption baseline are refused
    with pytest.raises(ValueError, match="per-caption baseline"):
        captioning.reinforce_hard_attention(reward, logp, mask, jnp.float32(0.0), decay=0.5, normalizer=jnp.float32(5.0))


def test_hard_reward_to_go_config_trains_and_is_checked(hard):
    cfg = tiny_config(model__attention="hard", model__hard_reward="to_go", model__hard_baseline="expectation",
                      model__hard_sample_fraction=0.0)
    sat_task.validate(cfg)
    task = sat_task.make_task(cfg)
    _, batch, variables = hard
    grads, (m, _) = jax.grad(lambda p: task.loss_fn(p, variables["model_state"], batch, jax.random.key(1), train=True),
                             has_aux=True)(variables["params"])
    assert np.isfinite(float(m["reinforce"])) and float(m["advantage_abs"]) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    # the same rng and samples scored the paper's way give another REINFORCE term
    paper = sat_task.make_task(tiny_config(model__attention="hard", model__hard_baseline="expectation",
                                           model__hard_sample_fraction=0.0))
    _, (mp, _) = paper.loss_fn(variables["params"], variables["model_state"], batch, jax.random.key(1), train=True)
    assert float(mp["xent"]) == float(m["xent"]) and float(mp["reinforce"]) != float(m["reinforce"])
    from vlm_jax.config_lib import ConfigError
    with pytest.raises(ConfigError, match="hard_baseline=expectation"):
        sat_task.validate(tiny_config(model__attention="hard", model__hard_reward="to_go"))
    with pytest.raises(ConfigError, match="hard_sample_fraction=0"):   # K copies, but some may not sample
        sat_task.validate(tiny_config(model__attention="hard", model__hard_reward="to_go", model__hard_samples=4))
    sat_task.validate(tiny_config(model__attention="hard", model__hard_reward="to_go", model__hard_samples=4,
                                  model__hard_sample_fraction=0.0))
    with pytest.raises(ConfigError, match="hard_reward_discount"):
        sat_task.validate(tiny_config(model__attention="hard", model__hard_reward="to_go",
                                       model__hard_baseline="expectation", model__hard_reward_discount=1.5))


def test_multi_sample_hard_loss_tiles_the_batch(hard):
    """model.hard_samples = 2: the training loss sees every caption twice (twice the tokens), the
    evaluation loss once; gradients stay finite."""
    task = sat_task.make_task(tiny_config(model__attention="hard", model__hard_samples=2,
                                          model__hard_sample_fraction=0.0))
    _, batch, variables = hard
    loss, (m, _) = task.loss_fn(variables["params"], variables["model_state"], batch, jax.random.key(0), train=True)
    _, (m_eval, _) = task.loss_fn(variables["params"], variables["model_state"], batch, jax.random.key(0), train=False)
    assert float(m["num_tokens"]) == 2 * float(m_eval["num_tokens"])
    g = jax.grad(lambda p: task.loss_fn(p, variables["model_state"], batch, jax.random.key(0), train=True)[0])(
        variables["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_hard_loss_metrics_and_attention_gradients(hard):
    """Every caption samples (fraction 0): the attention MLP gets gradient only through REINFORCE
    (non-zero, finite); the cross-entropy alone gives it none, since z = a_{s_t} ignores alpha."""
    task = sat_task.make_task(tiny_config(model__attention="hard", model__hard_sample_fraction=0.0,
                                          model__ds_lambda=0.0, model__hard_entropy_weight=0.0))
    _, batch, variables = hard  # same parameter tree (the sample fraction has no parameters)
    assert float(variables["model_state"]["reinforce_baseline"]) == 0.0

    @jax.jit
    def grads(params, model_state, batch, rng):
        def f(p):  # (total loss, cross-entropy alone): one reverse pass for both rows
            loss, (metrics, new_state) = task.loss_fn(p, model_state, batch, rng, train=True)
            return jnp.stack([loss, metrics["xent"]]), (loss, metrics, new_state)
        jac, (loss, metrics, new_state) = jax.jacrev(f, has_aux=True)(params)
        return loss, metrics, new_state, jax.tree.map(lambda x: x[0], jac), jax.tree.map(lambda x: x[1], jac)

    loss, metrics, new_state, g, xent_g = grads(variables["params"], variables["model_state"], batch,
                                                jax.random.key(3))
    assert set(metrics) >= {"loss", "xent", "ds_reg", "accuracy", "num_tokens", "reinforce", "entropy", "baseline"}
    assert float(metrics["num_tokens"]) == 7 + 4
    # baseline after one batch: 0.9 * 0 + 0.1 * mean reward, reward = -(sum of token NLLs per caption)
    # mean reward = -(sum of all token NLLs) / B = -xent * num_tokens / B
    expected_b = 0.1 * (-float(metrics["xent"]) * 11 / B)
    np.testing.assert_allclose(float(new_state["reinforce_baseline"]), expected_b, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["baseline"]), expected_b, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(metrics["xent"] + metrics["reinforce"]), rtol=1e-5)
    for name in ("att_a", "att_h", "att_w"):
        for leaf in jax.tree.leaves(g[name]):
            assert np.all(np.isfinite(np.asarray(leaf)))
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[name])) > 1e-6, name
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(xent_g[name])) == 0.0, name


def test_hard_attention_schedules_arithmetic():
    sch = functools.partial(captioning.hard_attention_schedule, expectation_prob=0.5, expectation_warmup=400,
                            entropy_weight=0.02, entropy_decay=1000)
    for t, p, lam in ((0, 1.0, 0.02), (100, 0.875, 0.018), (400, 0.5, 0.012), (2000, 0.5, 0.0)):
        out = sch(jnp.int32(t))
        np.testing.assert_allclose([float(out.expectation_prob), float(out.entropy_weight)], [p, lam], rtol=1e-6)
    paper = captioning.hard_attention_schedule(jnp.int32(7), expectation_prob=0.5, expectation_warmup=0,
                                               entropy_weight=0.01, entropy_decay=0)
    np.testing.assert_array_equal([paper.expectation_prob, paper.entropy_weight], np.float32([0.5, 0.01]))


def test_hard_expectation_warmup_in_the_loss(hard):
    """With the warm-up, update 0 uses the expectation for every caption (no location sampled, so
    the REINFORCE term is exactly 0 and the loss is soft attention's minus the entropy bonus); the
    update counter in model_state advances, and after the warm-up captions sample again."""
    task = sat_task.make_task(tiny_config(model__attention="hard", model__hard_sample_fraction=0.0,
                                          model__hard_expectation_warmup=3, model__hard_entropy_decay=2,
                                          model__hard_entropy_weight=0.5))
    _, batch, variables = hard
    state = dict(variables["model_state"])
    assert int(state["hard_updates"]) == 0
    fn = jax.jit(lambda st, r: task.loss_fn(variables["params"], st, batch, r, train=True))
    _, (m0, s1) = fn(state, jax.random.key(4))
    assert float(m0["expectation_prob"]) == 1.0 and float(m0["reinforce"]) == 0.0
    assert float(m0["entropy_weight"]) == 0.5 and int(s1["hard_updates"]) == 1
    np.testing.assert_allclose(float(m0["loss"]), float(m0["xent"] + m0["ds_reg"] - 0.5 * m0["entropy"]), rtol=1e-5)
    _, (m3, s4) = fn(dict(s1, hard_updates=jnp.int32(3)), jax.random.key(4))
    assert float(m3["expectation_prob"]) == 0.0 and float(m3["entropy_weight"]) == 0.0
    assert float(m3["reinforce"]) != 0.0 and int(s4["hard_updates"]) == 4
    _, (me, se) = jax.jit(lambda st: task.loss_fn(variables["params"], st, batch, jax.random.key(4), train=False))(state)
    assert int(se["hard_updates"]) == 0 and float(me["reinforce"]) == 0.0   # evaluation leaves the state alone


def test_hard_expectation_baseline(hard):
    """model.hard_baseline='expectation': each sampled caption's advantage is its log-likelihood
    minus the same caption's under the expected context (same dropout), so it is 0 for a
    caption whose sampled locations carry what the expectation does, and the loss differs from
    the moving-average baseline's only in the REINFORCE term."""
    _, batch, variables = hard
    cfg = dict(model__attention="hard", model__hard_sample_fraction=0.0, model__ds_lambda=0.0,
               model__hard_entropy_weight=0.0, model__dropout=0.0)
    task = sat_task.make_task(tiny_config(model__hard_baseline="expectation", **cfg))
    _, (m, _) = jax.jit(lambda p, st: task.loss_fn(p, st, batch, jax.random.key(5), train=True))(
        variables["params"], variables["model_state"])
    r = jax.random.split(jax.random.key(5))
    run = lambda p_exp: task.model.apply({"params": variables["params"]}, batch["image"], batch["tokens"], train=True,
                                         expectation_prob=p_exp, rngs={"dropout": r[0], "hard": r[1]})
    mask = batch["tokens"][:, 1:] != 0
    ll = lambda out: captioning.caption_log_likelihood(
        captioning.masked_cross_entropy(out["logits"], batch["tokens"][:, 1:], mask).nll)
    want = np.mean(np.abs(np.asarray(ll(run(0.0)) - ll(run(1.0)))))
    np.testing.assert_allclose(float(m["advantage_abs"]), want, rtol=1e-5)
    assert want > 0
    plain = sat_task.make_task(tiny_config(**cfg))
    _, (m0, _) = jax.jit(lambda p, st: plain.loss_fn(p, st, batch, jax.random.key(5), train=True))(
        variables["params"], variables["model_state"])
    np.testing.assert_allclose(float(m["xent"]), float(m0["xent"]), rtol=1e-6)
    assert float(m["reinforce"]) != float(m0["reinforce"])
    with pytest.raises(ValueError, match="model.hard_baseline"):
        sat_task.validate(tiny_config(model__hard_baseline="greedy"))


def test_hard_decode_argmax_reads_the_most_attended_cell(hard):
    """model.hard_decode='argmax': outside training the context is a_{argmax alpha_t} (checked
    against the annotations picked by hand at the first step), decoding still equals teacher
    forcing, and the logits differ from the paper's expectation rule on the same parameters."""
    _, batch, variables = hard
    task = sat_task.make_task(tiny_config(model__attention="hard", model__hard_decode="argmax"))
    params = {"params": variables["params"]}
    model = task.model
    ref = _apply(task, variables, batch, train=False)
    logits, alphas, _ = _step_loop(model, params, batch["image"], batch["tokens"][:, :-1].T)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref["logits"]), atol=1e-5, rtol=0)
    expect = _apply(sat_task.make_task(tiny_config(model__attention="hard")), variables, batch, train=False)
    np.testing.assert_allclose(np.asarray(ref["alphas"][:, 0]), np.asarray(expect["alphas"][:, 0]), atol=1e-6)
    assert not np.allclose(np.asarray(ref["logits"]), np.asarray(expect["logits"]), atol=1e-4)
    # step 0 by hand: the LSTM input context is beta_0 * a_{argmax alpha_0}
    ann = model.apply(params, batch["image"], method=SATModel.encode)
    state = model.apply(params, ann, method=SATModel.init_decode_state)
    best = np.argmax(np.asarray(ref["alphas"][:, 0]), axis=-1)
    picked = np.asarray(ann)[np.arange(B), best]                                   # [B, D]
    hand = model.apply(params, state, batch["tokens"][:, 0], None, False,
                       method=lambda m, st, y, u, tr: m._step(dict(st, annotations=jnp.broadcast_to(
                           jnp.asarray(picked)[:, None], st["annotations"].shape)), y, u, tr)[1]["logits"])
    np.testing.assert_allclose(np.asarray(hand), np.asarray(ref["logits"][:, 0]), atol=1e-5)
    with pytest.raises(ValueError, match="model.hard_decode"):
        sat_task.validate(tiny_config(model__hard_decode="sample"))


def test_hard_reference_pass_shares_encoder_and_dropout(hard):
    """`with_reference=True` decodes every caption a second time with the expected context, from
    the main pass's annotations and dropout masks: with every caption on the expectation
    (expectation_prob=1) the two passes are the same computation, so their logits are equal even
    with dropout on; with sampling they differ; without dropout the reference equals a separate
    all-expectation forward; the encoder runs once."""
    _, batch, variables = hard
    task = sat_task.make_task(tiny_config(model__attention="hard", model__dropout=0.5))
    rngs = {"dropout": jax.random.key(1), "hard": jax.random.key(2)}
    run = lambda p_exp: task.model.apply({"params": variables["params"]}, batch["image"], batch["tokens"], train=True,
                                         expectation_prob=p_exp, with_reference=True, rngs=rngs)
    same = run(1.0)
    np.testing.assert_array_equal(np.asarray(same["logits"]), np.asarray(same["reference_logits"]))
    sampled = run(0.0)
    assert bool(np.all(sampled["sampled"]))
    assert not np.allclose(np.asarray(sampled["logits"]), np.asarray(sampled["reference_logits"]))
    # the reference's dropout is the main pass's: a separate forward (own masks) differs
    alone = task.model.apply({"params": variables["params"]}, batch["image"], batch["tokens"], train=True,
                             expectation_prob=1.0, rngs=rngs)
    assert not np.allclose(np.asarray(alone["logits"]), np.asarray(same["reference_logits"]))
    nodrop = sat_task.make_task(tiny_config(model__attention="hard", model__dropout=0.0))
    ref = nodrop.model.apply({"params": variables["params"]}, batch["image"], batch["tokens"], train=True,
                             expectation_prob=0.0, with_reference=True, rngs=rngs)["reference_logits"]
    want = nodrop.model.apply({"params": variables["params"]}, batch["image"], batch["tokens"], train=True,
                              expectation_prob=1.0, rngs=rngs)["logits"]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-5, atol=1e-5)
    # the loss with the expectation baseline encodes the images once (calls counted by interception)
    calls = []

    def count(next_fun, args, kwargs, context):
        if context.method_name == "encode":
            calls.append(1)
        return next_fun(*args, **kwargs)

    loss_task = sat_task.make_task(tiny_config(model__attention="hard", model__hard_baseline="expectation"))
    with nn.intercept_methods(count):
        loss_task.loss_fn(variables["params"], variables["model_state"], batch, jax.random.key(3), train=True)
    assert len(calls) == 1


# ---------------------------------------------------------------------------- task
def test_param_groups_freeze_encoder(soft):
    from vlm_jax import optim
    task, _, variables = soft
    assert task.param_groups() == ()
    frozen = sat_task.make_task(tiny_config(model__freeze_encoder=True))
    groups = frozen.param_groups()
    table = optim.group_table((), groups)
    labels = optim.assign_groups(variables["params"], (), groups)
    assert {table[x].trainable for x in jax.tree.leaves(labels["encoder"])} == {False}
    assert all({table[x].trainable for x in jax.tree.leaves(sub)} == {True} for k, sub in labels.items()
               if k != "encoder")
    # the frozen encoder's output is cut from the graph
    g = jax.jit(jax.grad(lambda p: frozen.loss_fn(p, {}, make_batch(), jax.random.key(0), train=True)[0]))(
        variables["params"])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["encoder"]))
    assert float(jnp.abs(g["lstm_x"]["kernel"]).max()) > 0


def test_predict_beam_search(soft):
    pytest.importorskip("vlm_jax.decoding")
    task, batch, variables = soft
    max_len = 5
    predict = jax.jit(task.predict, static_argnames=("beam_size", "max_len", "length_penalty", "bos_id", "eos_id"))
    out = predict(variables["params"], variables["model_state"], batch["image"], beam_size=1, max_len=max_len,
                  length_penalty=0.0, bos_id=1, eos_id=2)
    assert out["tokens"].shape == (B, max_len) and out["scores"].shape == (B,)
    assert out["alphas"].shape == (B, max_len, L)
    # beam 1 == greedy: replay argmax decoding with decode_step
    bos = jnp.ones((max_len, B), jnp.int32)
    logits, alphas, _ = _step_loop(task.model, {"params": variables["params"]}, batch["image"], bos, greedy=True)
    greedy = np.asarray(jnp.argmax(logits, -1))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(np.asarray(out["alphas"][:, 0]), np.asarray(alphas[:, 0]), atol=1e-5)
    for b in range(B):
        ref = list(greedy[b])
        if 2 in ref:
            ref = ref[:ref.index(2) + 1]
        np.testing.assert_array_equal(np.asarray(out["tokens"][b, :len(ref)]), ref)
        assert np.all(np.asarray(out["tokens"][b, len(ref):]) == 0)
        # score = sum log p (length_penalty 0)
        np.testing.assert_allclose(float(out["scores"][b]), sum(logp[b, t, w] for t, w in enumerate(ref)), rtol=1e-5)
    beam = predict(variables["params"], variables["model_state"], batch["image"], beam_size=3, max_len=max_len,
                   length_penalty=0.0, bos_id=1, eos_id=2)
    assert np.all(np.asarray(beam["scores"]) >= np.asarray(out["scores"]) - 1e-5)


def test_overfits_two_examples(soft):
    """30 Adam steps on one 2-caption batch: the loss falls to a small fraction of its start."""
    task, batch, variables = soft
    params = variables["params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, rng):
        (loss, (metrics, _)), g = jax.value_and_grad(
            lambda p: task.loss_fn(p, {}, batch, rng, train=True), has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state = tx.init(params)
    first = None
    for i in range(30):
        params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
        first = float(metrics["xent"]) if first is None else first
    last = float(metrics["xent"])
    assert first > 2.0, first  # ~log(13) at init
    assert last < 0.2 * first, (first, last)
    assert float(metrics["accuracy"]) > 0.9
