"""Few-shot classification by class log-likelihood (vlm_jax/evaluation/fewshot.py) and the
decode-aware ``<image>`` count of `Flamingo` (vlm_jax/models/flamingo.py), on a tiny random
Flamingo (ViT 12 wide, resampler 24, LM 36 wide with 3 heads, GATED XATTN-DENSE every 2 layers,
gates nonzero so the images matter) and a WordTokenizer over a few nonce words:

  - KV-cache decoding through `vlm_jax.generate` with no ``text_time``: the cache's media counter
    gives the logits of the full forward (left-padded row included, a marker inside the decoded
    tokens too); an explicit ``text_time`` still wins;
  - `score_classes_cached` == `score_classes_full` (C = 3 candidates of 1-3 tokens, ragged prefixes,
    k-shot and 0-shot prompts, a batch that does not divide the episodes);
  - RICES: nearest by cosine (not dot product), most similar last; random: distinct, seeded;
    balanced (N-way K-shot): every class once at k = C, as even as the support allows, shuffled;
  - prompt layout: k-shot markers/images in order; 0-shot = 2 text-only demos + the query image;
  - `accuracy_from_scores` on a hand matrix;
  - the evaluator end to end (2 shot settings x 2 trials x 3 selections): metrics (the share of
    queries whose class a demonstration shows, and the accuracy on those), JSON, PNG,
    and the clear error for more shots than support images.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params  # noqa: E402

from vlm_jax import generate
from vlm_jax.data.interleaved import ClassificationEpisode
from vlm_jax.data.tokenizer import WordTokenizer
from vlm_jax.evaluation import fewshot
from vlm_jax.layers.decoder_lm import DecoderLMConfig
from vlm_jax.layers.vit import ViTConfig
from vlm_jax.models import flamingo

WORDS = ["this", "is", "a", "dax", "wug", "fep", "zib", "kog", "blue", "lem", "mup", "red"]
TOK = WordTokenizer(WORDS)
V = TOK.vocab_size
IMG, EOC, PAD = V, V + 1, TOK.pad_id
SIDE = 8
CFG = flamingo.FlamingoConfig(
    vision=ViTConfig(image_size=SIDE, patch_size=4, hidden_size=12, num_layers=1, num_heads=3, mlp_dim=20),
    resampler=flamingo.PerceiverResamplerConfig(width=24, depth=1, num_heads=3, head_dim=8, num_latents=2,
                                                mlp_dim=32, activation="gelu"),
    lm=DecoderLMConfig(vocab_size=V, width=36, num_layers=2, num_heads=3, mlp_dim=52, max_positions=64),
    xattn=flamingo.GatedXAttnConfig(num_heads=3, head_dim=6, mlp_dim=40, activation="gelu"),
    xattn_every=2)
CLASSES = ("dax", "wug fep", "zib kog lem")          # 1, 2 and 3 tokens


def _random_params(abstract, seed):
    return random_params(abstract, seed, random_gates=True)


@pytest.fixture(scope="module")
def setup():
    model = flamingo.Flamingo(CFG)
    tokens = jnp.zeros((1, 6), jnp.int32)
    images = jnp.zeros((1, 1, SIDE, SIDE, 3))
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens, images)["params"]
    return dict(model=model, params=_random_params(abstract, seed=1))


def _episodes(seed, num, *, support=6, names=CLASSES, every_class=False):
    """Random images; class names permuted per episode (so candidates differ in length and order);
    ``every_class``: support labels 0..C-1 repeated (shuffled), so every class has support items."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        perm = tuple(names[i] for i in rng.permutation(len(names)))
        labels = (rng.permutation(np.arange(support) % len(names)) if every_class
                  else rng.integers(0, len(names), size=support))
        out.append(ClassificationEpisode(
            support_images=rng.normal(size=(support, SIDE, SIDE, 3)).astype(np.float32),
            support_labels=labels.astype(np.int32),
            query_image=rng.normal(size=(SIDE, SIDE, 3)).astype(np.float32),
            label=int(rng.integers(len(names))), class_names=perm))
    return out


# --------------------------------------------------------------------- task 1: media count
@pytest.mark.parametrize("media", ["every_call", "cached_kv"])
def test_decode_counts_media_in_the_cache(setup, media):
    """Prefill a prompt with 2 images (row 1 left padded), then step token by token with no
    text_time (a 3rd <image> among the decoded tokens): every step's logits equal the full
    forward's; the counter reads 2 after the prefill, 3 at the end. ``cached_kv``: the latents
    go to the prefill only (``prefill_inputs``) and the gated blocks read the media keys/values
    back from their cache: the same logits, with the key/value projections gone from the step."""
    model, params = setup["model"], setup["params"]
    w = {x: TOK.word_to_id(x) for x in WORDS}
    seq0 = [1, IMG, w["this"], w["is"], EOC, IMG, w["a"], w["dax"], w["wug"], EOC, IMG, w["zib"], w["kog"]]
    seq1 = [PAD, PAD, 1, IMG, w["red"], EOC, IMG, w["blue"], w["lem"], EOC, IMG, w["mup"], w["fep"]]
    tokens = jnp.asarray([seq0, seq1], jnp.int32)
    mask = tokens != PAD
    t0 = 9                                              # the prompt: 2 images; the rest is decoded
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, SIDE, SIDE, 3)), jnp.float32)
    mv = jnp.ones((2, 3), bool)
    full = np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens, images, attention_mask=mask).logits)(params))
    latents = jax.jit(lambda p, im: model.apply({"params": p}, im, method="encode_images"))(params, images)
    inputs = (lambda lat: dict(row_inputs={"latents": lat, "media_valid": mv})) if media == "every_call" else \
        (lambda lat: dict(row_inputs={"media_valid": mv}, prefill_inputs={"latents": lat}))
    prefill = jax.jit(lambda p, prompt, pm, lat: generate.prefill_decoder_lm(
        model, p, prompt, prompt_mask=pm, max_new_tokens=tokens.shape[1] - t0 + 1, **inputs(lat)))
    first, state = prefill(params, tokens[:, :t0], mask[:, :t0], latents)
    np.testing.assert_array_equal(np.asarray(state["cache"]["media_count"]["count"]), [2, 2])
    assert ("latents" in state["row_inputs"]) == (media == "every_call")
    step = jax.jit(generate.decoder_lm_step_fn(model, params))
    # the step's matmuls: the cached path skips the gated block's key and value projections
    n_dots = lambda st: str(jax.make_jaxpr(generate.decoder_lm_step_fn(model, params))(  # noqa: E731
        first, st, 0)).count("dot_general[")                # nested jaxprs included in the printout
    dots = n_dots(state)
    if media == "cached_kv":
        row_state = dict(state, row_inputs={"latents": latents, "media_valid": mv})
        dots_row = n_dots(row_state)
        assert dots_row - dots == 2, (dots_row, dots)       # one gated block (xattn_every=2, 2 layers): K and V
    feed = jnp.concatenate([first[:, None], tokens[:, t0:]], axis=1)
    got = []
    for i in range(feed.shape[1] - 1):
        logits, state, _ = step(feed[:, i], state, jnp.int32(i))
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)                         # logits after tokens t0-1 .. T-2
    np.testing.assert_allclose(got, full[:, t0 - 1:-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state["cache"]["media_count"]["count"]), [3, 3])
    # an explicit text_time wins: 0 = no image for the new token -> other logits
    @jax.jit
    def last_step(p, st, text_time):
        slot = generate._cache_index(st["cache"])
        kv = st["key_valid"] | (jnp.arange(st["key_valid"].shape[1])[None] == slot[:, None])
        out, _ = model.apply({"params": p, "cache": st["cache"]}, feed[:, -1:], latents=latents, media_valid=mv,
                             text_time=text_time, position_ids=st["position"][:, None], key_valid=kv, decode=True,
                             mutable=["cache"])
        return out.logits
    auto, explicit = last_step(params, state, None), last_step(params, state, jnp.zeros((2, 1), jnp.int32))
    np.testing.assert_allclose(auto, last_step(params, state, jnp.full((2, 1), 3, jnp.int32)), rtol=1e-6)
    assert np.abs(np.asarray(explicit) - np.asarray(auto)).max() > 1e-4


# ------------------------------------------------------------------ multi-image dialogue
def _cross_keys(cache):
    """{path: cached_cross_key [B, M*R, H, K]} of every gated block."""
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(cache)
            if "cached_cross_key" in jax.tree_util.keystr(p)}


def test_dialogue_turns_equal_the_whole_conversation_from_scratch(setup):
    """Three turns (an image in each of the first two, text only in the third; rows padded
    differently) through one `Dialogue` session: after every turn the next-token logits equal a
    full forward of the whole conversation so far (turns and the replies written back), and each
    greedy reply equals `generate` from scratch on that conversation with all its images. Each
    image is encoded and projected once: the call that adds image 2 gets only its latents, image
    1's cached keys stay bit-identical, and image 2's equal the keys a fresh cache projects."""
    from vlm_jax.tasks.flamingo import Dialogue
    model, params = setup["model"], setup["params"]
    w = {x: TOK.word_to_id(x) for x in WORDS}
    rng = np.random.default_rng(7)
    images = rng.normal(size=(2, 2, SIDE, SIDE, 3)).astype(np.float32)        # [B, 2 images, S, S, 3]
    turns = [  # (row 0, row 1) real tokens; padded on the left to one width
        ([1, IMG, w["this"], w["is"]], [1, IMG, w["red"]]),
        ([IMG, w["a"], w["dax"]], [w["blue"], IMG, w["lem"], w["mup"], w["fep"]]),
        ([w["zib"], w["kog"]], [w["wug"]]),
    ]
    d = Dialogue(model, params, batch_size=2, max_len=48, max_images=2, image_id=IMG, eoc_id=EOC, pad_id=PAD)
    history = [[], []]
    keys_after = []
    step = jax.jit(generate.decoder_lm_step_fn(model, params))

    @jax.jit
    def from_scratch(p, full, seen):     # -> the last token's logits, the greedy continuation
        ref = model.apply({"params": p}, full, seen, attention_mask=full != PAD).logits[:, -1]
        latents = model.apply({"params": p}, seen, method="encode_images")
        want = generate.generate(model, p, full, prompt_mask=full != PAD, max_new_tokens=3, eos_id=EOC, pad_id=PAD,
                                 prefill_inputs={"latents": latents},
                                 row_inputs={"media_valid": jnp.ones(latents.shape[:2], bool)}).tokens[:, 0]
        return ref, want

    for n, (r0, r1) in enumerate(turns):
        width = max(len(r0), len(r1))
        toks = np.array([[PAD] * (width - len(r)) + r for r in (r0, r1)], np.int32)
        new_images = images[:, n:n + 1] if n < 2 else None
        d.add(toks, new_images, mask=toks != PAD)
        history = [h + list(r) for h, r in zip(history, (r0, r1))]
        keys_after.append(_cross_keys(d.session["cache"]))
        # the conversation so far from scratch: left padded, every image so far
        full_w = max(map(len, history))
        full = jnp.asarray([[PAD] * (full_w - len(h)) + h for h in history], jnp.int32)
        seen = jnp.asarray(images[:, :min(n + 1, 2)])
        ref, want = from_scratch(params, full, seen)
        state = {k: d.session[k] for k in ("cache", "key_valid", "position", "row_inputs")}
        got = step(d.session["pending"], state, 0)[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5, err_msg=f"turn {n}")
        reply = d.reply(max_new_tokens=3)
        np.testing.assert_array_equal(reply, np.asarray(want), err_msg=f"turn {n}")
        for b in range(2):                 # the reply through its eos joins the conversation
            r = list(reply[b])
            history[b] += r[:r.index(EOC) + 1] if EOC in r else r
    r = CFG.resampler.num_latents
    k1, k2 = keys_after[0], keys_after[1]
    fresh = _cross_keys(generate.init_cache(model, params, jnp.zeros((2, 8), jnp.int32),
                                            latents=model.apply({"params": params}, jnp.asarray(images),
                                                                method="encode_images"),
                                            media_valid=jnp.ones((2, 2), bool)))
    assert k1.keys() == k2.keys() == fresh.keys() and k1
    for path in k1:
        np.testing.assert_array_equal(k2[path][:, :r], k1[path][:, :r])          # image 1: written once
        np.testing.assert_allclose(k2[path][:, r:], fresh[path][:, r:], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(keys_after[2][path], k2[path])              # text-only turn: untouched
    with pytest.raises(ValueError, match="exceed max_images=2"):
        d.add(np.array([[IMG], [IMG]], np.int32), images[:, :1])
    with pytest.raises(ValueError, match="markers"):
        d.add(np.array([[w["a"]], [w["a"]]], np.int32), images[:, :1])
    # a second conversation of the same model and shapes compiles nothing (module-level jits, model static)
    from vlm_jax.tasks import flamingo as task_fl
    jits = (task_fl._dialogue_start, task_fl._dialogue_encode, task_fl._dialogue_extend, task_fl._dialogue_respond)
    before = [f._cache_size() for f in jits]
    d2 = Dialogue(model, params, batch_size=2, max_len=48, max_images=2, image_id=IMG, eoc_id=EOC, pad_id=PAD)
    r0, r1 = turns[0]
    toks = np.array([[PAD] * (len(r0) - len(r)) + r for r in (r0, r1)], np.int32)
    d2.add(toks, images[:, :1], mask=toks != PAD)
    d2.reply(max_new_tokens=3)
    assert [f._cache_size() for f in jits] == before


# -------------------------------------------------------------------------- scoring
def test_cached_scores_equal_full_scores(setup):
    model, params = setup["model"], setup["params"]
    episodes = _episodes(5, 5, names=("dax", "wug fep", "zib kog lem"))
    rng = np.random.default_rng(0)
    # ragged prefixes: class names of 1-3 tokens in the demonstrations
    prompts = [fewshot.episode_prompt(ep, 2, TOK, image_id=IMG, eoc_id=EOC, method="random", rng=rng)
               for ep in episodes]
    prompts += [fewshot.episode_prompt(ep, 0, TOK, image_id=IMG, eoc_id=EOC, method="random", rng=rng)
                for ep in episodes[:2]]
    assert len({len(p.tokens) for p in prompts}) > 1
    assert {len(c) for c in prompts[0].candidates} == {1, 2, 3}
    full = fewshot.score_classes_full(model, params, prompts, batch_size=3, pad_id=PAD)
    cached = fewshot.score_classes_cached(model, params, prompts, batch_size=3, pad_id=PAD)
    assert full.shape == (7, 3) and np.all(np.isfinite(full)) and np.all(full < 0)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
    longest = max(len(p.tokens) for p in prompts)
    padded = fewshot.score_classes_full(model, params, prompts, batch_size=4, pad_id=PAD, prefix_len=longest + 9,
                                        cand_len=5)                # more padding, another batch: the same scores
    np.testing.assert_allclose(padded, full, rtol=1e-5, atol=1e-5)
    normed = fewshot.score_classes_cached(model, params, prompts, batch_size=3, length_normalize=True, pad_id=PAD)
    lengths = np.asarray([[len(c) for c in p.candidates] for p in prompts])
    np.testing.assert_allclose(normed, cached / lengths, rtol=1e-5)
    # the images matter: other images change the scores (the same shapes: no recompilation)
    other = [fewshot.FewShotPrompt(p.tokens, -p.images[::-1], p.candidates, p.label) for p in prompts]
    moved = np.abs(fewshot.score_classes_cached(model, params, other, batch_size=3, pad_id=PAD) - cached)
    assert moved.min(axis=1).max() > 1e-4 and moved.max() > 1e-3


def test_rices_nearest_by_cosine_most_similar_last():
    q = np.array([1.0, 0.0, 0.0])
    support = np.array([[0.0, 1.0, 0.0],       # cos 0
                        [0.9, 0.1, 0.0],       # cos 0.994  (most similar)
                        [50.0, 40.0, 0.0],     # cos 0.781, but the largest dot product
                        [0.7, 0.3, 0.1],       # cos 0.913
                        [-1.0, 0.0, 0.0]])     # cos -1
    got = fewshot.select_demonstrations(support, q, 3, method="rices")
    np.testing.assert_array_equal(got, [2, 3, 1])
    assert got.dtype == np.int32
    assert fewshot.select_demonstrations(support, q, 0, method="rices").shape == (0,)
    r = fewshot.select_demonstrations(support, q, 4, method="random", rng=np.random.default_rng(7))
    assert len(set(r.tolist())) == 4 and r.min() >= 0 and r.max() < 5
    np.testing.assert_array_equal(r, fewshot.select_demonstrations(support, q, 4, method="random",
                                                                   rng=np.random.default_rng(7)))
    with pytest.raises(ValueError, match="k=6"):
        fewshot.select_demonstrations(support, q, 6, method="rices")


def test_balanced_selection_is_n_way_k_shot():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])   # class 2 has one item
    feats = np.zeros((10, 1))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        got = fewshot.select_demonstrations(feats, None, 4, method="balanced", rng=rng, support_labels=labels)
        assert got.dtype == np.int32 and len(set(got.tolist())) == 4
        assert sorted(labels[got].tolist()) == [0, 1, 2, 3]          # k = C: every class once
        six = fewshot.select_demonstrations(feats, None, 6, method="balanced", rng=np.random.default_rng(seed),
                                            support_labels=labels)
        counts = np.bincount(labels[six], minlength=4)
        # 6 over 4 classes: 1 or 2 each, never 2 of class 2 (it has one item), never a repeat
        assert counts.sum() == 6 and counts.min() == 1 and counts.max() == 2 and counts[2] == 1
        assert len(set(six.tolist())) == 6
        two = fewshot.select_demonstrations(feats, None, 2, method="balanced", rng=np.random.default_rng(seed),
                                            support_labels=labels)
        assert len(set(labels[two].tolist())) == 2                   # k < C: k distinct classes
    # class 2 exhausted, the rest filled round-robin: 9 of 10 -> only one item left out
    nine = fewshot.select_demonstrations(feats, None, 9, method="balanced", rng=np.random.default_rng(0),
                                         support_labels=labels)
    assert len(set(nine.tolist())) == 9
    # random order, not grouped by class: some seed puts a class other than the first drawn first
    firsts = {int(labels[fewshot.select_demonstrations(feats, None, 4, method="balanced",
                                                       rng=np.random.default_rng(s), support_labels=labels)[0]])
              for s in range(20)}
    assert len(firsts) > 1
    np.testing.assert_array_equal(
        fewshot.select_demonstrations(feats, None, 4, method="balanced", rng=np.random.default_rng(3),
                                      support_labels=labels),
        fewshot.select_demonstrations(feats, None, 4, method="balanced", rng=np.random.default_rng(3),
                                      support_labels=labels))
    with pytest.raises(ValueError, match="support_labels"):
        fewshot.select_demonstrations(feats, None, 4, method="balanced", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="3 support labels for 10"):
        fewshot.select_demonstrations(feats, None, 4, method="balanced", rng=np.random.default_rng(0),
                                      support_labels=labels[:3])


def test_prompt_layout_k_shot_and_zero_shot():
    ep = _episodes(2, 1)[0]
    w = TOK.word_to_id
    p = fewshot.build_prompt(ep, [4, 1], TOK, image_id=IMG, eoc_id=EOC)
    names = [ep.class_names[ep.support_labels[i]] for i in (4, 1)]
    want = [1]
    for n in names:
        want += [IMG, w("this"), w("is"), w("a")] + [w(x) for x in n.split()] + [EOC]
    want += [IMG, w("this"), w("is"), w("a")]
    assert list(p.tokens) == want
    np.testing.assert_array_equal(p.images, np.stack([ep.support_images[4], ep.support_images[1], ep.query_image]))
    assert p.candidates == tuple(tuple(w(x) for x in n.split()) for n in ep.class_names) and p.label == ep.label
    assert p.demo_labels == (int(ep.support_labels[4]), int(ep.support_labels[1]))

    z = fewshot.episode_prompt(ep, 0, TOK, image_id=IMG, eoc_id=EOC, method="rices", rng=np.random.default_rng(1))
    toks = list(z.tokens)
    assert toks.count(IMG) == 1 and toks.count(EOC) == 2
    assert toks[-4:] == [IMG, w("this"), w("is"), w("a")]          # the query keeps its image
    assert toks[1:4] == [w("this"), w("is"), w("a")]               # demos: text only
    np.testing.assert_array_equal(z.images, ep.query_image[None])
    assert z.demo_labels == ()                                     # text-only demos show no labelled image


def test_accuracy_from_scores_by_hand():
    scores = np.array([[-1.0, -2.0, -3.0],
                       [-5.0, -0.5, -4.0],
                       [-2.0, -2.0, -9.0],      # tie: the first wins
                       [-3.0, -1.0, -0.1]])
    assert fewshot.accuracy_from_scores(scores, [0, 1, 1, 0]) == 0.5
    assert fewshot.accuracy_from_scores(scores, [0, 1, 0, 2]) == 1.0


# -------------------------------------------------------------------------- evaluator
def test_evaluator_end_to_end(setup, tmp_path):
    model, params = setup["model"], setup["params"]
    calls = []

    def make_episodes(seed, num):
        calls.append((seed, num))
        return _episodes(100 + seed, num, names=("dax", "wug", "zib kog"), every_class=True)

    ev = fewshot.FewShotClassificationEvaluator(
        name="nonce", every=0, model=model, tokenizer=TOK, image_id=IMG, eoc_id=EOC, make_episodes=make_episodes,
        shots=(0, 3), trials=2, selection=("random", "rices", "balanced"), num_episodes=3, batch_size=2)
    metrics = ev.run(params, {}, step=7, workdir=str(tmp_path), final=True)
    assert calls == [(0, 3), (1, 3)]                     # one set of episodes per trial, shared
    assert metrics["chance"] == pytest.approx(1 / 3)
    for sel in ("random", "rices", "balanced"):
        for k in (0, 3):
            key = f"{sel}/shots_{k}"
            assert 0.0 <= metrics[f"{key}/accuracy_mean"] <= 1.0
            assert 0.0 <= metrics[f"{key}/accuracy_std"] <= 0.5
            assert metrics[f"{key}/examples_per_s"] > 0
        # 0 shots shows no labelled image: nothing to copy, no conditional accuracy
        assert metrics[f"{sel}/shots_0/label_in_demos"] == 0.0
        assert f"{sel}/shots_0/accuracy_given_label_in_demos" not in metrics
    # 3-way 3-shot balanced: every query's class is shown, so the conditional accuracy is the accuracy
    assert metrics["balanced/shots_3/label_in_demos"] == 1.0
    assert metrics["balanced/shots_3/accuracy_given_label_in_demos"] == pytest.approx(
        metrics["balanced/shots_3/accuracy_mean"])
    # 0 shots does not depend on the selection method
    assert metrics["random/shots_0/accuracy_mean"] == metrics["rices/shots_0/accuracy_mean"] == \
        metrics["balanced/shots_0/accuracy_mean"]
    out = tmp_path / "eval" / "step_7" / "nonce"
    data = json.loads((out / "fewshot_metrics.json").read_text())
    per_trial = data["results"]["rices"]["3"]["accuracy"]
    assert len(per_trial) == 2 and all(min(abs(a - v) for v in (0, 1 / 3, 2 / 3, 1)) < 1e-9 for a in per_trial)
    assert data["results"]["rices"]["3"]["accuracy_mean"] == pytest.approx(np.mean(per_trial))
    # label_in_demos is a share of the 2 x 3 queries; None where nothing was shown
    for sel in ("random", "rices"):
        cov = data["results"][sel]["3"]["label_in_demos"]
        assert cov in {i / 6 for i in range(7)}
        assert data["results"][sel]["0"]["accuracy_given_label_in_demos"] is None
    png = out / "shot_curve.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    too_many = fewshot.FewShotClassificationEvaluator(
        name="nonce_big", every=0, model=model, tokenizer=TOK, image_id=IMG, eoc_id=EOC,
        make_episodes=make_episodes, shots=(0, 8), trials=1, num_episodes=1)
    with pytest.raises(ValueError, match=r"nonce_big: 8 shots .* only 6 support"):
        too_many.run(params, {}, step=0, workdir=str(tmp_path), final=True)
    assert not os.path.exists(tmp_path / "eval" / "step_0" / "nonce_big")


# ------------------------------------------------------------ open-ended few-shot generation
from vlm_jax.evaluation import fewshot_generation as fg  # noqa: E402


class _Split:
    """The part of `EvalSplit` the generation evaluator reads: 5 random images, 2 captions and 2
    questions each (one answer)."""

    def __init__(self, seed, name="synthetic", split="test", n=5):
        rng = np.random.default_rng(seed)
        self.name, self.split = name, split
        self.image_ids = np.arange(100 * seed, 100 * seed + n, dtype=np.int64)
        self._img = {int(i): rng.normal(size=(SIDE, SIDE, 3)).astype(np.float32) for i in self.image_ids}
        colors = ("red", "blue")
        self.references = {int(i): [f"a {colors[k % 2]} dax", "this is a wug"] for k, i in enumerate(self.image_ids)}
        self.objects = {int(i): [] for i in self.image_ids}
        self.questions = {int(i): [dict(question="is this a dax", answer="red" if k % 2 else "blue", qtype="color"),
                                   dict(question="is this a wug", answer="dax", qtype="shape")]
                          for k, i in enumerate(self.image_ids)}

    def question_table(self):
        return {int(i) * 1000 + k: dict(image_id=int(i), question=q["question"], answers=[q["answer"]],
                                        question_type=q["qtype"], answer_type="")
                for i in self.image_ids for k, q in enumerate(self.questions[int(i)])}

    def preprocess_image(self, image_id):
        return self._img[int(image_id)]


def test_generation_prompt_layout_caption_vqa_and_zero_shot():
    tok = WordTokenizer(["output", "question", "short", "answer", "what", "color", "red", "blue", "a", "circle"])
    v = tok.vocab_size
    img, eoc, w = v, v + 1, tok.word_to_id
    demo = fg.GenerationItem(1, 1, "", "a red circle")
    query = fg.GenerationItem(2, 2, "", "")
    ids = fg.generation_prompt("caption", fg.CAPTION_TEMPLATE, [demo], query, tok, image_id=img, eoc_id=eoc)
    assert ids == [tok.bos_id, img, w("output"), w("a"), w("red"), w("circle"), eoc, img, w("output")]
    qd = fg.GenerationItem(10, 1, "what color", "red")
    qq = fg.GenerationItem(11, 2, "what color", "")
    ids = fg.generation_prompt("vqa", fg.VQA_TEMPLATE, [qd, qd], qq, tok, image_id=img, eoc_id=eoc,
                               text_only_demos=True)
    chunk = [w("question"), w("what"), w("color"), w("short"), w("answer")]
    assert ids == [tok.bos_id] + (chunk + [w("red"), eoc]) * 2 + [img] + chunk   # 0-shot: demos without images
    with pytest.raises(ValueError, match="two"):
        fg.generation_prompt("vqa", "Question:{}", [qd], qq, tok, image_id=img, eoc_id=eoc)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(setup):
    """Prompts of different lengths (and media counts padded with empty slots) generated in one
    left-padded batch, the last batch filled by repeating a row, give each prompt's own answer."""
    model, params = setup["model"], setup["params"]
    ev = fg.FewShotGenerationEvaluator(name="g", every=0, kind="caption", model=model, tokenizer=TOK, image_id=IMG,
                                       eoc_id=EOC, load_split=None, load_support=None, template="this is{}",
                                       shots=(0,), support_size=4, beam_size=2, max_len=5, batch_size=2)
    rng = np.random.default_rng(0)
    w = TOK.word_to_id
    prompts = [[TOK.bos_id, IMG, w("this"), w("is")],
               [TOK.bos_id, IMG, w("a"), w("dax"), EOC, IMG, w("this"), w("is")],
               [TOK.bos_id, w("red"), EOC, IMG, w("this")]]
    media = [[rng.normal(size=(SIDE, SIDE, 3)).astype(np.float32) for _ in range(sum(t == IMG for t in p))]
             for p in prompts]
    batched = ev._generate(params, prompts, media, 16)
    alone = [fg.FewShotGenerationEvaluator(
        name="g1", every=0, kind="caption", model=model, tokenizer=TOK, image_id=IMG, eoc_id=EOC, load_split=None,
        load_support=None, template="this is{}", shots=(0,), support_size=4, beam_size=2, max_len=5,
        batch_size=1)._generate(params, [p], [m], len(p))[0] for p, m in zip(prompts, media)]
    assert batched == alone
    assert len(set(batched)) > 1                      # the random model does not answer everything alike


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_generation_evaluator_end_to_end(setup, tmp_path, kind):
    model, params = setup["model"], setup["params"]
    trials = 1 if kind == "caption" else 2      # each caption scoring runs the Java PTB tokenizer
    query, support = _Split(1), _Split(2, split="train", n=6)
    ev = fg.FewShotGenerationEvaluator(
        name=f"fs_{kind}", every=0, kind=kind, model=model, tokenizer=TOK, image_id=IMG, eoc_id=EOC,
        load_split=lambda: query, load_support=lambda: support,
        template="this is{}" if kind == "caption" else "{} a{}", shots=(0, 2), trials=trials,
        selection=("random", "rices"), num_queries=3, support_size=4, beam_size=2, max_len=4, batch_size=2,
        **({"meteor": False} if kind == "caption" else {}))    # METEOR: ~7 s a scoring (test_caption_eval)
    metrics = ev.run(params, {}, step=3, workdir=str(tmp_path), final=True)
    head = "CIDEr" if kind == "caption" else "accuracy"
    assert not any("METEOR" in k for k in metrics)
    for sel in ("random", "rices"):
        for k in (0, 2):
            assert np.isfinite(metrics[f"{sel}/shots_{k}/{head}_mean"]) and metrics[f"{sel}/shots_{k}/examples_per_s"] > 0
    out = tmp_path / "eval" / "step_3" / f"fs_{kind}"
    data = json.loads((out / "fewshot_generation.json").read_text())
    r = data["results"]
    # 0 shots: the same text-only draws whatever the selection method
    assert r["random"]["0"]["last_trial_predictions"] == r["rices"]["0"]["last_trial_predictions"]
    assert r["rices"]["2"]["example_prompt"].count("<image>") == 3
    assert r["random"]["0"]["example_prompt"].count("<image>") == 1
    preds = r["random"]["2"]["last_trial_predictions"]
    assert len(preds) == 3 and len(r["random"]["2"]["scores"]) == trials
    if kind == "vqa":     # the stored scores are the VQA accuracy of the stored answers
        from vlm_jax.evaluation.vqa import vqa_scores
        table = query.question_table()
        want = vqa_scores({int(q): a for q, a in preds.items()}, {q: table[q] for q in list(table)[:3]})
        assert r["random"]["2"]["scores"][-1]["accuracy"] == pytest.approx(want["accuracy"])
    assert (out / "shot_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    long = fg.FewShotGenerationEvaluator(
        name="too_long", every=0, kind=kind, model=model, tokenizer=TOK, image_id=IMG, eoc_id=EOC,
        load_split=lambda: query, load_support=lambda: support,
        template="this is{}" if kind == "caption" else "{} a{}", shots=(6,), trials=1, num_queries=1,
        support_size=6, max_len=40)
    with pytest.raises(ValueError, match="max_positions=64"):
        long.run(params, {}, step=0, workdir=str(tmp_path), final=True)
    with pytest.raises(ValueError, match="support set of 4"):
        fg.FewShotGenerationEvaluator(name="x", every=0, kind=kind, model=model, tokenizer=TOK, image_id=IMG,
                                      eoc_id=EOC, load_split=None, load_support=None, shots=(8,), support_size=4)
