"""Vision towers (ViT / CLIP / EVA-BLIP-2 / ResNet) and their HF import.

Oracles: tiny random HF models (CLIPVisionModel, ViTModel, Blip2VisionModel, ResNetModel)
built from configs and `save_pretrained` to tmp dirs; paper-size parameter counts from HF
models instantiated on the torch 'meta' device. The sharded import needs 8 CPU devices:
in-process when the session has them (tests/conftest.py forces 8), else in a subprocess.
"""
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import FAST_COMPILE  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from vlm_jax.convert import ConversionError, load_hf  # noqa: E402
from vlm_jax.convert.common import read_safetensors  # noqa: E402
from vlm_jax.layers.resnet import ResNet  # noqa: E402
from vlm_jax.layers.vit import VisionTransformer, clip_vit_l14, eva_vit_g14  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
ATOL = 1e-4
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)


def _perturb_(model, std=0.2):
    """Random weights large enough that every parameter matters (HF inits some to ~0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "embedding" in name or "token" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):                 # norm scales around 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def _build(kind):
    T = transformers
    if kind == "clip":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**TINY_VIT))
    if kind == "vit":
        return T.ViTModel(T.ViTConfig(**TINY_VIT))
    if kind == "vit_nopool":
        return T.ViTModel(T.ViTConfig(**TINY_VIT), add_pooling_layer=False)
    if kind == "blip2":
        return T.Blip2VisionModel(T.Blip2VisionConfig(**TINY_VIT))
    if kind == "resnet":
        return T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2],
                                            layer_type="bottleneck"))
    if kind == "resnet_basic":
        return T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1],
                                            layer_type="basic"))
    raise KeyError(kind)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for kind in ("clip", "vit", "vit_nopool", "blip2", "resnet", "resnet_basic"):
        model = _perturb_(_build(kind))
        d = str(tmp_path_factory.mktemp(kind))
        model.save_pretrained(d)
        out[kind] = (d, model)
    return out


def _images(seed, size=32, batch=3):
    x = np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)
    return x, jnp.asarray(x.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------- ViT parity
@pytest.mark.parametrize("kind", ["clip", "vit", "vit_nopool", "blip2"])
def test_vit_family_matches_hf(hf_dirs, kind):
    d, hf = hf_dirs[kind]
    module, variables, cfg = load_hf(d)
    assert cfg["architectures"][0] == type(hf).__name__
    assert ("pooler" in variables["params"]) == (kind == "vit")
    run = jax.jit(lambda v, x: module.apply(v, x, output_hidden_states=True))
    for seed in (0, 1):
        x_t, x_j = _images(seed)
        with torch.no_grad():
            ref = hf(pixel_values=torch.from_numpy(x_t), output_hidden_states=True)
        out = run(variables, x_j)
        np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out.features), ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for a, b in zip(out.hidden_states, ref.hidden_states):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=ATOL, rtol=0)
        if kind == "vit_nopool":
            assert out.pooled is None
        else:
            np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=ATOL, rtol=0)
    # penultimate layer (what BLIP-2 / Flamingo take), raw
    pen = module.apply(variables, x_j, output_layer=-2)
    np.testing.assert_allclose(np.asarray(pen.features), ref.hidden_states[-2].numpy(), atol=ATOL, rtol=0)
    assert pen.last_hidden_state is None and pen.pooled is None


def test_scanned_import_matches_unrolled(hf_dirs):
    d, hf = hf_dirs["blip2"]
    module, variables, _ = load_hf(d, scan_layers=True)
    assert variables["params"]["encoder"]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
    x_t, x_j = _images(2)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x_t), output_hidden_states=True)
    out = jax.jit(lambda v, x: module.apply(v, x, output_layer=-2))(variables, x_j)
    np.testing.assert_allclose(np.asarray(out.features), ref.hidden_states[-2].numpy(), atol=ATOL, rtol=0)
    last = jax.jit(module.apply)(variables, x_j)
    np.testing.assert_allclose(np.asarray(last.features), ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)


def test_scanned_remat_vit_gradients_equal_unrolled(hf_dirs):
    """CLIP tower: scan_layers + remat_policy give the unrolled outputs and gradients (f32, 1e-5)."""
    from vlm_jax.convert.common import stack_params
    d, _ = hf_dirs["clip"]
    module_u, vars_u, _ = load_hf(d)
    module_s, vars_s, _ = load_hf(d, scan_layers=True, remat_policy="save_qkv_attention_out")
    _, x = _images(4)

    def grads(module, variables):
        def loss(p):
            out = module.apply({"params": p}, x)
            return (out.features ** 2).mean() + (out.pooled ** 2).mean(), out.features
        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    g_u, f_u = grads(module_u, vars_u)
    g_s, f_s = grads(module_s, vars_s)
    np.testing.assert_allclose(np.asarray(f_s), np.asarray(f_u), atol=1e-5, rtol=0)
    g_u = stack_params(g_u, module_u.config.num_layers, container=("encoder",))
    assert jax.tree.structure(g_u) == jax.tree.structure(g_s)
    for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"ViTConfig.remat_policy='dot'"):
        load_hf(d, remat_policy="dot")


def test_vit_rejects_wrong_image_size(hf_dirs):
    module, variables, _ = load_hf(hf_dirs["clip"][0])
    with pytest.raises(ValueError, match="image_size"):
        module.apply(variables, jnp.zeros((1, 48, 48, 3)))


def test_sincos2d_position_code_by_hand():
    """posemb='sincos2d': no pos_embed parameter; the code of patch (row r, column c) is
    [sin(c w), cos(c w), sin(r w), cos(r w)] at w_i = 10000^(-i/(D/4)) (checked entry by entry on a
    3 x 3 grid, D = 12), [CLS] gets zeros; every patch of a blank image then comes out different
    while with a zero learned table all patches are equal; widths not divisible by 4 are refused."""
    from vlm_jax.layers.vit import ViTConfig, sincos2d_posemb
    table = np.asarray(sincos2d_posemb(3, 12))
    assert table.shape == (9, 12)
    w = 10_000.0 ** (-np.arange(3) / 3)
    for r in range(3):
        for c in range(3):
            want = np.concatenate([np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)])
            np.testing.assert_allclose(table[3 * r + c], want, atol=1e-6)
    cfg = dict(image_size=12, patch_size=4, hidden_size=12, num_layers=1, num_heads=3, mlp_dim=20, pool="none")
    fixed = VisionTransformer(ViTConfig(**cfg, posemb="sincos2d"))
    blank = jnp.full((1, 12, 12, 3), 0.3)
    variables = nn.unbox(fixed.init(jax.random.key(0), blank))
    assert "pos_embed" not in variables["params"]
    tokens = np.asarray(fixed.apply(variables, blank).features[0, 1:])         # [9, D]
    assert min(np.abs(tokens[i] - tokens[j]).max() for i in range(9) for j in range(i)) > 1e-3
    learned = VisionTransformer(ViTConfig(**cfg))
    lv = nn.unbox(learned.init(jax.random.key(0), blank))
    lv = {"params": {**lv["params"], "pos_embed": jnp.zeros_like(lv["params"]["pos_embed"])}}
    flat = np.asarray(learned.apply(lv, blank).features[0, 1:])
    np.testing.assert_allclose(flat, np.broadcast_to(flat[:1], flat.shape), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(**{**cfg, "hidden_size": 18, "num_heads": 3}, posemb="sincos2d")
    with pytest.raises(ValueError, match="posemb='rope'"):
        ViTConfig(**cfg, posemb="rope")


# --------------------------------------------------------------------- ResNet parity
@pytest.mark.parametrize("kind", ["resnet", "resnet_basic"])
def test_resnet_matches_hf(hf_dirs, kind):
    d, hf = hf_dirs[kind]
    module, variables, _ = load_hf(d, grid=3)
    assert set(variables) == {"params", "batch_stats"}
    x_t, x_j = _images(3, size=64, batch=2)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x_t)).last_hidden_state
    fmap = jax.jit(lambda v, x: module.apply(v, x, method="feature_map"))(variables, x_j)
    np.testing.assert_allclose(np.asarray(fmap), ref.numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=0)
    grid = jax.jit(module.apply)(variables, x_j)            # 4x4 or 8x8 map -> 3x3, uneven bins
    ref_grid = torch.nn.functional.adaptive_avg_pool2d(ref, 3).numpy().transpose(0, 2, 3, 1)
    assert grid.shape == ref_grid.shape
    np.testing.assert_allclose(np.asarray(grid), ref_grid, atol=ATOL, rtol=0)
    if kind == "resnet":
        bil = module.clone(resize="bilinear", grid=5).apply(variables, x_j)
        ref_bil = torch.nn.functional.interpolate(ref, size=(5, 5), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(np.asarray(bil), ref_bil.numpy().transpose(0, 2, 3, 1), atol=ATOL, rtol=0)
        # train=True normalises with batch statistics and updates the running ones
        out, new = module.apply(variables, x_j, train=True, mutable=["batch_stats"])
        old_mean = variables["batch_stats"]["stem_bn"]["mean"]
        assert np.abs(np.asarray(new["batch_stats"]["stem_bn"]["mean"]) - np.asarray(old_mean)).max() > 1e-4
        assert np.abs(np.asarray(out) - np.asarray(grid)).max() > 1e-3


# ----------------------------------------------------------- paper-size param counts
def _count_ours(module, image_size):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    out, variables = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x), images)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nn.unbox(variables["params"])))
    return n, out


def _count_hf_meta(model_cls, config):
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def test_paper_size_parameter_counts():
    T = transformers
    # CLIP ViT-L/14
    ref = _count_hf_meta(T.CLIPVisionModel, T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                                 num_hidden_layers=24, num_attention_heads=16,
                                                                 patch_size=14, image_size=224))
    ours, out = _count_ours(VisionTransformer(clip_vit_l14(scan_layers=True)), 224)
    assert abs(ours - ref) / ref < 0.01, (ours, ref)
    assert out.features.shape == (1, 257, 1024)
    # EVA ViT-g/14 as in BLIP-2 (39 blocks)
    ref = _count_hf_meta(T.Blip2VisionModel, T.Blip2VisionConfig(hidden_size=1408, num_hidden_layers=39,
                                                                   num_attention_heads=16, intermediate_size=6144,
                                                                   patch_size=14, image_size=224))
    ours, out = _count_ours(VisionTransformer(eva_vit_g14(scan_layers=True)), 224)
    assert abs(ours - ref) / ref < 0.01, (ours, ref)
    assert out.features.shape == (1, 257, 1408)
    # ResNet-101
    ref = _count_hf_meta(T.ResNetModel, T.ResNetConfig(depths=[3, 4, 23, 3]))
    ours, out = _count_ours(ResNet(depth=101, grid=14), 224)
    assert abs(ours - ref) / ref < 0.01, (ours, ref)
    assert out.shape == (1, 14, 14, 2048)


# ------------------------------------------------------------------- converter errors
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(d, fn):
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in load_file(path).items()}
    fn(tensors)
    save_file(tensors, path)


def _edit_config(d, fn):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_converter_errors_name_the_key(hf_dirs, tmp_path):
    src = hf_dirs["clip"][0]
    d = _copy(src, tmp_path / "missing")
    _edit_tensors(d, lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ConversionError, match=r"missing key 'encoder\.layers\.1\.mlp\.fc2\.bias'"):
        load_hf(d)
    d = _copy(src, tmp_path / "unexpected")
    _edit_tensors(d, lambda t: t.__setitem__("encoder.layers.0.extra_head.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(ConversionError, match=r"unexpected key 'encoder\.layers\.0\.extra_head\.weight'"):
        load_hf(d)
    d = _copy(src, tmp_path / "shape")
    _edit_config(d, lambda c: c.__setitem__("intermediate_size", 48))
    with pytest.raises(ConversionError, match=r"shape mismatch for key 'encoder\.layers\.0\.mlp\.fc1\.(weight|bias)'"):
        load_hf(d)
    d = _copy(src, tmp_path / "arch")
    _edit_config(d, lambda c: c.__setitem__("architectures", ["FooBarVisionModel"]))
    with pytest.raises(ConversionError, match="unknown architecture 'FooBarVisionModel'.*CLIPVisionModel"):
        load_hf(d)
    with pytest.raises(ConversionError, match="config.json"):
        load_hf(str(tmp_path))


def test_truncated_or_garbage_weight_file_names_the_file(hf_dirs, tmp_path):
    src = hf_dirs["clip"][0]
    d = _copy(src, tmp_path / "truncated")
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    with open(f, "wb") as out:
        out.write(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors is not a complete safetensors file: tensor '.*' "
                                              r"needs bytes"):
        load_hf(d)
    with open(f, "wb") as out:
        out.write(b"garbage!")
    with pytest.raises(ConversionError, match=r"not a complete safetensors file: its header claims"):
        load_hf(d)
    with open(f, "wb") as out:
        out.write(b"abc")
    with pytest.raises(ConversionError, match=r"not a complete safetensors file \(3 bytes\)"):
        load_hf(d)


def test_sharded_index_and_bf16_checkpoints(hf_dirs, tmp_path):
    d, hf = hf_dirs["vit"]
    _, ref_vars, _ = load_hf(d)
    sharded = str(tmp_path / "sharded")
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    _, vars_sharded, _ = load_hf(sharded)
    for a, b in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(vars_sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf16 = str(tmp_path / "bf16")
    _build("vit").to(torch.bfloat16).save_pretrained(bf16)
    _, vb, _ = load_hf(bf16)
    k = vb["params"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert k.dtype == jnp.float32
    raw = read_safetensors(os.path.join(bf16, "model.safetensors"))
    assert raw["encoder.layer.0.intermediate.dense.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(k), raw["encoder.layer.0.intermediate.dense.weight"].astype(np.float32).T)


# -------------------------------------------------------------------- sharded import
def check_sharded_import(path: str):
    """Load onto a (data=1, fsdp=2, tensor=4) mesh; check placement and outputs."""
    from jax.sharding import Mesh, PartitionSpec as P
    assert jax.device_count() >= 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    module, sharded, _ = load_hf(path, mesh=mesh)
    _, plain, _ = load_hf(path)
    q = sharded["params"]["encoder"]["layers_0"]["attn"]["query"]["kernel"]        # [D, H, K]
    assert q.sharding.spec == P("fsdp", "tensor", None), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 1, 8)
    wi = sharded["params"]["encoder"]["layers_1"]["mlp"]["wi"]["kernel"]           # [D, F]
    assert wi.sharding.spec == P("fsdp", "tensor"), wi.sharding.spec
    assert sharded["params"]["final_norm"]["scale"].sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32))
    out_s = jax.jit(lambda v: module.apply(v, x).features)(sharded)
    out_p = jax.jit(lambda v: module.apply(v, x).features)(plain)
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_p), atol=ATOL, rtol=0)


def test_sharded_import_on_8_device_mesh(hf_dirs):
    path = hf_dirs["clip"][0]
    if jax.device_count() >= 8:
        check_sharded_import(path)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    code = f"import test_vision_towers as t; t.check_sharded_import({path!r}); print('SHARDED-OK')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "SHARDED-OK" in res.stdout, res.stderr[-3000:]
