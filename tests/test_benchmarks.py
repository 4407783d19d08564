"""benchmarks/towers_throughput.py: FLOP formulas against hand counts and against the
jaxpr's own dot/conv count, the causal-kernel experiment's equivalence, and the --tiny
smoke mode (CLI and in-process, with the PyTorch side)."""
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "towers_throughput.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("towers_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tt = _load_script()


def _abstract_params(model, *args):
    """Parameter shapes only (``jax.eval_shape``): the jaxpr FLOP count needs no values."""
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]


def _lm_loss(model):
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return loss


def test_vit_flops_hand_count_and_jaxpr():
    from vlm_jax.layers.vit import VisionTransformer
    cfg = tt.vit_config("vit_tiny")      # 32 px, patch 8, C 3, D 32, 2 layers, F 64, CLIP style
    # Hand count, per image: P = 16 patches, N = 17 tokens.
    patch = 2 * 16 * (8 * 8 * 3) * 32                         # 196_608
    dense = 2 * 17 * (4 * 32 * 32 + 2 * 32 * 64)              # 278_528 per layer
    attn = 4 * 17 * 17 * 32                                   # 36_992 per layer
    assert patch + 2 * (dense + attn) == 827_648
    f = tt.vit_flops(cfg, batch=3)
    assert f["forward_per_example"] == 827_648
    assert f["forward"] == 3 * 827_648 and f["step"] == 9 * 827_648
    assert f["tokens_per_example"] == 17

    model = VisionTransformer(cfg)
    x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    params = _abstract_params(model, x)
    loss = lambda p, x: model.apply({"params": p}, x).features.mean()  # noqa: E731
    assert tt.count_dot_flops(loss, params, x) == f["forward"]
    # backward = 2x forward, except the patch embedding's input gradient (never computed)
    assert tt.count_dot_flops(jax.grad(loss), params, x) == f["step"] - 3 * patch

    # the dense+tanh pooler adds 2*D*D per image
    pooled = tt.vit_config("vit_tiny", pool="dense_tanh")
    assert tt.vit_flops(pooled, 1)["forward"] == 827_648 + 2 * 32 * 32


def test_lm_flops_hand_count_and_jaxpr():
    from vlm_jax.layers.decoder_lm import DecoderLM
    cfg = tt.lm_config("lm_tiny")      # V 256, D 32, 2 layers, F 128, tied head
    t = 16
    dense = 2 * t * (4 * 32 * 32 + 2 * 32 * 128)              # 393_216 per layer
    head = 2 * t * 32 * 256                                   # 262_144
    causal = 4 * 32 * (t * (t + 1) // 2)                      # 17_408 per layer
    full = 4 * 32 * t * t                                     # 32_768 per layer
    assert tt.lm_flops(cfg, 1, t)["forward"] == 2 * (dense + causal) + head == 1_083_392
    f = tt.lm_flops(cfg, 3, t, attention_flops="full")
    assert f["forward_per_example"] == 2 * (dense + full) + head == 1_114_112
    assert f["step"] == 9 * 1_114_112 and f["tokens_per_example"] == t

    model = DecoderLM(cfg)
    tokens = jax.ShapeDtypeStruct((3, t), jnp.int32)
    params = _abstract_params(model, tokens)
    loss = _lm_loss(model)
    # the XLA kernel computes all T^2 pairs: the jaxpr matches the 'full' count exactly
    assert tt.count_dot_flops(loss, params, tokens) == f["forward"]
    assert tt.count_dot_flops(jax.grad(loss), params, tokens) == f["step"]

    # OPT-350m shape: E != D adds project_in / project_out
    opt = tt.lm_config("opt-350m", vocab_size=64, width=32, num_layers=2, num_heads=2, mlp_dim=64,
                       embed_dim=16, max_positions=32)
    fo = tt.lm_flops(opt, 3, t, attention_flops="full")
    per_layer = 2 * t * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 32 * t * t
    assert fo["forward_per_example"] == 2 * per_layer + 2 * (2 * t * 16 * 32) + 2 * t * 16 * 64 == 655_360
    m = DecoderLM(opt)
    p = _abstract_params(m, tokens)
    assert tt.count_dot_flops(_lm_loss(m), p, tokens) == fo["forward"]

    with pytest.raises(ValueError, match="attention_flops"):
        tt.lm_flops(cfg, 1, t, attention_flops="half")


def test_lm_tower_is_causal_without_a_mask_array():
    """DecoderLM hands causality to the attention kernel (is_causal) instead of a mask array:
    logits at position t must not change when later tokens change."""
    from vlm_jax.layers.decoder_lm import DecoderLM
    cfg = tt.lm_config("lm_tiny", num_layers=1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32)
    later = tokens.at[:, 6:].set(jnp.asarray(rng.integers(0, 256, (2, 6)), jnp.int32))
    model = DecoderLM(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, tokens))["params"])(jax.random.key(0))
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)
    a, b = fwd(params, tokens), fwd(params, later)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 6:] - b[:, 6:]))) > 1e-3


def _check_result(out, tower, preset, batch):
    assert "error" not in out, out.get("error")
    assert (out["tower"], out["preset"], out["batch"]) == (tower, preset, batch)
    assert out["step_ms"] > 0 and out["step_ms_min"] <= out["step_ms"] <= out["step_ms_max"]
    np.testing.assert_allclose(out["examples_per_s"], batch / (out["step_ms"] / 1e3), rtol=1e-3)
    np.testing.assert_allclose(out["tokens_per_s"], batch * out["seq"] / (out["step_ms"] / 1e3), rtol=1e-3)
    assert out["mfu"] is None and out["peak_tflops"] is None        # CPU: no MFU
    assert np.isfinite(out["loss"])


def test_tiny_cli_prints_json():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, SCRIPT, "--tower", "lm", "--tiny", "--threads", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    _check_result(out, "lm", "lm_tiny", 2)
    assert out["threads"] == 1 and out["seq"] == 16
    assert out["model_flops_per_step"] == 3 * 2 * tt.lm_flops(tt.lm_config("lm_tiny"), 1, 16)["forward"]
    assert "torch" not in out


@pytest.mark.parametrize("tower,preset", [("vit", "vit_tiny"), ("lm", "lm_tiny")])
def test_tiny_compare_torch_in_process(tower, preset, capsys):
    pytest.importorskip("transformers")
    out = tt.main(["--tower", tower, "--tiny", "--compare-torch"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == out
    _check_result(out, tower, preset, 2)
    t = out["torch"]
    assert t["params"] == out["params"]          # same architecture in both frameworks
    assert "warning" not in out
    np.testing.assert_allclose(out["ratio"], t["step_ms"] / out["step_ms"], rtol=2e-3)
    if tower == "lm":   # random init, uniform-ish predictions: both losses near log V
        np.testing.assert_allclose([out["loss"], t["loss"]], np.log(256), atol=0.1)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        tt.parse_args(["--tower", "vit", "--attention", "cudnn"])          # cudnn needs bf16
    with pytest.raises(SystemExit):
        tt.parse_args(["--tower", "vit", "--preset", "gpt2"])
    out = tt.main(["--tower", "vit", "--tiny", "--dtype", "bfloat16", "--attention", "cudnn"])
    assert "needs an NVIDIA GPU" in out["error"]
