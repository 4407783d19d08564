"""BLIP-2 stage 1: the Q-Former's query/text routing, the ITC/ITM/ITG objective pieces, the
sharded loss, hard negatives across devices, frozen towers, the temperature clamp, the paper-size
parameter count, and the task through the trainer (configs/blip2.py:tiny).
(HF import and parity: tests/test_blip2_convert.py.)"""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import family_config
from vlm_jax import config_lib, optim, sharding, train_lib
from vlm_jax.layers import masks
from vlm_jax.layers.vit import ViTConfig, VisionTransformer
from vlm_jax.models import blip2
from vlm_jax.objectives import contrastive



def blip2_config(data_dir, arg="tiny", **overrides):
    return family_config("blip2", data_dir, arg, **overrides)


def _tiny_model(**q):
    """Odd sizes: 12 px images, patch 4 (9 patches), ViT 20 wide; Q-Former 30 wide, 3 heads, 4 layers
    (cross-attention in 0 and 3), 3 queries, vocab 23."""
    vit = VisionTransformer(ViTConfig(image_size=12, patch_size=4, hidden_size=20, num_layers=1, num_heads=2,
                                      mlp_dim=28, pool="none"))
    qcfg = dict(num_queries=3, width=30, num_layers=4, num_heads=3, mlp_dim=34, vocab_size=23, max_positions=10,
                cross_attention_every=3)
    qcfg.update(q)
    return blip2.Blip2QFormerModel(vit, blip2.Blip2Config(qformer=blip2.QFormerConfig(**qcfg), embed_dim=6))


def _inputs(b=2, t=6, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(b, 12, 12, 3)), jnp.float32)
    tokens = rng.integers(3, 23, size=(b, t)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[0, 4:] = 0                                     # row 0: 4 real tokens, 2 pads
    return images, jnp.asarray(tokens), jnp.asarray(tokens != 0)


@pytest.fixture(scope="module")
def tiny():
    model = _tiny_model()
    images, tokens, valid = _inputs()
    params = model.init(jax.random.key(1), images, tokens, valid)["params"]
    # non-trivial norms and biases, so that a wrong routing shows
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params


# ----------------------------------------------------------------------------- Q-Former routing
def test_query_and_text_streams_match_separate_passes(tiny):
    """Under the ITC (unimodal) mask one pass over [queries; text] gives exactly the image-only
    pass on the query rows and the text-only pass on the text rows; under the ITG mask the query
    rows still equal the image-only pass (what the stage-1 loss relies on)."""
    model, params = tiny
    images, tokens, valid = _inputs()
    q = model.config.qformer.num_queries

    def run(method, *a, **k):
        return model.apply({"params": params}, *a, method=method, **k)

    feats = run(blip2.Blip2QFormerModel.image_features, images)
    qf = lambda *a, **k: run(lambda m, *a, **k: m.qformer(*a, **k)[0], *a, **k)  # noqa: E731
    image_only = qf(feats)
    text_only = qf(tokens=tokens, mask=masks.padding_mask(valid))
    joint = qf(feats, tokens, mask=masks.qformer_itc_mask(q, valid))
    np.testing.assert_allclose(joint[:, :q], image_only, atol=1e-5)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(joint[:, q:])[real], np.asarray(text_only)[real], atol=1e-5)
    itg = qf(feats, tokens, mask=masks.qformer_itg_mask(q, valid))
    np.testing.assert_allclose(itg[:, :q], image_only, atol=1e-5)
    # the bidirectional (ITM) pass does mix the streams
    itm = qf(feats, tokens, mask=masks.qformer_itm_mask(q, valid))
    assert float(jnp.max(jnp.abs(itm[:, :q] - image_only))) > 1e-3


def test_padding_never_changes_real_positions(tiny):
    model, params = tiny
    images, tokens, valid = _inputs()
    longer = jnp.pad(tokens, ((0, 0), (0, 3)))
    run = lambda m, *a: model.apply({"params": params}, *a, method=m)  # noqa: E731
    feats = run(blip2.Blip2QFormerModel.image_features, images)
    for method in (blip2.Blip2QFormerModel.itm_logits,):
        np.testing.assert_allclose(run(method, feats, tokens, valid), run(method, feats, longer, longer != 0),
                                   atol=1e-5)
    np.testing.assert_allclose(run(blip2.Blip2QFormerModel.text_embeds, tokens, valid),
                               run(blip2.Blip2QFormerModel.text_embeds, longer, longer != 0), atol=1e-5)
    a, _ = run(blip2.Blip2QFormerModel.itg_pass, feats, tokens, valid)
    b, _ = run(blip2.Blip2QFormerModel.itg_pass, feats, longer, longer != 0)
    np.testing.assert_allclose(np.asarray(a)[np.asarray(valid)], np.asarray(b[:, :6])[np.asarray(valid)], atol=1e-4)


def test_itg_is_causal_over_text(tiny):
    """Changing text token 3 changes no ITG logit before position 3."""
    model, params = tiny
    images, tokens, valid = _inputs()
    run = lambda m, *a: model.apply({"params": params}, *a, method=m)  # noqa: E731
    feats = run(blip2.Blip2QFormerModel.image_features, images)
    a, _ = run(blip2.Blip2QFormerModel.itg_pass, feats, tokens, valid)
    b, _ = run(blip2.Blip2QFormerModel.itg_pass, feats, tokens.at[:, 3].set(7), valid)
    np.testing.assert_array_equal(np.asarray(a[:, :3]), np.asarray(b[:, :3]))
    assert float(jnp.max(jnp.abs(a[1, 3:] - b[1, 3:]))) > 1e-4


# ----------------------------------------------------------------------------- objective pieces
def test_smoothed_nll_equals_torch_label_smoothing():
    import torch
    rng = np.random.default_rng(0)
    logits, target = rng.normal(size=(5, 7)).astype(np.float32), rng.integers(0, 7, 5)
    ours = contrastive.smoothed_nll(jnp.asarray(logits), jnp.asarray(target), smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(target), label_smoothing=0.1,
                                            reduction="none")
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-6)
    # excluded classes behave as if they were not there
    allowed = np.ones((5, 7), bool)
    allowed[:, 6] = False
    allowed[np.arange(5), target] = True
    sub = contrastive.smoothed_nll(jnp.asarray(np.where(allowed, logits, 99.0)), jnp.asarray(target),
                                   jnp.asarray(allowed), smoothing=0.1)
    for i in range(5):
        keep = np.flatnonzero(allowed[i])
        ref_i = torch.nn.functional.cross_entropy(torch.tensor(logits[i, keep][None]),
                                                  torch.tensor([int(np.flatnonzero(keep == target[i])[0])]),
                                                  label_smoothing=0.1)
        np.testing.assert_allclose(float(sub[i]), float(ref_i), atol=1e-6)


def test_itc_same_image_pairs_are_not_negatives():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 4)).astype(np.float32)
    ids = jnp.asarray([5, 5, 7, 8])                       # rows 0 and 1 show the same image
    loss, _ = contrastive.itc_loss(jnp.asarray(logits), ids, smoothing=0.1)
    moved = logits.copy()
    moved[0, 1] = moved[1, 0] = 50.0                      # a same-image pair scoring high costs nothing
    loss2, _ = contrastive.itc_loss(jnp.asarray(moved), ids, smoothing=0.1)
    np.testing.assert_allclose(loss, loss2, atol=1e-6)
    moved[0, 2] = 50.0                                    # a true negative scoring high does
    loss3, _ = contrastive.itc_loss(jnp.asarray(moved), ids, smoothing=0.1)
    assert float(loss3) > float(loss) + 1.0


def test_hard_negatives_exclude_positives_and_same_image_pairs():
    rng = np.random.default_rng(2)
    b = 12
    ids = jnp.asarray(rng.integers(0, 5, size=b))          # many duplicates
    exclude = contrastive.same_image_pairs(ids)
    sims = jnp.asarray(rng.normal(size=(b, b)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 400)
    idx, found = jax.vmap(lambda k: contrastive.sample_hard_negatives(k, sims, exclude))(keys)
    idx, found = np.asarray(idx), np.asarray(found)
    ex = np.asarray(exclude)
    rows = np.arange(b)
    for r in rows:
        if not found[0, r]:
            assert ex[r].all()
            continue
        assert not ex[r, idx[:, r]].any(), f"row {r} drew an excluded column"
    # sampling follows softmax(sim) over the allowed columns: the most similar allowed one is drawn most
    r = int(np.flatnonzero(found[0])[0])
    p = np.where(ex[r], -np.inf, np.asarray(sims[r]))
    freq = np.bincount(idx[:, r], minlength=b) / len(keys)
    expected = np.exp(p - p.max()) / np.exp(p - p.max()).sum()
    assert np.argmax(freq) == np.argmax(expected) and np.abs(freq - expected).max() < 0.1
    # a row with no allowed column is flagged
    _, found_all = contrastive.sample_hard_negatives(jax.random.key(0), sims[:2, :2],
                                                     jnp.ones((2, 2), bool))
    assert not np.asarray(found_all).any()


def test_objective_subsets_sum_exactly_their_terms(tiny):
    """model.objectives (the paper's ablation): the loss is the sum of the chosen terms only, each
    term equals its value in the full objective (same rng: same dropout-free passes and negatives),
    left-out terms are not logged and send no gradient to their heads."""
    from vlm_jax.objectives.blip2 import parse_objectives, stage1_loss
    model, params = tiny
    images, tokens, _ = _inputs(b=4, seed=3)
    batch = {"image": images, "tokens": tokens, "image_id": jnp.asarray([0, 1, 1, 2])}
    loss_of = lambda p, obj: stage1_loss(model, p, batch, jax.random.key(5), dec_id=2, pad_id=0,  # noqa: E731
                                         objectives=obj, train=False)
    run = jax.jit(loss_of, static_argnums=1)
    full, mf = run(params, "itc,itm,itg")
    np.testing.assert_allclose(full, mf["loss_itc"] + mf["loss_itm"] + mf["loss_itg"], rtol=1e-6)
    terms = {"itc": "loss_itc", "itm": "loss_itm", "itg": "loss_itg"}
    assert parse_objectives("itm, ITC") == ("itc", "itm")
    for obj in ("itc", "itc,itm"):
        loss, m = run(params, obj)
        chosen = parse_objectives(obj)
        np.testing.assert_allclose(loss, sum(mf[terms[t]] for t in chosen), rtol=2e-5, err_msg=obj)
        for t, key in terms.items():
            if t in chosen:
                np.testing.assert_allclose(m[key], mf[key], rtol=2e-5, err_msg=(obj, key))
            else:
                assert key not in m, (obj, key)
    # ITM alone: its hard negatives come from ITC similarities that get no gradient
    (loss, m), g = jax.jit(jax.value_and_grad(lambda p: loss_of(p, "itm"), has_aux=True))(params)
    np.testing.assert_allclose(loss, mf["loss_itm"], rtol=2e-5)
    g = flax.linen.unbox(g)
    assert not np.any(np.asarray(g["temp"])) and not np.any(np.asarray(g["text_proj"]["kernel"]))
    assert not np.any(np.asarray(g["qformer"]["lm_bias"]))
    assert np.any(np.asarray(g["itm_head"]["kernel"]))
    for bad in ("", "itc,itc", "itc,mlm"):
        with pytest.raises(ValueError, match="objectives"):
            parse_objectives(bad)


def test_width_scaled_qformer_init_rescales_only_projection_kernels():
    """model.qformer.init_std=0: every Q-Former projection kernel becomes N(0, 1/fan_in) (query/key/
    value [D, H, K]: fan-in D; out [H, K, D]: H*K; FFN [D, F]: D); embeddings, norms and heads keep
    BERT's N(0, 0.02)."""
    from vlm_jax.tasks.blip2 import rescale_qformer_init
    rng = np.random.default_rng(0)
    n = lambda *shape: jnp.asarray(rng.normal(0, 0.02, size=shape), jnp.float32)  # noqa: E731
    params = {"qformer": {"layers_0": {"attn": {"query": {"kernel": flax.linen.Partitioned(n(300, 3, 10),
                                                                                           ("embed", "heads", "kv"))},
                                                "out": {"kernel": n(3, 10, 300)}},
                                       "mlp": {"wi": {"kernel": n(300, 340), "bias": n(340)}}},
                          "word_embed": {"embedding": n(50, 300)}},
              "itm_head": {"kernel": n(300, 2)}}
    out = rescale_qformer_init(params, 0.0)
    q = out["qformer"]["layers_0"]
    assert isinstance(q["attn"]["query"]["kernel"], flax.linen.Partitioned)     # logical axes kept
    for x, fan_in in ((q["attn"]["query"]["kernel"].value, 300), (q["attn"]["out"]["kernel"], 30),
                      (q["mlp"]["wi"]["kernel"], 300)):
        assert abs(float(jnp.std(x)) * np.sqrt(fan_in) - 1.0) < 0.05, fan_in
    for keep in (out["qformer"]["word_embed"]["embedding"], out["itm_head"]["kernel"], q["mlp"]["wi"]["bias"]):
        assert abs(float(jnp.std(keep)) - 0.02) < 0.003
    assert rescale_qformer_init(params, 0.02) is params


def test_hard_negatives_come_from_other_devices_on_a_sharded_batch():
    """8 devices, 2 rows each: every row's most similar allowed column lives on another device, and a
    peaked softmax draws exactly it, computed on the batch-sharded similarity matrix."""
    assert jax.device_count() == 8
    b = 16
    mesh = sharding.create_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    target = (np.arange(b) + 5) % b                        # row i -> column i+5: two devices away
    sims = np.full((b, b), -10.0, np.float32)
    sims[np.arange(b), target] = 40.0
    ids = np.arange(b)
    row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    s = jax.device_put(sims, row_sharding)
    ex = jax.device_put(np.eye(b, dtype=bool), row_sharding)
    idx, found = jax.jit(contrastive.sample_hard_negatives)(jax.random.key(3), s, ex)
    idx = np.asarray(idx)
    assert np.asarray(found).all()
    np.testing.assert_array_equal(idx, target)
    assert np.all(idx // 2 != ids // 2)                    # each negative came from another device


# ----------------------------------------------------------------------------- the task and the trainer
@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    """A tiny Hugging Face Blip2VisionModel (16 px, patch 4, hidden 20, 2 heads, 2 layers, FFN 28)."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel
    torch.manual_seed(0)
    m = Blip2VisionModel(Blip2VisionConfig(image_size=16, patch_size=4, hidden_size=20, num_attention_heads=2,
                                           num_hidden_layers=2, intermediate_size=28))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("blip2_vision")
    m.save_pretrained(str(d))
    return str(d)


def _one_device_mesh():
    return sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _batch(task, b, seed=0):
    rng = np.random.default_rng(seed)
    it = task.train_iterator()
    batch = next(iter(it))
    reps = -(-b // len(batch["tokens"]))
    out = {k: np.concatenate([v] * reps)[:b] for k, v in batch.items()}
    out["image"] = out["image"] + rng.normal(size=out["image"].shape).astype(np.float32) * 0.1
    return out


def test_stage1_loss_on_8_devices_equals_one_device(data_dir):
    """The same global batch, params and rng: the full objective (with hard negatives drawn from
    the global batch) on data=8 equals one device."""
    config = blip2_config(data_dir, train__batch_size=16)
    task1, _ = train_lib.make_task_and_mesh(config, None)
    batch = _batch(task1, 16)
    params = jax.tree.map(jnp.asarray, flax.linen.unbox(task1.init(jax.random.key(0), batch)["params"]))
    rng = jax.random.key(7)
    results = []
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 8, "fsdp": 1, "tensor": 1}):
        n = shape["data"]
        mesh = sharding.create_mesh(shape, jax.devices()[:n])
        task = type(task1)(config, mesh=mesh)
        b = sharding.put_batch(batch, mesh)
        with sharding.rules_context(mesh):
            loss, (metrics, _) = jax.jit(lambda p, bb, r: task.loss_fn(p, {}, bb, r, train=True))(params, b, rng)
        results.append((float(loss), {k: float(v) for k, v in metrics.items()}))
    (l1, m1), (l8, m8) = results
    assert np.isfinite(l1)
    assert abs(l1 - l8) <= 1e-5, (l1, l8)
    for k in ("loss_itc", "loss_itm", "loss_itg", "itm_acc"):
        assert abs(m1[k] - m8[k]) <= 1e-5, (k, m1[k], m8[k])


def test_frozen_vision_is_bit_identical_and_temperature_stays_clamped(data_dir, vision_dir, tmp_path):
    """Stage 1 with a frozen HF image tower: after training steps the tower equals the HF weights bit
    for bit (and has no optimizer slots) while the Q-Former moved; an exploding learning rate on
    the temperature still leaves it inside [0.001, 0.5]."""
    from vlm_jax.convert import load_hf
    config = blip2_config(data_dir, model__freeze_vision=True, init__vision__source="hf",
                          init__vision__path=vision_dir, train__num_steps=3, train__checkpoint_every=3,
                          optim__grad_clip=0.0)
    with config.unlocked():
        config.optim.groups.temperature = config_lib.ml_collections.ConfigDict(dict(
            pattern="temp", trainable=True, lr_mult=2000.0, weight_decay=False, dtype=""))
    result = train_lib.train(config, str(tmp_path / "run"))
    state = result.state
    hf = load_hf(vision_dir)[1]["params"]
    got = {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
        jax.device_get(state.frozen["vision"]))}
    want = {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(hf)}
    assert got.keys() == want.keys()
    for k in got:
        assert np.array_equal(got[k], want[k]), k
    assert "vision" not in state.params
    import re
    slots = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert slots and not any(re.search(r"(^|/)vision/", s) for s in slots)     # ln_vision, vision_proj do train
    assert any("ln_vision" in s for s in slots)
    temp = float(state.params["temp"])
    lo, hi = blip2.TEMPERATURE_RANGE
    assert lo <= temp <= hi and temp != pytest.approx(0.07, abs=1e-4), temp


@pytest.fixture(scope="module")
def stage1_run(data_dir, tmp_path_factory):
    """configs/blip2.py:tiny trained and evaluated: (workdir, final metrics)."""
    workdir = str(tmp_path_factory.mktemp("blip2_stage1") / "run")
    return workdir, train_lib.train_and_evaluate(blip2_config(data_dir), workdir)


def test_tiny_trains_and_evaluates_retrieval(stage1_run):
    """configs/blip2.py:tiny through train_and_evaluate: every loss term logged, finite, and the
    retrieval evaluator's R@K (with ITM re-ranking) written and ordered."""
    import json
    workdir, metrics = stage1_run
    r = metrics["retrieval"]
    for d in ("i2t", "t2i", "itc_i2t", "itc_t2i"):
        assert 0.0 <= r[f"{d}_r1"] <= r[f"{d}_r5"] <= r[f"{d}_r10"] <= 1.0
    assert r["num_images"] == 16 and r["num_texts"] > 16
    saved = json.load(open(os.path.join(workdir, "eval", "step_4", "retrieval_metrics.json")))
    assert saved["i2t_r1"] == r["i2t_r1"]
    assert os.path.isfile(os.path.join(workdir, "eval", "step_4", "retrieval_examples.png"))
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train_lines = [l for l in lines if l["split"] == "train"]
    assert {"loss_itc", "loss_itm", "loss_itg", "temperature", "itm_acc"} <= set(train_lines[-1])
    assert all(np.isfinite(l["loss"]) for l in train_lines)


# ----------------------------------------------------------------------------- retrieval metric
def test_strict_recall_and_shortlist_rescoring():
    from vlm_jax.evaluation.retrieval import shortlist_scores, strict_recall
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1]])
    truth = np.array([[False, False, True], [True, False, False]])
    r = strict_recall(scores, truth, ks=(1, 2))
    assert r == {1: 0.0, 2: 1.0}                      # row 1 ties a false candidate: not at rank 0
    # re-ranking only touches the shortlist: column 2 of row 0 is lifted by the matcher
    out = shortlist_scores(scores, 2, lambda rows, cols: np.where(cols == 2, 10.0, 0.0))
    assert np.isneginf(out[0, 1]) and out[0, 2] == pytest.approx(10.5) and out[0, 0] == pytest.approx(0.9)
    assert strict_recall(out, truth, ks=(1,))[1] == 0.5


# ----------------------------------------------------------------------------- paper size
def test_paper_qformer_parameter_count():
    """jax.eval_shape of the paper's Q-Former (BERT-base, 32 queries, cross-attention every 2nd
    layer to 1408-wide EVA features, query FFNs, [DEC] in the vocabulary, LM head) with its ITC/ITM
    heads: within 2% of the paper's 188M."""
    model = blip2.Blip2QFormerModel(VisionTransformer(ViTConfig(image_size=28, patch_size=14, hidden_size=1408,
                                                                num_layers=1, num_heads=16, mlp_dim=64)),
                                    blip2.Blip2Config(qformer=blip2.QFormerConfig.paper()))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)),
                                               jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), bool)))
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(shapes["params"]))
    n = sum(int(np.prod(v.shape)) for k, v in flat.items() if k[0] != "vision")
    assert abs(n - 188e6) / 188e6 < 0.02, n


def test_stage2_starts_from_the_stage1_checkpoint(stage1_run, data_dir):
    """Stage 2 with the LM trained too (the synthetic deviation, decoder-only OPT-shaped here) seeded
    from the stage-1 run: the image tower, ln_vision and the Q-Former start equal to stage 1's final
    weights bit for bit; the tower is frozen (no optimizer slots) while the LM, the Q-Former and the
    projection train. (Training from stage 1 is checked in test_t5_stage0_lm_then_frozen_t5_stage2:
    the queries move, the tower stays bit-identical; its evaluators in test_stage0_lm_then_frozen_stage2.)"""
    import re

    from conftest import final_params
    from vlm_jax import init_sources
    stage1_dir, _ = stage1_run
    config = blip2_config(data_dir, f"tiny,stage1={stage1_dir}", model__stage="opt", model__freeze_lm=False,
                          model__lm__width=16, model__lm__num_heads=2, model__lm__mlp_dim=24)
    _, first = final_params(blip2_config(data_dir), stage1_dir)           # stage 1's final weights
    task, mesh = train_lib.make_task_and_mesh(config, None)
    prog = train_lib.build_program(config, task, mesh)
    state = prog.init_state(jax.random.key(0), init_sources.sources_from_config(config))
    s2 = jax.device_get(state.full_params())
    for name in ("vision", "ln_vision", "qformer"):
        for a, b in zip(jax.tree.leaves(first[name]), jax.tree.leaves(s2[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(state.frozen) == {"vision"} and "vision" not in state.params
    assert {"lm", "qformer", "ln_vision", "language_projection"} <= set(state.params)
    slots = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert any(re.search(r"(^|/)lm/", s) for s in slots) and not any(re.search(r"(^|/)vision/", s) for s in slots)


def test_prefix_lm_split_cuts_each_caption_into_an_encoder_prompt_and_a_target(data_dir):
    """objectives.blip2.prefix_lm_split: without an rng the <bos> is the prompt and the rest the
    target; with one, each caption of m words is cut at k in {0, .., m-1} (every k drawn over
    draws), prompt = <bos> w_1..w_k (right padded, masked), target = w_k+1..w_m <eos> left-aligned,
    and prompt + target give back the caption. The split is refused for a decoder-only stage 2."""
    from vlm_jax.objectives.blip2 import prefix_lm_split
    from vlm_jax.tasks import blip2 as blip2_task
    pad = 0
    tokens = np.array([[1, 5, 6, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0], [1, 3, 4, 5, 6, 8, 11, 2]], np.int32)
    p, pm, t, tm = map(np.asarray, prefix_lm_split(jnp.asarray(tokens), pad))
    np.testing.assert_array_equal(p, tokens[:, :1])
    np.testing.assert_array_equal(t, tokens[:, 1:])
    np.testing.assert_array_equal(tm, tokens[:, 1:] != pad)
    split = jax.jit(prefix_lm_split, static_argnums=1)
    seen = [set() for _ in tokens]
    for seed in range(60):
        p, pm, t, tm = map(np.asarray, split(jnp.asarray(tokens), pad, jax.random.key(seed)))
        assert p.shape == t.shape == tokens.shape
        for r, row in enumerate(tokens):
            real = row[row != pad]
            k = int(pm[r].sum()) - 1
            seen[r].add(k)
            assert pm[r, 0] and not pm[r, k + 1:].any() and (p[r, k + 1:] == pad).all()
            np.testing.assert_array_equal(np.concatenate([p[r][pm[r]], t[r][tm[r]]]), real)
            assert tm[r].sum() >= 2 and t[r][tm[r]][-1] == 2 and not tm[r, tm[r].sum():].any()
    assert seen == [set(range(len(r[r != pad]) - 2)) for r in tokens]     # k = 0 .. m-1, each drawn
    with pytest.raises(config_lib.ConfigError, match="prefix_lm_split='random'.*plain LM loss"):
        blip2_task.validate(blip2_config(data_dir, model__stage="opt", model__prefix_lm_split="random"))
    with pytest.raises(config_lib.ConfigError, match="model.prefix_lm_split"):
        blip2_task.validate(blip2_config(data_dir, model__stage="t5", model__prefix_lm_split="half"))


def test_vision_posemb_is_checked_and_follows_the_stage1_run(data_dir, tmp_path):
    """model.vision.posemb: the synthetic variants build their from-scratch ViT with the fixed sincos2d
    code; a wrong name or a width not divisible by 4 is a ConfigError naming the key; stage 2
    (``stage1=<workdir>``) builds the tower and the Q-Former as that run did (its config.json: posemb,
    a run from before the key had the learned table; the Q-Former's shape keys)."""
    from vlm_jax.tasks import blip2 as blip2_task
    assert blip2_config(data_dir).model.vision.posemb == "sincos2d"
    with pytest.raises(config_lib.ConfigError, match="model.vision.posemb"):
        blip2_task.validate(blip2_config(data_dir, model__vision__posemb="rope"))
    with pytest.raises(config_lib.ConfigError, match="divisible by 4.*posemb='learned'"):
        blip2_task.validate(blip2_config(data_dir, model__vision__width=18, model__vision__num_heads=2))
    import json
    for saved, want in (({"patch_size": 4, "posemb": "learned"}, "learned"), ({"patch_size": 4}, "learned"),
                        ({"posemb": "sincos2d"}, "sincos2d")):
        run = tmp_path / want / str(len(saved))
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"model": {"vision": saved, "qformer": {
            "num_layers": 3, "cross_attention_every": 1, "dropout": 0.5}}}))
        c = blip2_config(data_dir, f"tiny,stage1={run}", model__stage="opt")
        assert c.model.vision.posemb == want
        # the Q-Former's shape follows the run, its training settings do not
        assert (c.model.qformer.num_layers, c.model.qformer.cross_attention_every) == (3, 1)
        assert c.model.qformer.dropout == blip2_config(data_dir).model.qformer.dropout
    with pytest.raises(config_lib.ConfigError, match="stage1=.*cannot read model.vision"):
        blip2_config(data_dir, f"tiny,stage1={tmp_path / 'nowhere'}", model__stage="opt")


def test_stage2_refuses_without_a_stage1_run(data_dir):
    with pytest.raises(config_lib.ConfigError, match=r"starts from a stage-1 run.*stage1="):
        train_lib.make_task_and_mesh(blip2_config(data_dir, model__stage="opt", model__freeze_lm=False), None)


# ----------------------------------------------------------------------------- stage 0 (synthetic text LM)
def test_context_text_documents():
    """Each kind of stage-0 document: the context (a caption of the record, or nothing) sits before
    <bos>, the text after it (another caption of the SAME record / its question and answer in the
    VQA prompt / a caption); right padded, <eos> kept when cut, deterministic per index."""
    from vlm_jax.data.context_text import ContextTextSource
    from vlm_jax.data.tokenizer import WordTokenizer
    caps = [["a red circle", "one red circle on gray"], ["two blue squares", "a pair of blue squares"]]
    qs = [[{"question": "what color is the circle?", "answer": "red"}], []]
    template = "Question: {} Short answer: {}"
    tok = WordTokenizer.build([c for cs in caps for c in cs] + [template.format(q["question"], q["answer"])
                                                                  for x in qs for q in x])
    words = lambda ids: " ".join(tok.id_to_word(int(i)) for i in ids)  # noqa: E731
    for kind in ("describe", "qa_context", "caption", "qa"):
        src = ContextTextSource(kind, caps, qs, tokenizer=tok, template=template, max_tokens=24, num_docs=50, seed=3)
        for j in range(20):
            t = src[j]["tokens"]
            np.testing.assert_array_equal(t, src[j]["tokens"])
            n = int((t != tok.pad_id).sum())
            assert t[n - 1] == tok.eos_id and (t[n:] == tok.pad_id).all()
            b = int(np.flatnonzero(t == tok.bos_id)[0])
            context, text = words(t[:b]), words(t[b + 1:n - 1])
            ctx_raw, text_raw = src.text(j)
            assert context == " ".join(tok.id_to_word(i) for i in tok.encode(ctx_raw, add_special_tokens=False))
            if kind in ("caption", "qa"):
                assert b == 0 and ctx_raw == ""
            else:
                rec = [r for r, cs in enumerate(caps) if ctx_raw in cs]
                assert len(rec) == 1
                if kind == "describe":
                    assert text_raw in caps[rec[0]] and text_raw != ctx_raw     # another caption, same image
                else:
                    assert rec == [0] and text_raw == template.format("what color is the circle?", "red")
            assert text == " ".join(tok.id_to_word(i) for i in tok.encode(text_raw, add_special_tokens=False))
    # cut to T: the context gives way first, <bos> text <eos> survive
    short = ContextTextSource("qa_context", caps, qs, tokenizer=tok, template=template, max_tokens=14, num_docs=5,
                              seed=0)[0]["tokens"]
    assert short[-1] == tok.eos_id and tok.bos_id in short and words(short).endswith("short answer red <eos>")
    with pytest.raises(ValueError, match="no record of the split has questions"):
        ContextTextSource("qa", caps, [[], []], tokenizer=tok, template=template, max_tokens=24, num_docs=5, seed=0)


def _location_pairs(caption, forms_seen=None):
    """{(object, place)} of a location caption in any `LOCATION_FORMS` wording (None if a clause is not
    one); the index of each clause's form is added to ``forms_seen``."""
    import re
    obj, loc = r"(an? (?:small |large )?\w+ \w+)", r"((?:at|on|in) the [a-z ]+?)"
    forms = [rf"^{obj} {loc}$", rf"^{loc} there is {obj}$", rf"^{obj} is {loc}$", rf"^{loc} is {obj}$"]
    pairs = set()
    for clause in caption.split(", "):
        for k, f in enumerate(forms):
            m = re.match(f, clause)
            if m:
                pairs.add((m.group(1), m.group(2)) if k in (0, 2) else (m.group(2), m.group(1)))
                if forms_seen is not None:
                    forms_seen.add(k)
                break
        else:
            return None
    return pairs


def test_location_paraphrase_and_restate():
    """`synthetic.paraphrase_location` rewords a location caption (clauses reordered, each in one of
    the four forms) keeping every object-place pair, and refuses other captions; stage-0 documents
    with ``paraphrase=1`` reword location contexts (p=0: the same documents as without it); the
    'restate' kind puts a caption and a rewording of it on both sides of <bos>; bad settings are
    refused."""
    from vlm_jax.data.context_text import ContextTextSource
    from vlm_jax.data.synthetic import LOCATION_FORMS, paraphrase_location
    from vlm_jax.data.tokenizer import WordTokenizer
    loc = "a large red circle at the top left, a small blue square in the center, a green cross on the right"
    want = {("a large red circle", "at the top left"), ("a small blue square", "in the center"),
            ("a green cross", "on the right")}
    assert _location_pairs(loc) == want
    rng = np.random.default_rng(0)
    seen_first, seen_forms = set(), set()
    for _ in range(200):
        out = paraphrase_location(loc, rng)
        assert _location_pairs(out, seen_forms) == want
        first = _location_pairs(out.split(", ")[0])
        seen_first |= {o for o, _ in first}
    assert seen_first == {o for o, _ in want} and seen_forms == set(range(len(LOCATION_FORMS)))
    for other in ("there are two objects: a red circle and a blue square", "a red circle to the left of a cross",
                  "the only shape in the image is a red circle in the top left corner of the image"):
        assert paraphrase_location(other, rng) is None

    caps = [[loc, "there are three objects: a red circle, a blue square and a green cross"],
            ["a small white triangle at the bottom", "an image containing only a small white triangle"]]
    qs = [[{"question": "where is the red circle?", "answer": "top left"}],
          [{"question": "where is the white triangle?", "answer": "bottom"}]]
    template = "Question: {} Short answer: {}"
    tok = WordTokenizer.build([c for cs in caps for c in cs] + [template.format(q["question"], q["answer"])
                                                                  for x in qs for q in x] + ["there is"])
    kw = dict(tokenizer=tok, template=template, max_tokens=64, num_docs=40, seed=1)
    plain = ContextTextSource("qa_context", caps, qs, **kw)
    same = ContextTextSource("qa_context", caps, qs, paraphrase=0.0, rewrite=paraphrase_location, **kw)
    always = ContextTextSource("qa_context", caps, qs, paraphrase=1.0, rewrite=paraphrase_location, **kw)
    reworded = 0
    for j in range(40):
        assert same.text(j) == plain.text(j)
        (c0, t0), (c1, t1) = plain.text(j), always.text(j)
        assert t1 == t0
        if _location_pairs(c0) is None:
            assert c1 == c0
        else:
            assert _location_pairs(c1) == _location_pairs(c0)
            reworded += c1 != c0
    assert reworded >= 10
    restate = ContextTextSource("restate", caps, qs, paraphrase=0.5, rewrite=paraphrase_location, **kw)
    originals = 0
    for j in range(40):
        context, text = restate.text(j)
        pairs = _location_pairs(text)
        assert pairs is not None and _location_pairs(context) == pairs
        assert any(_location_pairs(c) == pairs for cs in caps for c in cs)
        originals += context in (caps[0][0], caps[1][0])
    assert 5 <= originals <= 35                                    # the context itself reworded about half the time
    with pytest.raises(ValueError, match="needs a rewrite function"):
        ContextTextSource("restate", caps, qs, **kw)
    with pytest.raises(ValueError, match=r"paraphrase=1.5 must lie in \[0, 1\]"):
        ContextTextSource("qa", caps, qs, paraphrase=1.5, rewrite=paraphrase_location, **kw)
    with pytest.raises(ValueError, match="needs a rewrite"):
        ContextTextSource("qa", caps, qs, paraphrase=0.5, **kw)
    from vlm_jax.tasks import blip2 as blip2_task
    blip2_task.validate(config_lib.load_config("configs/blip2.py:lm_opt_synthetic", {}))   # restate + paraphrase 0.5
    with pytest.raises(config_lib.ConfigError, match="paraphrase=1.5 is a probability"):
        blip2_task.validate(config_lib.load_config("configs/blip2.py:lm_opt_synthetic", {"data.text.paraphrase": 1.5}))
    with pytest.raises(config_lib.ConfigError, match="has no such grammar"):
        blip2_task.validate(config_lib.load_config("configs/blip2.py:lm_opt_synthetic",
                                                   {"data.name": "karpathy_captions"}))


def test_random_start_positions():
    """data.text.random_offset (OPT stage 0): each right-padded document's real tokens get the
    contiguous positions o..o+n-1 with o uniform over {0..P-n}: never past the table, every start
    drawn; pads stay inside the table."""
    from vlm_jax.tasks.blip2 import random_start_positions
    P, T = 13, 12
    lens = np.array([1, 5, 12])
    mask = np.arange(T)[None] < lens[:, None]
    starts = [set() for _ in lens]
    for s in range(300):
        pos = np.asarray(random_start_positions(jax.random.PRNGKey(s), jnp.asarray(mask), P))
        assert pos.shape == (3, T) and pos.min() >= 0 and pos.max() <= P - 1
        for b, n in enumerate(lens):
            o = pos[b, 0]
            np.testing.assert_array_equal(pos[b, :n], o + np.arange(n))
            starts[b].add(int(o))
    assert [sorted(x) for x in starts] == [list(range(P - n + 1)) for n in lens]


def test_context_text_documents_seq2seq_layout():
    """layout='seq2seq' (the T5 stage 0): the encoder gets context <bos> prompt, the decoder's
    targets the rest + <eos>; the same draws as the decoder layout; cut from the context's start."""
    from vlm_jax.data.context_text import ContextTextSource
    from vlm_jax.data.tokenizer import WordTokenizer
    caps = [["a red circle", "one red circle on gray"], ["two blue squares", "a pair of blue squares"]]
    qs = [[{"question": "what color is the circle?", "answer": "red"}], []]
    template = "Question: {} Short answer: {}"
    tok = WordTokenizer.build([c for cs in caps for c in cs] + [template.format(q["question"], q["answer"])
                                                                  for x in qs for q in x])
    words = lambda ids: " ".join(tok.id_to_word(int(i)) for i in ids if i != tok.pad_id)  # noqa: E731
    norm = lambda text: " ".join(tok.id_to_word(i) for i in tok.encode(text, add_special_tokens=False))  # noqa: E731
    for kind in ("describe", "qa_context", "caption", "qa"):
        kw = dict(tokenizer=tok, template=template, max_tokens=20, num_docs=30, seed=3)
        src = ContextTextSource(kind, caps, qs, layout="seq2seq", max_target_tokens=8, **kw)
        dec = ContextTextSource(kind, caps, qs, **kw)
        for j in range(15):
            ex = src[j]
            assert ex["enc_tokens"].shape == (20,) and ex["tokens"].shape == (8,)
            context, prompt, target = src.parts(j)
            assert (context, ) == (dec.text(j)[0], )                     # the same document as the decoder layout
            enc = [int(t) for t in ex["enc_tokens"] if t != tok.pad_id]
            b = enc.index(tok.bos_id)
            assert words(enc[:b]) == norm(context) and words(enc[b + 1:]) == norm(prompt)
            assert words(ex["tokens"]) == (norm(target) + " <eos>").strip()
            if kind.startswith("qa"):
                assert prompt == "Question: what color is the circle? Short answer:" and target == "red"
                assert dec.text(j)[1] == f"{prompt} {target}"
            else:
                assert prompt == "" and target == dec.text(j)[1]
    cut = ContextTextSource("qa_context", caps, qs, tokenizer=tok, template=template, max_tokens=12, num_docs=5,
                            seed=0, layout="seq2seq", max_target_tokens=2)[0]
    # the context gives way from its start: its last word survives before <bos> and the prompt
    enc = words(cut["enc_tokens"]).split()
    b = enc.index("<bos>")
    assert len(enc) == 12 and b > 0
    assert enc[b + 1:] == [tok.id_to_word(i) for i in tok.encode("Question: what color is the circle? Short answer:",
                                                                 add_special_tokens=False)]
    full = [norm(c).split() for c in caps[0]]           # the context is the END of a caption of record 0
    assert any(len(c) > b and c[-b:] == enc[:b] for c in full)
    assert words(cut["tokens"]) == "red <eos>"
    # a caption target longer than the decoder keeps its first words and <eos>
    desc = ContextTextSource("describe", caps, qs, tokenizer=tok, template=template, max_tokens=12, num_docs=5,
                             seed=0, layout="seq2seq", max_target_tokens=3)
    for j in range(5):
        target = norm(desc.parts(j)[2]).split()
        assert words(desc[j]["tokens"]).split() == target[:2] + ["<eos>"]
    with pytest.raises(ValueError, match="max_target_tokens"):
        ContextTextSource("qa", caps, qs, tokenizer=tok, template=template, max_tokens=12, num_docs=5, seed=0,
                          layout="seq2seq")


def test_answer_evidence_finds_the_captions_that_state_the_answer():
    """`synthetic.answer_evidence` on generated scenes: a position question's captions state that
    object's answer after its phrase; a relation question's either relate the asked pair
    consistently with the answer or locate both objects; the other types (stated by every
    caption) give []; `ContextTextSource(evidence=...)` puts one of those captions in context."""
    import re

    from vlm_jax.data import synthetic
    from vlm_jax.data.context_text import ContextTextSource
    from vlm_jax.data.tokenizer import WordTokenizer
    inverse = {"to the left of": "to the right of", "to the right of": "to the left of",
               "above": "below", "below": "above"}
    rng = np.random.default_rng(0)
    seen = {"position": 0, "relation_stated": 0, "relation_located": 0, "other": 0}
    captions, questions = [], []
    for _ in range(300):
        _, objs, caps, qs = synthetic.sample_scene(32, rng)
        captions.append(caps)
        questions.append(qs)
        for q in qs:
            ev = synthetic.answer_evidence(q, caps)
            assert all(0 <= i < len(caps) for i in ev) and len(set(ev)) == len(ev)
            if q["qtype"] == "position":
                c, s = re.match(r"where is the (\w+) (\w+)\?", q["question"]).groups()
                assert ev, (q, caps)                  # the absolute-position caption always locates every object
                for i in ev:
                    assert re.search(rf"\b{c} {s} (at|on|in) the {q['answer']}\b", caps[i]), (q, caps[i])
                seen["position"] += 1
            elif q["qtype"] == "relation":
                ca, sa, asked, cb, sb = re.match(
                    r"is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?",
                    q["question"]).groups()
                assert ev
                for i in ev:
                    rel = "to the left of|to the right of|above|below"
                    fwd = re.search(rf"\b{ca} {sa} ({rel}) an? (\w+ )?{cb} {sb}\b", caps[i])
                    bwd = re.search(rf"\b{cb} {sb} ({rel}) an? (\w+ )?{ca} {sa}\b", caps[i])
                    if fwd or bwd:
                        stated = fwd.group(1) if fwd else inverse[bwd.group(1)]
                        assert q["answer"] == ("yes" if stated == asked else "no"), (q, caps[i])
                        seen["relation_stated"] += 1
                    else:
                        for col, shp in ((ca, sa), (cb, sb)):
                            assert re.search(rf"\b{col} {shp} (at|on|in) the ", caps[i]), (q, caps[i])
                        seen["relation_located"] += 1
            else:
                assert ev == []
                seen["other"] += 1
    assert min(seen.values()) > 10, seen
    assert synthetic.answer_evidence({"question": "where is the red circle?"}, ["a red circle and a blue cross"]) == []

    template = "Question: {} Short answer: {}"
    tok = WordTokenizer.build([c for cs in captions for c in cs] + [template.format(q["question"], q["answer"])
                                                                      for qs in questions for q in qs])
    src = ContextTextSource("qa_context", captions, questions, tokenizer=tok, template=template, max_tokens=64,
                            num_docs=400, seed=1, evidence=synthetic.answer_evidence)
    plain = ContextTextSource("qa_context", captions, questions, tokenizer=tok, template=template, max_tokens=64,
                              num_docs=400, seed=1)
    moved = 0
    for j in range(400):
        context, text = src.text(j)
        qtext = text.split(" Short answer: ")[0][len("Question: "):]
        rec = [r for r, caps in enumerate(captions) if context in caps]
        stating = {c for r in rec for q in questions[r] if q["question"] == qtext
                   for c in (captions[r][i] for i in synthetic.answer_evidence(q, captions[r]))}
        if stating:
            assert context in stating
        moved += context != plain.text(j)[0]
    assert moved > 20                                 # the rule changes the context of position/relation docs


def test_stage0_lm_then_frozen_stage2(stage1_run, data_dir, tmp_path):
    """Stage 0 (model.stage='opt_text') trains the OPT-shaped LM alone on context documents and
    saves its vocabulary (captions + questions + answers + the VQA prompt); stage 2 with
    ``lm=<stage-0 workdir>`` reads that LM's shape (odd: 18 wide, 3 heads, 3 layers) and
    vocabulary, starts the LM at stage 0's final weights and keeps it frozen: bit-identical after
    training steps, while the projection moves; the captioner and zero-shot VQA evaluate."""
    import json

    from conftest import final_params
    from vlm_jax.data.tokenizer import WordTokenizer
    stage1_dir, _ = stage1_run
    w0 = str(tmp_path / "stage0")
    c0 = blip2_config(data_dir, "tiny", model__stage="opt_text", model__lm__width=18, model__lm__num_heads=3,
                      model__lm__num_layers=3, model__lm__mlp_dim=26, model__lm__max_positions=40, train__num_steps=2,
                      data__text__random_offset=True)      # documents at random starts in the position table
    train_lib.train(c0, w0)
    lines = [json.loads(x) for x in open(os.path.join(w0, "metrics.jsonl"))]
    assert {"describe/loss", "qa_context/accuracy", "caption/loss", "qa/loss"} <= set(lines[-1])
    vocab = WordTokenizer.load(os.path.join(w0, "vocab.json"))
    assert {"question", "short", "answer", "yes", "no"} <= set(vocab.words)

    _, p0 = final_params(c0, w0)
    c2 = blip2_config(data_dir, f"tiny,stage1={stage1_dir},lm={w0}", model__stage="opt", train__num_steps=2,
                      evals__caption__batch_size=8, evals__caption__max_len=6, evals__caption__beam_size=2)
    assert c2.model.freeze_lm and c2.model.lm.width == 18 and c2.model.lm.num_layers == 3
    w2 = str(tmp_path / "stage2")
    metrics = train_lib.train_and_evaluate(c2, w2)
    assert {"CIDEr", "Bleu_4", "grounded_object_recall"} <= set(metrics["caption"])
    # zero-shot VQA and the question-only baseline (same LM, no image prefix), per question type
    for name in ("vqa", "vqa_blind"):
        m = metrics[name]
        assert m["num_questions"] == 8 and 0.0 <= m["accuracy"] <= 1.0 and m["num_missing"] == 0
        assert any(k.startswith("accuracy/") for k in m)
        assert os.path.isfile(os.path.join(w2, "eval", "step_2", name, "results.json"))
    task2, p2 = final_params(c2, w2)
    enc = task2.encode_question("what color is the circle?")     # decoder-only: left padded
    assert enc["prompt_mask"][-1] and not enc["prompt_mask"][0] and enc["prompt"].shape == (12,)
    assert task2.tokenizer == vocab
    for a, b in zip(jax.tree.leaves(p0["lm"]), jax.tree.leaves(p2["lm"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert p2["language_projection"]["kernel"].std() > 0
    with pytest.raises(config_lib.ConfigError, match="cannot read model.lm"):
        blip2_config(data_dir, f"tiny,stage1={stage1_dir},lm={tmp_path / 'nowhere'}", model__stage="opt")


def test_t5_stage0_lm_then_frozen_t5_stage2(stage1_run, data_dir, tmp_path):
    """Stage 0 for the T5 path (model.stage='t5_text', odd sizes: 22 wide, 2 heads of 11, 3 + 3
    layers): the encoder reads context <bos> prompt, the decoder learns the rest (per-kind
    metrics); stage 2 with ``lm=<that workdir>`` (model.stage='t5', prefix-LM split) reads the shape and vocabulary,
    keeps the LM bit-identical while the Q-Former and projection train, and answers zero-shot
    through the shared seq2seq decoding. An OPT stage 2 over a T5 stage 0 is refused."""
    import json

    from conftest import final_params
    from vlm_jax.data.tokenizer import WordTokenizer
    stage1_dir, _ = stage1_run
    w0 = str(tmp_path / "stage0_t5")
    c0 = blip2_config(data_dir, "tiny", model__stage="t5_text", model__lm__width=22, model__lm__num_heads=2,
                      model__lm__num_layers=3, model__lm__mlp_dim=30, model__lm__max_positions=36, train__num_steps=2)
    train_lib.train(c0, w0)
    lines = [json.loads(x) for x in open(os.path.join(w0, "metrics.jsonl"))]
    assert {"describe/loss", "qa_context/accuracy", "caption/loss", "qa/loss"} <= set(lines[-1])
    assert np.isfinite(lines[-1]["loss"])
    vocab = WordTokenizer.load(os.path.join(w0, "vocab.json"))

    _, p0 = final_params(c0, w0)
    c2 = blip2_config(data_dir, f"tiny,stage1={stage1_dir},lm={w0}", model__stage="t5", train__num_steps=2,
                      model__prefix_lm_split="random")      # the paper's prefix-LM split of the captions
    assert c2.model.freeze_lm and c2.model.lm.width == 22 and c2.model.lm.num_layers == 3
    w2 = str(tmp_path / "stage2_t5")
    train_lib.train(c2, w2)
    task2, p2 = final_params(c2, w2)
    assert task2.tokenizer == vocab and task2.model.config.seq2seq
    # stage 2 started from stage 1's Q-Former and ViT: the queries moved, the ViT is bit-identical
    _, p1 = final_params(blip2_config(data_dir), stage1_dir)
    assert not np.array_equal(np.asarray(p1["qformer"]["query_tokens"]), np.asarray(p2["qformer"]["query_tokens"]))
    for a, b in zip(jax.tree.leaves(p1["vision"]), jax.tree.leaves(p2["vision"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(p0["lm"]), jax.tree.leaves(p2["lm"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = task2.encode_question("what color is the circle?")
    batch = {"image": np.zeros((2, c2.data.image_size, c2.data.image_size, 3), np.float32),
             "prompt": np.stack([q["prompt"]] * 2), "prompt_mask": np.stack([q["prompt_mask"]] * 2)}
    answer = jax.jit(lambda p, b: task2.answer(p, {}, b, beam_size=2, max_len=3, length_penalty=0.0))
    out = answer(p2, batch)                  # jitted, as the VQA evaluator runs it (one program, not op by op)
    assert out["tokens"].shape == (2, 3)
    from vlm_jax.tasks import blip2 as blip2_task
    with pytest.raises(config_lib.ConfigError, match="random_offset=True places the OPT stage 0"):
        blip2_task.validate(blip2_config(data_dir, "tiny", model__stage="t5_text", data__text__random_offset=True))
    opt_over_t5 = blip2_config(data_dir, f"tiny,stage1={stage1_dir},lm={w0}", model__stage="opt")
    with pytest.raises(config_lib.ConfigError, match="lm_t5_synthetic -> stage2_t5_synthetic"):
        blip2_task.validate(opt_over_t5)
