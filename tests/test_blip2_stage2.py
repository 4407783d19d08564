"""BLIP-2 stage 2 (`vlm_jax.models.blip2.Blip2LMModel`) and the import of HF
``Blip2ForConditionalGeneration`` checkpoints with an OPT and with a T5 language model.

Oracles: tiny random HF models built from configs here (dimensions unlike the defaults: vision
24 wide / 3 heads / 2 layers on 30 px images with 6 px patches; Q-Former 36 wide / 3 heads,
FFN 44, 3 layers, cross-attention every 2nd layer, 5 queries; OPT 20 wide / 2 heads / 2 layers,
FFN 28; T5 20 wide / 3 heads of 6 (H*K = 18 != D), FFN 28, 3 encoder + 2 decoder layers (HF's T5
generation sizes its cache by the encoder depth, so not the other way round),
gated-GELU, an untied head; vocabulary 70), every weight randomised (HF zero-inits the queries
and biases), `save_pretrained` to a tmp dir and loaded back with `vlm_jax.convert.load_hf`.

HF's ``input_ids`` are built as ``Blip2Processor`` builds them: ``num_query_tokens`` copies of
``image_token_index`` first (HF replaces their embeddings with the projected queries; without
them the image is silently ignored), then the tokenizer's output (OPT: ``</s>`` bos + words,
left padded for a batch; T5: words + ``</s>``, right padded). Our model takes the images and
the tokens after the placeholders.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from vlm_jax.convert import ConversionError, common, conversion_for, load_hf  # noqa: E402
from vlm_jax.models import blip2 as mb  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
ATOL = 1e-4
NQ, VOCAB, IMAGE_TOKEN = 5, 70, 69          # the placeholder id is the processor's added `<image>` token
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=30,
              patch_size=6)
QFORMER = dict(hidden_size=36, num_attention_heads=3, intermediate_size=44, num_hidden_layers=3,
               cross_attention_frequency=2, vocab_size=60, max_position_embeddings=20)
OPT = dict(vocab_size=VOCAB, hidden_size=20, num_hidden_layers=2, num_attention_heads=2, ffn_dim=28,
           max_position_embeddings=64, word_embed_proj_dim=20, pad_token_id=1, bos_token_id=2, eos_token_id=2)
T5 = dict(vocab_size=VOCAB, d_model=20, d_kv=6, d_ff=28, num_layers=3, num_decoder_layers=2, num_heads=3,
          feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
          eos_token_id=1, relative_attention_num_buckets=8, relative_attention_max_distance=16)
PAD = {"opt": 1, "t5": 0}
LM_STD = {"opt": 1.0, "t5": 0.5}
PROMPTS = [[17, 33, 5, 48, 9], [41, 8], [3, 29, 14]]          # prompt words of 3 rows (different lengths)
TEXTS = [[21, 7, 44, 12], [58, 30], [6, 61, 25]]              # text (caption) words
MAX_DIFF: dict[str, float] = {}


def _perturb_(model, lm_std):
    """Every weight random: std 0.2; the LM's ``lm_std`` (T5's query/key 0.2), its word embeddings
    with rows of equal norm, so that greedy continuations are not one repeated token; LayerNorm
    scales around 1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = lm_std if name.startswith("language_model") else 0.2
            if name.startswith("language_model") and name.endswith((".q.weight", ".k.weight")):
                std = 0.2                  # T5 does not scale attention logits by 1/sqrt(K): keep them tame
            if p.ndim > 1 or "embedding" in name or "token" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                if name in ("language_model.model.decoder.embed_tokens.weight", "language_model.shared.weight"):
                    p.mul_(std * p.shape[1] ** 0.5 / p.norm(dim=-1, keepdim=True))   # equal-norm rows: the tied
                    #                                           head then favours no token for its norm alone
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_config(lm: str):
    T = transformers
    text = T.OPTConfig(**OPT) if lm == "opt" else T.T5Config(**T5)
    return T.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(),
                         num_query_tokens=NQ, image_token_index=IMAGE_TOKEN)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """lm -> (HF model reloaded from disk, our module, our variables, the directory)."""
    torch.manual_seed(0)
    out = {}
    for lm in ("opt", "t5"):
        d = str(tmp_path_factory.mktemp(f"blip2_{lm}"))
        _perturb_(transformers.Blip2ForConditionalGeneration(_hf_config(lm)), LM_STD[lm]).save_pretrained(d)
        if lm == "t5":
            # transformers 5 re-ties T5's head in memory and saves no lm_head; Flan-T5 files carry an
            # untied one: add it (HF then unties on load, as for the real checkpoints)
            file = os.path.join(d, "model.safetensors")
            tensors = load_file(file)
            assert "language_model.lm_head.weight" not in tensors
            head = torch.randn(VOCAB, 20, generator=torch.Generator().manual_seed(1))
            tensors["language_model.lm_head.weight"] = head * (LM_STD[lm] * 20 ** 0.5 / head.norm(dim=-1, keepdim=True))
            save_file(tensors, file, metadata={"format": "pt"})
        hf = transformers.Blip2ForConditionalGeneration.from_pretrained(d).eval()
        module, variables, _ = load_hf(d)
        out[lm] = (hf, module, variables, d)
    hf_t5 = out["t5"][0].language_model
    assert not torch.equal(hf_t5.lm_head.weight, hf_t5.shared.weight)          # really untied
    return out


def _pixels(seed=0, n=3):
    px = np.random.default_rng(seed).normal(size=(n, 3, 30, 30)).astype(np.float32)      # NCHW (HF)
    return px, jnp.asarray(px.transpose(0, 2, 3, 1))                                    # NHWC (ours)


def _pad_rows(rows, pad, side):
    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def _prompts(lm):
    """The tokenizer's output for the prompts: OPT ``[</s>, words]`` left padded; T5 ``[words, </s>]`` right padded."""
    if lm == "opt":
        return _pad_rows([[2] + p for p in PROMPTS], PAD[lm], "left")
    return _pad_rows([p + [1] for p in PROMPTS], PAD[lm], "right")


def _with_placeholders(ids, mask):
    """What Blip2Processor puts in front of the tokenizer's output: Q image placeholders (always attended)."""
    b = ids.shape[0]
    return (np.concatenate([np.full((b, NQ), IMAGE_TOKEN), ids], 1),
            np.concatenate([np.ones((b, NQ), np.int64), mask], 1))


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _record(name, got, want, where=None):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    diff = np.abs(got - want) if where is None else np.abs(got - want)[where]
    MAX_DIFF[name] = float(diff.max())
    print(f"max |ours - HF| {name}: {MAX_DIFF[name]:.2e}")
    np.testing.assert_allclose(got if where is None else got[where], want if where is None else want[where],
                               atol=ATOL, rtol=0, err_msg=name)


# --------------------------------------------------------------------------- logits
def test_opt_logits_match_hf(models):
    hf, module, variables, _ = models["opt"]
    assert not module.config.seq2seq and module.config.qformer.text_input is False
    prompt, pmask = _prompts("opt")
    text, tmask = _pad_rows([t + [2] for t in TEXTS], PAD["opt"], "right")
    px, images = _pixels(0)
    # one HF pass over [placeholders; prompt; text] (left pad before the prompt, right pad after the text)
    ids, am = _with_placeholders(np.concatenate([prompt, text], 1), np.concatenate([pmask, tmask], 1))
    with torch.no_grad():
        ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(am)).logits.numpy()     # [B, Q+T, V]
    full = jax.jit(functools.partial(module.apply, method="lm_logits"))(
        variables, images, jnp.asarray(np.concatenate([prompt, text], 1), jnp.int32),
        jnp.asarray(np.concatenate([pmask, tmask], 1)))
    _record("OPT lm_logits", full, ref, am.astype(bool))          # HF's pad rows are undefined: real positions
    # the training view: logits predicting each text token, and the loss mask = real text tokens only
    logits, target_mask = jax.jit(functools.partial(module.apply, method="text_logits"))(
        variables, images, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask), jnp.asarray(text, jnp.int32),
        jnp.asarray(tmask))
    tp, tt = prompt.shape[1], text.shape[1]
    np.testing.assert_array_equal(np.asarray(target_mask), tmask.astype(bool))
    _record("OPT text_logits", logits, ref[:, NQ + tp - 1:NQ + tp + tt - 1], tmask.astype(bool))
    # the LAVIS / HF labelling (-100 on placeholders, prompt and padding; shifted by one) == xent over the mask.
    # (HF's own ``labels=`` path fails here: transformers 5.24 views a non-contiguous logits slice.)
    labels = np.where(np.concatenate([np.zeros((3, NQ), np.int64), np.zeros_like(pmask), tmask], 1) == 1,
                      ids, -100)
    hf_loss = float(torch.nn.functional.cross_entropy(_t(ref[:, :-1]).reshape(-1, VOCAB), _t(labels[:, 1:]).reshape(-1),
                                                      ignore_index=-100))
    lp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(lp, jnp.asarray(text)[..., None], -1)[..., 0]
    ours = float((nll * target_mask).sum() / target_mask.sum())
    assert abs(ours - hf_loss) < ATOL, (ours, hf_loss)
    # the image matters
    other = module.apply(variables, images * 0.5, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask),
                         method="lm_logits")
    assert np.abs(np.asarray(other) - np.asarray(full[:, :prompt.shape[1] + NQ])).max() > 1e-2


def test_t5_logits_match_hf(models):
    hf, module, variables, _ = models["t5"]
    assert module.config.seq2seq and "lm_head" in variables["params"]["lm"]
    prompt, pmask = _prompts("t5")
    text, tmask = _pad_rows([t + [1] for t in TEXTS], PAD["t5"], "right")
    px, images = _pixels(1)
    ids, am = _with_placeholders(prompt, pmask)
    dec_in = np.concatenate([np.zeros((3, 1), np.int64), text[:, :-1]], 1)
    dec_mask = np.concatenate([np.ones((3, 1), np.int64), tmask[:, :-1]], 1)
    with torch.no_grad():
        ref = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(am), decoder_input_ids=_t(dec_in),
                 decoder_attention_mask=_t(dec_mask)).logits.numpy()
        ref_unmasked = hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(am),
                          decoder_input_ids=_t(dec_in)).logits.numpy()
    full = jax.jit(functools.partial(module.apply, method="lm_logits"))(
        variables, images, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask),
        decoder_tokens=jnp.asarray(dec_in, jnp.int32))
    _record("T5 lm_logits", full, ref_unmasked)
    logits, target_mask = jax.jit(functools.partial(module.apply, method="text_logits"))(
        variables, images, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask), jnp.asarray(text, jnp.int32),
        jnp.asarray(tmask))
    np.testing.assert_array_equal(np.asarray(target_mask), tmask.astype(bool))
    _record("T5 text_logits", logits, ref, tmask.astype(bool))
    labels = np.where(tmask == 1, text, -100)
    with torch.no_grad():
        hf_loss = float(hf(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(am), labels=_t(labels),
                           decoder_attention_mask=_t(dec_mask)).loss)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(text)[..., None], -1)[..., 0]
    assert abs(float((nll * target_mask).sum() / target_mask.sum()) - hf_loss) < ATOL


# ------------------------------------------------------------------------ generation
def _hf_generate(hf, lm, px, ids, am, n, **kw):
    with torch.no_grad():
        out = hf.generate(pixel_values=_t(px), input_ids=_t(ids), attention_mask=_t(am), do_sample=False,
                          max_new_tokens=n, pad_token_id=PAD[lm], **kw).numpy()
    out = out[:, ids.shape[1]:] if lm == "opt" else out[:, 1:]          # OPT: prompt echoed; T5: decoder start
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=PAD[lm])


def _pad_after_eos(tokens, eos, pad):
    """Every position after a row's first eos set to ``pad``."""
    after = np.cumsum(np.cumsum(tokens == eos, axis=1), axis=1) > 1
    return np.where(after, pad, tokens)


def _eos_mid_sequence(free):
    """(row, step, token): a token HF emits in that row at a step >= 2 and not before; made the eos,
    it stops that row mid-sequence."""
    return next((i, j, int(free[i, j])) for i in range(free.shape[0]) for j in range(2, free.shape[1])
                if free[i, j] not in free[i, :j])


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_greedy_generation_matches_hf(models, lm):
    hf, module, variables, _ = models[lm]
    prompt, pmask = _prompts(lm)
    px, images = _pixels(2)
    ids, am = _with_placeholders(prompt, pmask)
    n = 6
    free = _hf_generate(hf, lm, px, ids, am, n, num_beams=1, eos_token_id=OPT["eos_token_id"] if lm == "opt" else 1)
    row, stop, eos = _eos_mid_sequence(free)
    ref = _hf_generate(hf, lm, px, ids, am, n, num_beams=1, eos_token_id=eos)
    assert ref[row, stop] == eos and (ref[row, stop + 1:] == PAD[lm]).all()
    run = jax.jit(functools.partial(mb.generate, module, max_new_tokens=n, eos_id=eos, pad_id=PAD[lm]))
    res = run(variables["params"], images, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask))
    assert res.tokens.shape == (3, 1, n)
    np.testing.assert_array_equal(np.asarray(res.tokens[:, 0]), ref)
    assert len(np.unique(ref)) > 3                                   # not a degenerate continuation
    blind = run(variables["params"], images * 0.0, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask))
    assert (np.asarray(blind.tokens[:, 0]) != ref).any()            # the image prefix matters


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_beam_search_matches_hf(models, lm):
    """Beam 3 with a length penalty: the best beam equals HF's ``num_beams=3`` output (eos fires mid-way)."""
    hf, module, variables, _ = models[lm]
    prompt, pmask = _prompts(lm)
    px, images = _pixels(3)
    ids, am = _with_placeholders(prompt, pmask)
    n, k, alpha = 6, 3, 1.0
    free = _hf_generate(hf, lm, px, ids, am, n, num_beams=1, eos_token_id=OPT["eos_token_id"] if lm == "opt" else 1)
    _, _, eos = _eos_mid_sequence(free)
    ref = _hf_generate(hf, lm, px, ids, am, n, num_beams=k, length_penalty=alpha, eos_token_id=eos)
    res = jax.jit(functools.partial(mb.generate, module, max_new_tokens=n, eos_id=eos, pad_id=PAD[lm],
                                    strategy="beam", beam_size=k, length_penalty=alpha))(
        variables["params"], images, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask))
    assert res.tokens.shape == (3, k, n)
    # HF fills a beam output after its eos with the eos itself when pad_token_id is 0 (T5: `pad or eos`)
    np.testing.assert_array_equal(np.asarray(res.tokens[:, 0]), _pad_after_eos(ref, eos, PAD[lm]))
    assert (ref == eos).any()                                        # the length penalty had a finished beam to rank


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_scanned_lm_import_equals_unrolled(models, lm):
    """``load_hf(lm={'scan_layers': True}, vision={...})``: the LM's (T5: both stacks') and the ViT's
    layers stacked on a leading axis, same logits (this Q-Former's 3 layers are not periodic)."""
    _, module, variables, d = models[lm]
    scanned, svars, _ = load_hf(d, lm={"scan_layers": True}, vision={"scan_layers": True})
    p = svars["params"]
    assert "layers" in p["vision"]["encoder"] and "layers_0" in p["qformer"]
    assert all("layers" in p["lm"][s] for s in ("encoder", "decoder")) if lm == "t5" else "layers" in p["lm"]
    prompt, pmask = _prompts(lm)
    _, images = _pixels(5)
    args = (images, jnp.asarray(prompt, jnp.int32), jnp.asarray(pmask))
    kw = {"decoder_tokens": jnp.asarray(prompt, jnp.int32)} if lm == "t5" else {}
    a = module.apply(variables, *args, method="lm_logits", **kw)
    b = scanned.apply(svars, *args, method="lm_logits", **kw)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=ATOL, rtol=0)     # f32 reassociation only


# ------------------------------------------------------------------ stage-1 Q-Former
def test_stage1_qformer_tree_is_accepted(models):
    """A stage-2 model over a stage-1 Q-Former (text embeddings, text FFN, ITG head) has exactly the
    stage-1 model's ``qformer`` tree (so a stage-1 checkpoint restores into it) and gives the same
    outputs as the image-only Q-Former (those parameters are unused)."""
    _, module, variables, _ = models["opt"]
    cfg = module.config
    stage1_q = dataclasses.replace(cfg.qformer, text_input=True, lm_head=True)
    wide = mb.Blip2LMModel(vision=module.vision, config=dataclasses.replace(cfg, qformer=stage1_q))
    _, images = _pixels(4, n=1)
    tokens = jnp.asarray([[2, 17, 33]], jnp.int32)
    shapes = nn.unbox(jax.eval_shape(wide.init, jax.random.key(0), images, tokens)["params"])
    stage1 = mb.Blip2QFormerModel(vision=module.vision, config=mb.Blip2Config(qformer=stage1_q, embed_dim=8))
    s1 = nn.unbox(jax.eval_shape(stage1.init, jax.random.key(0), images, tokens[:, :2],
                                 jnp.ones((1, 2), bool))["params"])
    shape_of = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)     # noqa: E731
    assert shape_of(shapes["qformer"]) == shape_of(s1["qformer"])
    assert {"word_embed", "position_embed", "lm_bias", "lm_transform"} <= set(shapes["qformer"])
    # fill the stage-1-only parameters with arbitrary values, the rest from the imported model
    flat = traverse_util.flatten_dict(variables["params"])
    filled = {p: flat.get(p, jnp.full(x.shape, 0.3, x.dtype)) for p, x in traverse_util.flatten_dict(shapes).items()}
    assert set(flat) < set(filled)
    a = module.apply(variables, images, tokens, method="lm_logits")
    b = wide.apply({"params": traverse_util.unflatten_dict(filled)}, images, tokens, method="lm_logits")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------- vocab-mixture prefix
def test_vocab_mixture_prefix(models):
    """``Blip2LMConfig(prefix='vocab_mixture')`` (a named deviation): ``language_projection`` maps
    the query outputs to the LM's vocabulary, each prefix vector is softmax(logits) @ the frozen
    LM's word embeddings (OPT here); one-hot weights give exactly the word embeddings (OPT and
    T5); logits run through the LM. An unknown prefix kind is refused."""
    lm = "opt"
    _, module, variables, _ = models[lm]
    cfg = dataclasses.replace(module.config, prefix="vocab_mixture")
    mix = mb.Blip2LMModel(vision=module.vision, config=cfg)
    _, images = _pixels(6, n=2)
    tokens = jnp.asarray([[2, 17, 33], [2, 5, 9]], jnp.int32)
    shapes = nn.unbox(jax.eval_shape(mix.init, jax.random.key(0), images, tokens)["params"])
    d, v = shapes["language_projection"]["kernel"].shape
    assert v == cfg.lm.vocab_size and d == cfg.qformer.width
    params = dict(variables["params"])
    rng = np.random.default_rng(0)
    params["language_projection"] = {"kernel": jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
                                     "bias": jnp.asarray(rng.normal(size=(v,)), jnp.float32)}
    prefix = mix.apply({"params": params}, images, method="image_prefix")
    feats = module.apply(variables, images, method="image_features")
    h = module.apply(variables, feats, method="query_outputs")                                     # [B, Q, D]
    table = params["lm"]["token_embed"]["embedding"]                                                # [V, E]
    w = jax.nn.softmax(h @ params["language_projection"]["kernel"] + params["language_projection"]["bias"], -1)
    np.testing.assert_allclose(np.asarray(prefix), np.asarray(w @ table), atol=1e-5, rtol=0)
    lm_mod = mb.make_language_model(cfg)
    one_hot = jax.nn.one_hot(tokens, v)
    np.testing.assert_array_equal(np.asarray(lm_mod.apply({"params": params["lm"]}, one_hot, method="embed_mixture")),
                                  np.asarray(lm_mod.apply({"params": params["lm"]}, tokens, method="embed_tokens")))
    _, t5_module, t5_vars, _ = models["t5"]
    t5 = mb.make_language_model(t5_module.config)
    np.testing.assert_array_equal(
        np.asarray(t5.apply({"params": t5_vars["params"]["lm"]}, one_hot, method="embed_mixture")),
        np.asarray(t5.apply({"params": t5_vars["params"]["lm"]}, tokens, method="embed_tokens")))
    logits = mix.apply({"params": params}, images, tokens, method="lm_logits")
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="Blip2LMConfig.prefix='bogus'"):
        dataclasses.replace(module.config, prefix="bogus")


# -------------------------------------------------------------------- strict import
def test_import_is_strict(models):
    _, _, _, d = models["opt"]
    cfg, tensors = common.read_hf_dir(d)
    assert "language_model.lm_head.weight" not in tensors            # tied: absent from the file
    conv = lambda ts, c=cfg: conversion_for(c, set(ts))             # noqa: E731

    missing = dict(tensors)
    del missing["language_projection.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'language_projection\.bias'"):
        common.convert(conv(missing), missing)
    extra = dict(tensors, **{"qformer.embeddings.word_embeddings.weight": np.zeros((60, 36), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key 'qformer\.embeddings\.word_embeddings\.weight'"):
        common.convert(conv(extra), extra)
    emb = "language_model.model.decoder.embed_tokens.weight"
    tied_copy = dict(tensors, **{"language_model.lm_head.weight": np.array(tensors[emb])})
    common.convert(conv(tied_copy), tied_copy)                       # an identical tied copy is accepted
    bad_copy = dict(tensors, **{"language_model.lm_head.weight": np.array(tensors[emb]) + 1})
    with pytest.raises(ConversionError, match=r"lm_head\.weight' should be a tied copy"):
        common.convert(conv(bad_copy), bad_copy)
    gpt2 = dict(cfg, text_config=dict(cfg["text_config"], model_type="gpt2"))
    with pytest.raises(ConversionError, match="'gpt2' language model is not supported"):
        conv(tensors, gpt2)
    with pytest.raises(ConversionError, match="stage-1 Blip2Config fields"):
        conversion_for(cfg, set(tensors), init_temperature=0.1)
    module, _, _ = load_hf(d, lm={"remat_policy": "full"}, scan_layers=False)
    assert module.config.lm.remat_policy == "full"


def test_report_max_diffs():
    """Prints every measured max |ours - HF| (run with -s to see them)."""
    print("BLIP-2 stage-2 parity, max abs diffs:", MAX_DIFF)
