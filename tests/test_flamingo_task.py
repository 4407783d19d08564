"""Flamingo as a trainer task (`vlm_jax.tasks.flamingo`) and its interleaved data
(`vlm_jax.data.interleaved`): token layout, the nonce-word episodes, the text-only stage 0, and
the two-stage run (text-only LM, then Flamingo with that LM frozen) through the one trainer."""
import os

import numpy as np
import pytest

from conftest import family_config
from vlm_jax import config_lib
from vlm_jax.data import interleaved
from vlm_jax.data.tokenizer import WordTokenizer
from vlm_jax.models import flamingo as fl

def flamingo_config(data_dir, arg="tiny", **overrides):
    return family_config("flamingo", data_dir, arg, **overrides)


def test_encode_interleaved_layout():
    tok = WordTokenizer(["a", "red", "circle", "dax", "this", "is"])
    v = tok.vocab_size
    ids = interleaved.encode_interleaved(
        tok, [interleaved.Chunk("a red circle"), interleaved.Chunk("this is", image=False, end=False),
              interleaved.Chunk("dax", end=False)], image_id=v, eoc_id=v + 1, add_eos=True)
    w = tok.word_to_id
    assert ids == [tok.bos_id, v, w("a"), w("red"), w("circle"), v + 1, w("this"), w("is"), v, w("dax"), tok.eos_id]


def test_nonce_words_avoid_the_vocabulary():
    words = interleaved.nonce_words(30, exclude=["dax", "bag", "bak"])
    assert len(set(words)) == 30 and not {"dax", "bag", "bak"} & set(words)
    with pytest.raises(ValueError, match="nonce words are available"):
        interleaved.nonce_words(10 ** 6)


class _Images:
    """record -> encoded bytes stand-in: the preprocessor below maps record r to a constant image r."""

    def __getitem__(self, r):
        return int(r)

    def __len__(self):
        return 100


def _source(cls, *args, text_only=False, m=5, t=60, **kw):
    words = ["this", "is", "a", "red", "blue", "green", "circle"] + interleaved.nonce_words(6)
    words += [w for w in dict.fromkeys(" ".join(interleaved.FILLER).split()) if w not in words]
    tok = WordTokenizer(words)
    v = tok.vocab_size
    src = cls(*args, images=_Images(), preprocess=lambda r: np.full((4, 4, 3), float(r), np.float32), tokenizer=tok,
              image_id=v, eoc_id=v + 1, max_images=m, max_tokens=t, image_size=4, seed=3, text_only=text_only, **kw)
    return src, tok


def test_nonce_episode_binding_is_consistent_within_and_fresh_across_episodes():
    by_color = {"red": np.array([0, 1, 2]), "blue": np.array([10, 11]), "green": np.array([20, 21, 22])}
    words = interleaved.nonce_words(6)
    src, tok = _source(interleaved.NonceEpisodeSource, by_color, words, 2, 50, m=6)
    v = tok.vocab_size
    color_of = {int(r): c for c, rs in by_color.items() for r in rs}
    bindings = []
    for j in range(20):
        ex = src[j]
        toks = [int(t) for t in ex["tokens"] if t != tok.pad_id]
        starts = [i for i, t in enumerate(toks) if t == v]
        assert len(starts) == 6 and ex["media_valid"].all()
        seen = {}
        for m, i in enumerate(starts):
            word = tok.id_to_word(toks[i + 4])            # <image> this is a WORD <eoc>
            assert toks[i + 5] == v + 1 and word in words
            color = color_of[int(ex["images"][m, 0, 0, 0])]
            assert seen.setdefault(color, word) == word, "one colour, one nonce word within an episode"
        assert len(set(seen.values())) == len(seen), "two colours never share a word"
        bindings.append(tuple(sorted(seen.items())))
        np.testing.assert_array_equal(src[j]["tokens"], ex["tokens"])          # deterministic per index
    assert len(set(bindings)) > 5, "the binding changes between episodes"
    # text-only form (stage 0): the colour word stands in for the image, no marker, no images
    txt, tok2 = _source(interleaved.NonceEpisodeSource, by_color, words, 2, 50, m=6, text_only=True)
    ex = txt[0]
    assert set(ex) == {"tokens"} and int(ex["tokens"].max()) < tok2.vocab_size     # no <image>, no <eoc>
    text = tok2.decode(ex["tokens"]).split()
    assert len(text) == 6 * 5
    for i in range(0, 30, 5):
        assert text[i:i + 3] == ["this", "is", "a"] and text[i + 3] in by_color and text[i + 4] in words


def test_synthetic_docs_respect_the_image_and_token_limits():
    caps = [[f"a red circle {'this ' * (r % 7)}"] for r in range(40)]
    src, tok = _source(interleaved.SyntheticDocSource, caps, 30, m=3, t=20)
    v = tok.vocab_size
    n_images = set()
    for j in range(30):
        ex = src[j]
        k = int((ex["tokens"] == v).sum())
        assert k == int(ex["media_valid"].sum()) <= 3 and ex["tokens"].shape == (20,)
        # the valid slots hold the marked records' images, the rest are zeros
        assert (ex["images"][~ex["media_valid"]] == 0).all()
        n_images.add(k)
    assert len(n_images) >= 2


def test_task_batches_and_loss_mask(data_dir):
    from vlm_jax.tasks import make_task
    cfg = flamingo_config(data_dir, "tiny", model__freeze_lm="false")
    task = make_task(cfg, workdir=None)
    it = task.train_iterator(process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"pairs", "docs", "nonce"}
    for name, ex in batch.items():
        assert ex["tokens"].shape == (task.source_batch(name), task.token_len(name))
        assert ex["images"].shape[1] == task.max_images(name) == ex["media_valid"].shape[1]
        # every row has at least one image and its markers match its valid slots
        assert ((ex["tokens"] == task.image_id).sum(1) == ex["media_valid"].sum(1)).all()
    toks = batch["pairs"]["tokens"]
    label = np.asarray(fl.interleaved_label_mask(toks, task.image_id, task.eoc_id, task.tokenizer.pad_id))
    # pairs: <bos> <image> caption <eoc> <eos>: the caption words and <eoc> are targets, the rest not
    for row, lab in zip(toks, label):
        n = int((row != task.tokenizer.pad_id).sum())
        assert not lab[:2].any() and lab[2:n - 1].all() and not lab[n - 1:].any()
    abstract = task.example_batch(cfg.train.batch_size)
    assert {k: {kk: v.shape for kk, v in d.items()} for k, d in abstract.items()} == \
        {k: {kk: v.shape for kk, v in d.items()} for k, d in batch.items()}


def test_frozen_lm_needs_a_seed(data_dir):
    cfg = flamingo_config(data_dir, "tiny")
    from vlm_jax.tasks import flamingo as tf
    with pytest.raises(config_lib.ConfigError, match="lm_synthetic"):
        tf.validate(cfg)


def test_two_stages_text_lm_then_flamingo_with_it_frozen(data_dir, tmp_path):
    """Stage 0 trains only the LM's own parameters text-only; stage 1 restores that LM, keeps it (and
    the ViT) bit-identical while the resampler, gated blocks and the new token rows move, and
    runs both evaluators."""
    import jax
    from conftest import final_params
    from vlm_jax import train_lib
    lm_dir, fl_dir = str(tmp_path / "lm"), str(tmp_path / "fl")
    # two sources per stage keep the compiled step small (all three are checked in test_task_batches_and_loss_mask)
    cfg0 = flamingo_config(data_dir, "tiny", model__stage="lm", data__mixture__docs__weight=0, train__num_steps=2)
    train_lib.train(cfg0, lm_dir)
    # suite time: fewshot_caption (Java PTB + METEOR for every scoring) has its own end-to-end test
    # (tests/test_fewshot.py); fewshot_vqa takes the same path through the real eval/train splits
    cfg1 = flamingo_config(data_dir, f"tiny,lm={lm_dir}", data__mixture__pairs__weight=0, train__num_steps=2,
                           evals__fewshot_caption__enabled="false")
    metrics = train_lib.train_and_evaluate(cfg1, fl_dir)
    assert {"fewshot", "caption", "caption_blind", "fewshot_vqa"} <= set(metrics)
    assert "fewshot_caption" not in metrics
    assert "CIDEr" in metrics["caption"] and "CIDEr" in metrics["caption_blind"] and metrics["fewshot"]
    for sel in ("random", "rices"):
        for k in (0, 1):   # open-ended few-shot generation from the real eval/train splits
            assert 0.0 <= metrics["fewshot_vqa"][f"{sel}/shots_{k}/accuracy_mean"] <= 1.0

    (_, p0), (_, p1) = final_params(cfg0, lm_dir), final_params(cfg1, fl_dir)
    flat0 = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_leaves_with_path(p0)}
    flat1 = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_leaves_with_path(p1)}
    assert flat0.keys() == flat1.keys()
    moved = {k for k in flat1 if not np.array_equal(flat0[k], flat1[k])}
    import re
    lm_own = [k for k in flat1 if re.search(r"'lm'", k) and not re.search(r"inserted_\d+", k)]
    vision = [k for k in flat1 if k.startswith("['vision']")]
    assert lm_own and vision and not moved & set(lm_own + vision), "the frozen LM / ViT changed"
    assert any("resampler" in k for k in moved) and any("inserted_" in k for k in moved)
    assert any("extra_embed" in k for k in moved)
    files = {f for _, _, fs in os.walk(os.path.join(fl_dir, "eval")) for f in fs}
    assert "fewshot_metrics.json" in files and "shot_curve.png" in files
    assert os.path.exists(os.path.join(fl_dir, "eval", "step_2", "caption_blind", "metrics.json"))


def test_train_step_on_a_2x2x2_mesh_equals_one_device(data_dir):
    """The train step's loss and gradients (LM trainable here so every kind of parameter gets one;
    the pairs and nonce sources) on data=2, fsdp=2, tensor=2 of 8 CPU devices equal the 1-device
    ones: the loss and its terms, and every gradient leaf, within 1e-5. (The parameters after an
    AdamW step are not compared: its first update is ~lr * sign(g), so gradients of ~1e-9 that
    differ in their last bits flip whole updates.) Parameters come from a numpy fill (gates
    nonzero) so no jitted init is compiled."""
    import jax
    import numpy as np
    from conftest import random_params
    from vlm_jax import sharding, train_lib
    from vlm_jax.tasks import make_task
    assert jax.device_count() == 8
    two = dict(model__freeze_lm="false", data__mixture__docs__weight=0)
    base = flamingo_config(data_dir, "tiny", **two)
    task0, _ = train_lib.make_task_and_mesh(base, None)
    batch = next(task0.train_iterator(process_index=0, process_count=1))
    abstract = jax.eval_shape(task0.init, jax.random.key(0), task0.example_batch(1))
    host = jax.tree.map(np.asarray, random_params(abstract["params"], seed=4, random_gates=True))
    results = []
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.create_mesh(shape, jax.devices()[:int(np.prod(list(shape.values())))])
        cfg = flamingo_config(data_dir, "tiny", **two, **{f"mesh__{k}": v for k, v in shape.items()})
        task = make_task(cfg, mesh=mesh)
        task.prepare()
        prog = train_lib.build_program(cfg, task, mesh)
        b = sharding.put_batch(batch, mesh, prog.batch_sharding)
        rng = jax.device_put(jax.random.key(1), sharding.replicated(mesh))
        params = jax.device_put(host, prog.variable_sharding["params"])
        with sharding.rules_context(mesh):
            (_, (metrics, _)), grads = jax.jit(jax.value_and_grad(
                lambda p: task.loss_fn(p, {}, b, rng, train=True), has_aux=True))(params)
        results.append(({k: float(v) for k, v in metrics.items()}, jax.device_get(grads)))
    (m1, g1), (m8, g8) = results
    assert np.isfinite(m1["loss"])
    for k in ("loss", "pairs/loss", "nonce/loss", "pairs/accuracy", "nonce/accuracy"):
        assert abs(m1[k] - m8[k]) <= 1e-5 * max(1.0, abs(m1[k])), (k, m1[k], m8[k])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_source_batch_must_divide_the_data_parallel_size(data_dir):
    import jax
    from vlm_jax import sharding
    from vlm_jax.tasks import make_task
    cfg = flamingo_config(data_dir, "tiny", data__mixture__docs__batch_size=4, model__freeze_lm="false")
    mesh = sharding.create_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices())
    with pytest.raises(config_lib.ConfigError, match=r"data.mixture.docs.batch_size=4 is not divisible .* size 8"):
        make_task(cfg, mesh=mesh).prepare()


def test_paper_layouts_count_the_papers_parameters():
    """configs/flamingo.py:paper_3b through the task's own model builder (jax.eval_shape): the
    Perceiver Resampler within 3% of the paper's 194M, the GATED XATTN-DENSE blocks within 5% of
    its 1.2B (Table 5); the frozen/trainable split equals the model's parameter groups; and the
    layout is refused for training (no weights exist for it)."""
    import importlib.util

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlm_jax import optim
    from vlm_jax.config_lib import ConfigError
    from vlm_jax.tasks import flamingo as flamingo_task
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("fpc", os.path.join(root, "benchmarks", "flamingo_param_counts.py"))
    fpc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fpc)
    c = fpc.counts("paper_3b")
    assert abs(c["resampler"] / 194e6 - 1) < 0.03, c
    assert abs(c["xattn"] / 1.2e9 - 1) < 0.05, c
    assert abs(c["vision"] / 435e6 - 1) < 0.03, c        # the NFNet-F6 stand-in's size
    # the split by the model's own parameter groups (what the optimizer freezes)
    config = config_lib.load_config("configs/flamingo.py:paper_3b")
    fc = flamingo_task.model_config(config, vocab_size=32000, max_positions=0)
    assert (fc.lm.num_layers, fc.lm.width, fc.xattn_every, fc.resampler.num_latents, fc.resampler.depth) == \
        (24, 2048, 1, 64, 6)
    s = fc.vision.image_size
    shapes = nn.unbox(jax.eval_shape(fl.Flamingo(fc).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32),
                                     jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32))["params"])
    labels = optim.assign_groups(shapes, [], fl.param_groups())
    frozen = sum(x.size for x, lab in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(labels))
                 if lab.startswith("frozen"))
    assert frozen == c["frozen"] and c["total"] == sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    nine = fpc.counts("paper_9b")
    assert nine["resampler"] == c["resampler"] and nine["xattn"] > c["xattn"]
    with pytest.raises(ConfigError, match="shape reference"):
        flamingo_task.validate(config)
