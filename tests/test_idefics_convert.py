"""Import of HF ``IdeficsForVisionText2Text`` checkpoints into `Flamingo` (`vlm_jax.convert.idefics`).

Oracle: tiny random IDEFICS models built from configs here, with dimensions unlike any default --
LM 36 wide / 3 heads (K 12) / 4 layers / SwiGLU 45, vocabulary 50 + 2 additional rows, a gated
cross-attention block every 2nd layer (IDEFICS puts it before layers 0 and 2); vision 24 wide /
3 heads / 2 layers / MLP 37 on 30 px with 6 px patches (5x5 grid + [CLS]); perceiver 2 layers,
5 latents, 3 heads of 7 (inner width 21 != 24). Every weight is randomised, the tanh gates
(``alpha_*``, zero-initialised by HF) included, so the cross-attention changes the logits.
(4 LM layers, not 3: with 3 layers and ``cross_layer_interval=2`` HF's IdeficsModel asks for a
2nd cross-attention layer it never built and raises IndexError.) Two variants:

  * 'qk_vector': ``qk_layer_norms`` + ``qk_layer_norms_perceiver``, ``alpha_type='vector'``,
    untied head (-> ``extra_lm_head``), unrolled layers;
  * 'plain_tied': float gates, no qk norms, ``tie_word_embeddings`` (the additional output rows
    are ``extra_embed`` itself), imported with ``scan_layers=True``.

Masking. HF takes ``image_attention_mask [B, T, M]`` from its processor
(``image_attention_mask_for_packed_input_ids``): each token sees the most recent ``<image>`` at
or before it -- our rule (`media_text_time`) -- except that after an eos token (``</s>``, id 2)
nothing is seen until the next ``<image>``. Our model has no such rule; the test feeds
``text_time = idefics_text_time(tokens, image_id, eos_id)`` explicitly (checked against the
processor's own function, and shown to matter: without it the tokens after the eos differ).
Text before a row's first image sees nothing in both (HF's ``cross_attention_gate``, our
``zero_empty_rows``). While generating HF repeats the last prompt token's image row, our
decode counter counts generated ``<image>`` markers: equal when none is generated (asserted).

Compared in f32: logits of a batch of 2 rows x 2 images interleaved with text (row 0: text before
its first image and right padding; row 1: an eos between its images), max |diff| <= 1e-4; greedy
`vlm_jax.generate.generate` (media through ``row_inputs={'latents', 'media_valid'}``, the decode
counter supplies text_time) against HF ``generate`` for 5 new tokens. A truncated file, a missing,
unexpected or mis-shaped tensor and unsupported configs raise ConversionError naming the key/field.
"""
import os
import shutil
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.idefics import processing_idefics  # noqa: E402

from vlm_jax import generate  # noqa: E402
from vlm_jax.convert import ConversionError, common, conversion_for, load_hf  # noqa: E402
from vlm_jax.convert.idefics import idefics_config, idefics_image_attention_mask, idefics_text_time  # noqa: E402
from vlm_jax.models.flamingo import media_text_time  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
ATOL = 1e-4
V, X, EOS = 50, 2, 2
FAKE, IMG = V, V + 1                      # IDEFICS' tokenizer order: <fake_token_around_image>, <image>
VISION = dict(embed_dim=24, image_size=30, patch_size=6, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=37)
PERCEIVER = dict(resampler_depth=2, resampler_n_latents=5, resampler_n_heads=3, resampler_head_dim=7)
VARIANTS = {
    "qk_vector": dict(qk_layer_norms=True, alpha_type="vector", tie_word_embeddings=False, qk_perceiver=True),
    "plain_tied": dict(qk_layer_norms=False, alpha_type="float", tie_word_embeddings=True, qk_perceiver=False),
}
# row 0: text before its first image, 2 pads at the end; row 1: BOS, an eos (2) between the images
IDS = np.array([[5, 6, FAKE, IMG, FAKE, 7, 8, 9, FAKE, IMG, FAKE, 10, 11, 0, 0],
                [1, FAKE, IMG, FAKE, 12, EOS, 13, 14, FAKE, IMG, FAKE, 15, 16, 17, 18]], np.int64)
MASK = (np.arange(IDS.shape[1])[None] < np.array([[13], [15]])).astype(np.int64)


def _hf_config(qk_layer_norms, alpha_type, tie_word_embeddings, qk_perceiver):
    return transformers.IdeficsConfig(
        vocab_size=V, additional_vocab_size=X, hidden_size=36, intermediate_size=45, num_hidden_layers=4,
        num_attention_heads=3, cross_layer_interval=2, qk_layer_norms=qk_layer_norms, alpha_type=alpha_type,
        use_resampler=True, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=EOS, pad_token_id=0, bos_token_id=1, vision_config=VISION,
        perceiver_config=dict(PERCEIVER, qk_layer_norms_perceiver=qk_perceiver))


def _perturb_(model, seed=0):
    """Every weight random: matrices N(0, 1/fan_in), tables N(0, 0.25), norm scales ~1, the gates N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "embed" in name or "latents" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = _perturb_(transformers.IdeficsForVisionText2Text(_hf_config(**kw)), seed=i)
        d = str(tmp_path_factory.mktemp(f"idefics_{name}"))
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


def _pixels(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 2, 3, 30, 30)).astype(np.float32)     # [B, M, C, H, W]


def _processor_mask(ids, num_images):
    """HF's processor mapping (the oracle): image_attention_mask [B, T, M] from the token ids."""
    tok = types.SimpleNamespace(convert_tokens_to_ids=lambda t: IMG, eos_token_id=EOS)
    inc, _ = processing_idefics.image_attention_mask_for_packed_input_ids_pt(torch.tensor(ids), tok)
    return processing_idefics.incremental_to_binary_attention_mask(inc, "pt", num_classes=num_images).numpy()


def _hf_logits(hf, pixels, ids=IDS, mask=MASK):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                  image_attention_mask=torch.tensor(_processor_mask(ids, pixels.shape[1]))).logits.numpy()


def test_processor_mapping_as_text_time():
    """`idefics_text_time` + `idefics_image_attention_mask` == HF's processor functions, including
    eos chunks, an <image> right after an eos, more markers than images and a row without images."""
    rows = np.array([[5, IMG, 6, EOS, 7, 8, IMG, 9, EOS, EOS, IMG, 4],
                     [IMG, EOS, IMG, 3, 4, IMG, 5, 6, 7, 8, 9, 10],        # 3 markers, 2 images
                     [3, 4, 5, EOS, 6, 7, 8, 9, 10, 11, 12, 13],
                     [EOS, IMG, IMG, EOS, 3, IMG, 4, EOS, 5, 6, IMG, 7]], np.int64)
    tt = idefics_text_time(rows, IMG, EOS)
    np.testing.assert_array_equal(np.asarray(idefics_image_attention_mask(tt, 2)), _processor_mask(rows, 2))
    np.testing.assert_array_equal(np.asarray(jax.jit(idefics_text_time, static_argnums=(1, 2))(rows, IMG, EOS)), tt)
    np.testing.assert_array_equal(idefics_text_time(rows, IMG), media_text_time(rows == IMG))   # no eos rule


def test_config_mapping(hf_dirs):
    for name, kw in VARIANTS.items():
        hf = _hf_config(**kw).to_dict()
        cfg = idefics_config(hf)
        assert (cfg.vision_tokens, cfg.feature_layer, cfg.xattn_every, cfg.xattn_offset) == ("all", -1, 2, 0)
        assert (cfg.num_extra_tokens, cfg.image_id, cfg.eoc_id, cfg.total_vocab) == (X, IMG, EOS, V + X)
        assert cfg.tied_extra == kw["tie_word_embeddings"] and cfg.lm.tie_embeddings == kw["tie_word_embeddings"]
        assert cfg.xattn.qk_norm == kw["qk_layer_norms"] and cfg.resampler.qk_norm == kw["qk_perceiver"]
        assert cfg.xattn.gate == ("vector" if kw["alpha_type"] == "vector" else "scalar")
        assert (cfg.xattn.num_heads, cfg.xattn.head_dim, cfg.xattn.mlp_dim) == (3, 12, 45)
        assert (cfg.resampler.width, cfg.resampler.mlp_dim, cfg.resampler.activation) == (24, 96, "relu")
        assert (cfg.vision.activation, cfg.vision.mlp_dim, cfg.lm.position_embedding) == ("gelu", 37, "rotary")
    assert idefics_config(hf, image_token_id=FAKE, eoc_token_id=7).image_id == FAKE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(hf_dirs, variant):
    d, hf = hf_dirs[variant]
    scan = variant == "plain_tied"
    module, variables, hf_config = load_hf(d, scan_layers=scan)
    assert hf_config["architectures"] == ["IdeficsForVisionText2Text"]
    p = variables["params"]
    assert ("extra_lm_head" in p) == (variant == "qk_vector") and ("layers" in p["lm"]) == scan
    np.testing.assert_array_equal(p["resampler"]["time_embed"], 0.0)

    pixels = _pixels()
    ref = _hf_logits(hf, pixels)
    tt = idefics_text_time(IDS, IMG, EOS)
    fwd = jax.jit(lambda v, ids, im, am, tt: module.apply(v, ids, im, attention_mask=am, text_time=tt).logits)
    args = (jnp.asarray(IDS, jnp.int32), jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)), jnp.asarray(MASK, bool))
    got = np.asarray(fwd(variables, *args, tt))
    real = MASK.astype(bool)
    diff = float(np.abs(got - ref)[real].max())
    print(f"{variant}: max |ours - HF| logits = {diff:.2e} (|logits| <= {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape == (2, IDS.shape[1], V + X)
    np.testing.assert_allclose(got[real], ref[real], atol=ATOL, rtol=0)

    # the images matter from the first <image> on, and only there (row 0's text before it sees none)
    other = _hf_logits(hf, _pixels(seed=1))
    first = [int(np.flatnonzero(r == IMG)[0]) for r in IDS]
    for b in range(2):
        np.testing.assert_allclose(other[b, :first[b]], ref[b, :first[b]], atol=1e-6)
        changed = np.abs(other[b] - ref[b]).max(axis=-1)[first[b]:][real[b, first[b]:]]   # per position
        assert changed.min() > 1e-3, changed
    # the eos rule matters: our default mapping (no rule) differs exactly after row 1's eos until its next image
    plain = np.asarray(fwd(variables, *args, media_text_time(args[0] == IMG)))
    eos, nxt = 5, 9
    np.testing.assert_allclose(plain[1, :eos + 1], got[1, :eos + 1], atol=1e-5)
    assert np.abs(plain[1, eos + 1:nxt] - got[1, eos + 1:nxt]).max() > 1e-3
    np.testing.assert_allclose(plain[0], got[0], atol=1e-5)


def test_greedy_generation_matches_hf(hf_dirs):
    d, hf = hf_dirs["qk_vector"]
    module, variables, _ = load_hf(d)
    ids = IDS[:, :13].copy()
    ids[1, 5] = 3                                   # no eos in the prompts: HF repeats the last token's image row
    pixels, new = _pixels(), 5
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                          pixel_values=torch.tensor(pixels), image_attention_mask=torch.tensor(_processor_mask(ids, 2)),
                          max_new_tokens=new, do_sample=False).numpy()[:, ids.shape[1]:]

    @jax.jit
    def run(params, prompt, images):
        latents = module.apply({"params": params}, images, method="encode_images")
        return generate.generate(module, params, prompt, max_new_tokens=new, eos_id=EOS, pad_id=0,
                                 row_inputs={"latents": latents, "media_valid": jnp.ones((2, 2), bool)}).tokens[:, 0]

    images = jnp.asarray(pixels.transpose(0, 1, 3, 4, 2))
    got = np.asarray(run(variables["params"], jnp.asarray(ids, jnp.int32), images))
    print("greedy tokens ours", got.tolist(), "HF", ref.tolist())
    assert not np.any(ref == IMG), "an <image> was generated: the two decode mappings would differ (docstring)"
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("edit,message", [
    ("drop", r"missing key 'model\.gated_cross_attn_layers\.1\.cross_attn\.q_layer_norm\.weight'"),
    ("reshape", r"shape mismatch for key 'model\.perceiver_resampler\.blocks\.1\.0\.k_proj\.weight'"),
    ("extra", r"unexpected key 'model\.gated_cross_attn_layers\.2\.alpha_dense'"),
    ("float_gate", r"shape mismatch converting 'model\.gated_cross_attn_layers\.0\.alpha_cross_attn'"),
])
def test_wrong_checkpoint_names_the_key(hf_dirs, edit, message):
    d, _ = hf_dirs["qk_vector"]
    hf_config, tensors = common.read_hf_dir(d)
    tensors, hf_config = dict(tensors), dict(hf_config)
    if edit == "drop":
        del tensors["model.gated_cross_attn_layers.1.cross_attn.q_layer_norm.weight"]
    elif edit == "reshape":
        tensors["model.perceiver_resampler.blocks.1.0.k_proj.weight"] = np.zeros((21, 25), np.float32)
    elif edit == "extra":
        tensors["model.gated_cross_attn_layers.2.alpha_dense"] = np.zeros((1, 1, 36), np.float32)
    else:                                   # the config says float gates, the file holds vectors
        hf_config["alpha_type"] = "float"
    conv = conversion_for(hf_config, tensors.keys())
    with pytest.raises(ConversionError, match=message):
        common.convert(conv, tensors)


def test_truncated_file_names_the_tensor(hf_dirs, tmp_path):
    d, _ = hf_dirs["qk_vector"]
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(d, f), tmp_path / f)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ConversionError, match=r"not a complete safetensors file: tensor '[\w.]+' needs bytes"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize("change,message", [
    (dict(use_resampler=False), "use_resampler=False"),
    (dict(cross_layer_interval=3), "cross_layer_interval=3"),
    (dict(alpha_type="matrix"), "alpha_type='matrix'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(additional_vocab_size=0), "image_token_id"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type='linear'"),
])
def test_unsupported_config(change, message):
    hf = {**_hf_config(**VARIANTS["qk_vector"]).to_dict(), **change}
    with pytest.raises(ConversionError, match=message):
        idefics_config(hf)
    if change == dict(additional_vocab_size=0):       # fine once the <image> id is given
        cfg = idefics_config(hf, image_token_id=7)
        assert cfg.num_extra_tokens == 0 and cfg.image_id == 7
    with pytest.raises(ConversionError, match="no_such_field"):
        idefics_config(_hf_config(**VARIANTS["qk_vector"]).to_dict(), no_such_field=1)
