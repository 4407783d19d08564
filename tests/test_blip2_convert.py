"""Import of HF ``Blip2ForImageTextRetrieval`` checkpoints (`vlm_jax.convert.blip2`).

Oracle: tiny random HF models built from configs in the test (dimensions unlike the defaults:
vision 24 wide / 3 heads / 3 layers, 30 px with 6 px patches -> an odd 5x5 grid; Q-Former 36
wide / 3 heads, FFN 44, 5 queries, cross-attention every 2nd layer, ITC width 12, vocabulary
60, 20 positions), every weight randomised (HF zero-inits some), `save_pretrained` to a tmp
dir and loaded back through `vlm_jax.convert.load_hf`. Compared in f32: vision features, the
image-only Q-Former outputs, ITM logits (a padded text row included) and ITC similarities, for
the unrolled import (3 Q-Former layers: the last one has no cross-attention partner) and the
``scan_layers=True`` one (4 Q-Former layers: a scanned stack needs a periodic layout).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vlm_jax.convert import ConversionError, common, conversion_for, load_hf  # noqa: E402
from vlm_jax.models.blip2 import itc_similarity  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
ATOL = 1e-4
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3, image_size=30,
              patch_size=6)
QFORMER = dict(hidden_size=36, num_attention_heads=3, intermediate_size=44, cross_attention_frequency=2,
               vocab_size=60, max_position_embeddings=20, encoder_hidden_size=24, use_qformer_text_input=True)
# text rows: [CLS]-like first token, row 1 padded (pad id 0) after 4 tokens
IDS = np.array([[1, 17, 33, 5, 48, 9, 22],
                [1, 41, 8, 56, 0, 0, 0],
                [1, 3, 29, 14, 37, 51, 11]], np.int64)
MASK = (IDS != 0).astype(np.int64)


def _perturb_(model, std=0.2):
    """Random weights large enough that every parameter matters (HF zero-inits e.g. query_tokens)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "embedding" in name or "token" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):                 # LayerNorm scales around 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_model(qformer_layers: int):
    T = transformers
    cfg = T.Blip2Config(vision_config=T.Blip2VisionConfig(**VISION).to_dict(),
                        qformer_config=T.Blip2QFormerConfig(num_hidden_layers=qformer_layers, **QFORMER).to_dict(),
                        num_query_tokens=5, image_text_hidden_size=12)
    assert cfg.image_token_index is None           # input_ids are plain text
    return _perturb_(T.Blip2ForImageTextRetrieval(cfg))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for layers in (3, 4):
        model = _hf_model(layers)
        d = str(tmp_path_factory.mktemp(f"blip2_itr_{layers}"))
        model.save_pretrained(d)
        out[layers] = (d, model)
    return out


def _hf_outputs(hf, pixels):
    """(vision features, Q-Former query outputs, ITM logits [3, 2], ITC logits_per_image [2, 3])."""
    px, ids, am = torch.from_numpy(pixels), torch.from_numpy(IDS), torch.from_numpy(MASK)
    with torch.no_grad():
        feats = hf.vision_model(pixel_values=px).last_hidden_state
        q = hf.query_tokens.expand(px.shape[0], -1, -1)
        query_out = hf.qformer(query_embeds=q, encoder_hidden_states=feats,
                               encoder_attention_mask=torch.ones(feats.shape[:-1], dtype=torch.long)).last_hidden_state
        itm = hf(pixel_values=px, input_ids=ids, attention_mask=am, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=px[:2], input_ids=ids, attention_mask=am,
                 use_image_text_matching_head=False).logits_per_image
    return feats.numpy(), query_out.numpy(), itm.numpy(), itc.numpy()


def _ours(module, variables, images):
    def f(m):
        feats = m.image_features(images)
        z_img, query_out = m.image_embeds(feats)
        z_txt = m.text_embeds(jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK, bool))
        itm = m.itm_logits(feats, jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK, bool))
        return feats, query_out, itm, itc_similarity(z_img[:2], z_txt)
    return [np.asarray(x) for x in jax.jit(lambda v: module.apply(v, method=f))(variables)]


@pytest.mark.parametrize("layers,scan", [(3, False), (4, True)])
def test_retrieval_matches_hf(hf_dirs, layers, scan):
    d, hf = hf_dirs[layers]
    module, variables, cfg = load_hf(d, scan_layers=scan)
    assert cfg["architectures"][0] == "Blip2ForImageTextRetrieval"
    p = variables["params"]
    assert ("layers" in p["qformer"]) == scan and ("layers" in p["vision"]["encoder"]) == scan
    assert float(p["temp"]) == pytest.approx(0.07)                 # not in the file: init_temperature
    np.testing.assert_array_equal(p["ln_vision"]["scale"], p["vision"]["final_norm"]["scale"])

    pixels = np.random.default_rng(layers).normal(size=(3, 3, 30, 30)).astype(np.float32)   # NCHW
    ref = _hf_outputs(hf, pixels)
    got = _ours(module, variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)))               # NHWC
    diffs = {}
    for name, g, r in zip(("vision features", "query outputs", "ITM logits", "ITC similarities"), got, ref):
        assert g.shape == r.shape, name
        diffs[name] = float(np.max(np.abs(g - r)))
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=0, err_msg=name)
    print(f"max |ours - HF| ({layers} Q-Former layers, scan={scan}):", diffs)
    # the padded row really is padded: its ITM logits change if the padding is attended to
    assert not np.allclose(ref[2][1], _hf_itm_without_padding_mask(hf, pixels)[1], atol=1e-3)


def _hf_itm_without_padding_mask(hf, pixels):
    with torch.no_grad():
        return hf(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(IDS),
                  attention_mask=torch.ones_like(torch.from_numpy(MASK)),
                  use_image_text_matching_head=True).logits_per_image.numpy()


def test_overrides(hf_dirs):
    d, _ = hf_dirs[3]
    hf_config, tensors = common.read_hf_dir(d)
    conv = conversion_for(hf_config, tensors.keys(), init_temperature=0.1)
    assert float(common.convert(conv, tensors)["params"]["temp"]) == pytest.approx(0.1)
    with pytest.raises(ConversionError, match="scan_layers"):     # 3 layers, cross-attention every 2nd
        conversion_for(hf_config, tensors.keys(), scan_layers=True)
    with pytest.raises(ConversionError, match="lm_head"):
        conversion_for(hf_config, tensors.keys(), lm_head=True)
    with pytest.raises(ConversionError, match="no_such_field"):
        conversion_for(hf_config, tensors.keys(), no_such_field=1)


@pytest.mark.parametrize("edit,message", [
    ("drop", r"missing key 'qformer\.encoder\.layer\.2\.crossattention\.attention\.key\.weight'"),
    ("reshape", r"shape mismatch for key 'text_projection\.weight'"),
    ("extra", r"unexpected key 'qformer\.encoder\.layer\.1\.crossattention\.attention\.key\.weight'"),
])
def test_wrong_checkpoint_names_the_key(hf_dirs, edit, message):
    d, _ = hf_dirs[3]
    hf_config, tensors = common.read_hf_dir(d)
    tensors = dict(tensors)
    if edit == "drop":
        del tensors["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    elif edit == "reshape":
        tensors["text_projection.weight"] = np.zeros((12, 35), np.float32)
    else:
        tensors["qformer.encoder.layer.1.crossattention.attention.key.weight"] = np.zeros((36, 24), np.float32)
    conv = conversion_for(hf_config, tensors.keys())
    with pytest.raises(ConversionError, match=message):
        common.convert(conv, tensors)
