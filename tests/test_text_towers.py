"""Text towers (GPT-2, OPT, LLaMA, BERT, T5): HF import, numerical parity, KV cache, generation.

Oracles are tiny random transformers models built from configs and saved with
`save_pretrained` into a temporary directory (nothing is downloaded). Parity is float32
within 1e-4. Decoder-only outputs are compared at real (non-pad) positions: HF's values at
left-pad positions are undefined (their query rows see no key).
"""
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

from safetensors.torch import load_file, save_file  # noqa: E402

from vlm_jax import generate as gen  # noqa: E402
from vlm_jax.convert import common  # noqa: E402
from vlm_jax.convert import CONVERTERS, load_hf  # noqa: E402
from vlm_jax.layers import attention as attention_lib  # noqa: E402
from vlm_jax.layers.mlp import Dense  # noqa: E402
from vlm_jax.layers.bert import BertConfig, BertEncoder  # noqa: E402
from vlm_jax.layers.decoder_lm import DecoderLM, DecoderLMConfig  # noqa: E402
from vlm_jax.layers.t5 import T5, T5Config, relative_position_bucket  # noqa: E402
from vlm_jax.layers.transformer import InsertSpec  # noqa: E402

ATOL = 1e-4
PAD, EOS = 1, 2
B, T = 3, 7


def _np(x):
    return np.asarray(x)


def _save(model, path, extra_tensors=None):
    model.save_pretrained(path)
    if extra_tensors:
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        tensors.update(extra_tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return str(path)


def _inputs(seed, vocab=64, left_pad=True):
    """Random tokens [B, T] and a padding mask with rows padded differently (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left_pad:
        mask[1, :2] = 0
        mask[2, :4] = 0
    else:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    return ids * mask + PAD * (1 - mask), mask


# ------------------------------------------------------------------------- HF oracles
def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(cfg)


def _opt(**kw):
    cfg = transformers.OPTConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           ffn_dim=48, max_position_embeddings=32, word_embed_proj_dim=32,
                                           pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, init_std=0.2),
                                    **kw})
    return transformers.OPTForCausalLM(cfg)


def _llama(**kw):
    """Tiny LLaMA with odd sizes; every weight random (the RMSNorm scales too, which HF inits to 1).
    Default: grouped-query attention (6 heads over 2 kv heads), head_dim 6 != width / heads."""
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=90, hidden_size=30, intermediate_size=44, num_hidden_layers=3,
                                             num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                                             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                                             initializer_range=0.2, pad_token_id=PAD, bos_token_id=EOS,
                                             eos_token_id=EOS), **kw})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def _t5(**kw):
    cfg = transformers.T5Config(**{**dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                          feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=PAD,
                                          relative_attention_num_buckets=8, relative_attention_max_distance=16),
                                   **kw})
    return transformers.T5ForConditionalGeneration(cfg)


PATHS: dict[str, str] = {}          # name -> the saved HF directory (filled by hf_models)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (HF model reloaded from disk, our module, our variables)."""
    torch.manual_seed(0)
    built = {
        "gpt2": (_gpt2(), None),
        "opt": (_opt(), None),
        # OPT-350m layout: post-LN, no final norm, project_in/out (E=16 != D=32)
        "opt_post_ln": (_opt(do_layer_norm_before=False, word_embed_proj_dim=16), None),
        # LLaMA: rotary, RMSNorm, SwiGLU, GQA 6 heads / 2 kv heads, head_dim 6, untied head
        "llama": (_llama(), None),
        # multi-query (5 heads of 6 over 1 kv head), tied head (no lm_head.weight in the file), 2 layers
        "llama_mqa_tied": (_llama(num_attention_heads=5, num_key_value_heads=1, head_dim=None,
                                  num_hidden_layers=2, tie_word_embeddings=True), None),
        "bert": (transformers.BertModel(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32)), None),
        # Flan-T5 layout: gated-GELU, untied lm_head (a distinct lm_head.weight in the file), no scaling
        "t5": (_t5(), {"lm_head.weight": torch.randn(64, 32)}),
        # HF 5.x re-ties T5 v1.1 configs; the file then has no lm_head (tied, unscaled); decoder deeper
        "t5_tied": (_t5(num_decoder_layers=3), None),
        # T5 v1.0 layout: ReLU, tied and rescaled head
        "t5_v1_0": (_t5(feed_forward_proj="relu", tie_word_embeddings=True), None),
    }
    out = {}
    for name, (model, extra) in built.items():
        path = _save(model, tmp_path_factory.mktemp(name), extra)
        PATHS[name] = path
        ref = type(model).from_pretrained(path).eval()
        module, variables, _ = load_hf(path)
        out[name] = (ref, module, variables)
    return out


# -------------------------------------------------------------------- relative buckets
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 20)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-300, 301)
    ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                num_buckets=num_buckets, max_distance=max_distance).numpy()
    ours = _np(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                                        max_distance=max_distance))
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() == 0 and ours.max() == num_buckets - 1


# --------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("name", ["gpt2", "opt", "opt_post_ln", "llama", "llama_mqa_tied"])
def test_decoder_lm_forward_matches_hf(hf_models, name):
    ref_model, module, variables = hf_models[name]
    for seed in (1, 2):
        ids, mask = _inputs(seed)
        # OPT derives positions from the mask in forward; GPT-2 and LLaMA only in generate (pass them)
        extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0) * mask} if name != "opt" else {}
        with torch.no_grad():
            ref = ref_model(ids, attention_mask=mask, output_hidden_states=True, **extra)
            if name.startswith("llama"):
                # HF's forward without position_ids uses 0..T-1 in every row; rotary attention sees
                # only position differences, so the real tokens' logits agree with ours all the same
                plain = ref_model(ids, attention_mask=mask).logits.numpy()
        out = module.apply(variables, jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
                           output_hidden_states=True)
        valid = mask.numpy().astype(bool)
        np.testing.assert_allclose(_np(out.logits)[valid], ref.logits.numpy()[valid], atol=ATOL, rtol=0)
        if name.startswith("llama"):
            np.testing.assert_allclose(_np(out.logits)[valid], plain[valid], atol=ATOL, rtol=0)
        # HF: (embeddings, block 1 .. block L-1 outputs, final normed [projected] output)
        assert len(out.hidden_states) == len(ref.hidden_states)
        for ours, theirs in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
            np.testing.assert_allclose(_np(ours)[valid], theirs.numpy()[valid], atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(out.hidden)[valid], ref.hidden_states[-1].numpy()[valid], atol=ATOL, rtol=0)
        if name in ("gpt2", "llama") and seed == 1:   # bf16 compute (f32 params) stays close; logits come back f32
            low = module.clone(dtype=jnp.bfloat16).apply(variables, jnp.asarray(ids.numpy()),
                                                         attention_mask=jnp.asarray(mask.numpy())).logits
            assert low.dtype == jnp.float32
            np.testing.assert_allclose(_np(low)[valid], ref.logits.numpy()[valid], atol=0.15, rtol=0)
        # padding matters: the padded rows differ from running them unpadded
        assert not np.allclose(_np(out.logits)[2, 4:], _np(module.apply(variables, jnp.asarray(ids.numpy()))
                                                          .logits)[2, 4:], atol=1e-3)


def test_bert_forward_matches_hf(hf_models):
    ref_model, module, variables = hf_models["bert"]
    for seed in (1, 2):
        ids, mask = _inputs(seed, left_pad=False)
        types = torch.randint(0, 2, (B, T), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = ref_model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        out = module.apply(variables, jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
                           token_type_ids=jnp.asarray(types.numpy()), output_hidden_states=True)
        np.testing.assert_allclose(_np(out.hidden), ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(out.pooled), ref.pooler_output.numpy(), atol=ATOL, rtol=0)
        for ours, theirs in zip(out.hidden_states, ref.hidden_states):
            np.testing.assert_allclose(_np(ours), theirs.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["t5", "t5_tied", "t5_v1_0"])
def test_t5_forward_matches_hf(hf_models, name):
    ref_model, module, variables = hf_models[name]
    assert module.config.tie_lm_head == (name != "t5")
    for seed in (1, 2):
        ids, mask = _inputs(seed, left_pad=False)
        dec = torch.randint(2, 64, (B, 5), generator=torch.Generator().manual_seed(seed + 10))
        with torch.no_grad():
            ref = ref_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
        out = module.apply(variables, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()),
                           attention_mask=jnp.asarray(mask.numpy()), output_hidden_states=True)
        np.testing.assert_allclose(_np(out.logits), ref.logits.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(out.encoded), ref.encoder_last_hidden_state.numpy(), atol=ATOL, rtol=0)
        for ours, theirs in zip(out.encoder_hidden_states[:-1], ref.encoder_hidden_states[:-1]):
            np.testing.assert_allclose(_np(ours), theirs.numpy(), atol=ATOL, rtol=0)
        for ours, theirs in zip(out.decoder_hidden_states[:-1], ref.decoder_hidden_states[:-1]):
            np.testing.assert_allclose(_np(ours), theirs.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(out.decoder_hidden), ref.decoder_hidden_states[-1].numpy(), atol=ATOL, rtol=0)


# ------------------------------------------------------------------- KV-cache decoding
@pytest.mark.parametrize("name,scan", [("gpt2", False), ("opt_post_ln", False), ("gpt2", True), ("llama", False),
                                       ("llama", True), ("llama_mqa_tied", False)])
def test_kv_cache_decoding_equals_full_forward(hf_models, name, scan):
    """Prefill a left-padded prompt, then feed the rest one token at a time (scan: through the
    stacked cache of load_hf(scan_layers=True))."""
    _, module, variables = hf_models[name]
    if scan:
        module, variables, _ = load_hf(PATHS[name], scan_layers=True)
    ids, mask = _inputs(3)
    ids, mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    full = _np(module.apply(variables, ids, attention_mask=mask).logits)
    k = 5                                                   # prompt = first k tokens (rows 1, 2 left-padded)
    first, state = gen.prefill_decoder_lm(module, variables["params"], ids[:, :k], prompt_mask=mask[:, :k],
                                          max_new_tokens=T - k + 1)
    index = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["cache"])
             if path[-1].key == "cache_index"]
    assert index[0].shape == ((B, module.config.num_layers) if scan else (B,))   # scanned: stacked on axis 1
    keys = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["cache"]) if path[-1].key == "cached_key"]
    c = module.config
    assert keys[0].shape[-2:] == (c.num_kv_heads or c.num_heads, c.attn_head_dim)   # GQA: only the kv heads
    step = jax.jit(gen.decoder_lm_step_fn(module, variables["params"]))
    tok = first
    for pos in range(k - 1, T):
        logits, state, _ = step(tok, state, jnp.int32(pos - k + 1))
        valid = _np(mask[:, pos]).astype(bool)
        np.testing.assert_allclose(_np(logits)[valid], full[valid, pos], atol=ATOL, rtol=0)
        if pos + 1 < T:
            tok = ids[:, pos + 1]


def test_rotary_decoding_without_position_ids_uses_the_cache_index(hf_models):
    """decode=True calls without position_ids rotate the new tokens at the cache index: prefill 4
    tokens, then 3 single steps == the full forward (unpadded rows)."""
    _, module, variables = hf_models["llama"]
    ids = jnp.asarray(_inputs(11)[0].numpy())[:1].repeat(2, 0).at[1].add(1)
    full = _np(jax.jit(module.apply)(variables, ids).logits)
    cache = attention_lib.init_cache(module, variables["params"], ids)
    run = jax.jit(functools.partial(module.apply, decode=True, mutable=["cache"]))
    out, new = run({**variables, "cache": cache}, ids[:, :4])
    np.testing.assert_allclose(_np(out.logits), full[:, :4], atol=ATOL, rtol=0)
    for pos in range(4, T):
        out, new = run({**variables, **new}, ids[:, pos:pos + 1])
        np.testing.assert_allclose(_np(out.logits[:, 0]), full[:, pos], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["xla", "dot_product_attention"])
def test_grouped_query_attention_equals_repeated_kv_heads(kernel, monkeypatch):
    """GQA (H=6 over Hkv=2) == full multi-head attention whose key/value kernels repeat each kv
    head G=3 times (query head h reads kv head h // G, HF's repeat_kv), through our XLA path and
    through jax.nn.dot_product_attention (the GPU path, taking the Hkv heads directly); rotary
    logits depend only on position differences."""
    monkeypatch.setattr(attention_lib, "attention_kernel", lambda *a, **k: kernel)
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    mask = jnp.ones((2, 1, 1, 5), bool).at[1, ..., :2].set(False)
    gqa = attention_lib.MultiHeadAttention(num_heads=6, head_dim=4, num_kv_heads=2, use_bias=False,
                                           rope_theta=100.0)
    p = nn.unbox(jax.eval_shape(gqa.init, jax.random.key(1), x)["params"])
    p = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.5, p)
    assert p["key"]["kernel"].shape == (12, 2, 4) and p["query"]["kernel"].shape == (12, 6, 4)
    full = {**p, "key": {"kernel": jnp.repeat(p["key"]["kernel"], 3, axis=1)},
            "value": {"kernel": jnp.repeat(p["value"]["kernel"], 3, axis=1)}}
    mha = attention_lib.MultiHeadAttention(num_heads=6, head_dim=4, use_bias=False, rope_theta=100.0)
    run_gqa = jax.jit(lambda p, pos: gqa.apply({"params": p}, x, mask=mask, is_causal=True, positions=pos))
    run_mha = jax.jit(lambda p, pos: mha.apply({"params": p}, x, mask=mask, is_causal=True, positions=pos))
    pos = jnp.arange(5)[None]
    want = _np(run_mha(full, pos))
    np.testing.assert_allclose(_np(run_gqa(p, pos)), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_np(run_gqa(p, pos + jnp.array([[3], [11]]))), want, atol=1e-5, rtol=0)
    assert np.abs(_np(run_mha(full, jnp.zeros((1, 5), jnp.int32))) - want).max() > 1e-3   # the positions matter


def test_t5_kv_cache_decoding_equals_full_forward(hf_models):
    _, module, variables = hf_models["t5_tied"]
    ids, mask = _inputs(4, left_pad=False)
    ids, mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    dec = jax.random.randint(jax.random.key(0), (B, 6), 2, 64)
    full = _np(module.apply(variables, ids, dec, attention_mask=mask).logits)
    state = gen.prefill_seq2seq(module, variables["params"], ids, input_mask=mask, max_new_tokens=6)
    # the steps read the cross-attention keys/values from the cache, not the encoder output
    assert set(state) == {"cache", "encoder_mask"}
    d = module.config.width
    assert not [x.shape for x in jax.tree.leaves(state) if x.shape == (B, T, d)]
    cross = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["cache"])
             if path[-1].key.startswith("cached_cross_")]
    assert len(cross) == 2 * module.config.decoder_layers
    assert all(x.shape == (B, T, module.config.num_heads, module.config.head_dim) for x in cross)
    step = jax.jit(gen.seq2seq_step_fn(module, variables["params"]))
    for t in range(6):
        logits, state, _ = step(dec[:, t], state, jnp.int32(t))
        np.testing.assert_allclose(_np(logits), full[:, t], atol=ATOL, rtol=0)
    # the encoder padding matters for these logits
    unmasked = _np(module.apply(variables, ids, dec).logits)
    assert np.abs(unmasked[1:] - full[1:]).max() > 1e-3


def _dot_operand_shapes(jaxpr) -> list[tuple[tuple[int, ...], ...]]:
    """Operand shapes of every dot_general in a jaxpr, nested jaxprs (pjit, custom_jvp, ...) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else (param,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_operand_shapes(inner)
    return found


def test_t5_step_does_not_project_the_encoder_output(hf_models):
    """One decoding step has no matmul on the encoder output [N, Se, D] (the cross-attention
    keys/values come from the cache); with cache_cross_kv=False each decoder layer projects it twice."""
    _, module, variables = hf_models["t5"]
    ids, mask = _inputs(4, left_pad=False)
    ids, mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    enc_shape = (B, T, module.config.width)
    step = gen.seq2seq_step_fn(module, variables["params"])
    counts = {}
    for cached in (True, False):
        state = gen.prefill_seq2seq(module, variables["params"], ids, input_mask=mask, max_new_tokens=3,
                                    cache_cross_kv=cached)
        tokens = jnp.zeros((B,), jnp.int32)
        jaxpr = jax.make_jaxpr(step)(tokens, state, jnp.int32(0)).jaxpr
        counts[cached] = sum(enc_shape in shapes for shapes in _dot_operand_shapes(jaxpr))
    assert counts == {True: 0, False: 2 * module.config.decoder_layers}


def test_t5_beam_search_with_cross_cache_equals_without(hf_models):
    _, module, variables = hf_models["t5"]
    ids, mask = _inputs(9, left_pad=False)
    results = {}
    for cached in (True, False):
        run = jax.jit(functools.partial(gen.generate_seq2seq, module, strategy="beam", beam_size=3, max_new_tokens=6,
                                        eos_id=PAD, decoder_start_id=0, pad_id=0, cache_cross_kv=cached))
        results[cached] = run(variables["params"], jnp.asarray(ids.numpy()), input_mask=jnp.asarray(mask.numpy()))
    assert results[True].tokens.shape == (B, 3, 6)
    np.testing.assert_array_equal(_np(results[True].tokens), _np(results[False].tokens))
    np.testing.assert_array_equal(_np(results[True].lengths), _np(results[False].lengths))
    np.testing.assert_allclose(_np(results[True].scores), _np(results[False].scores), atol=1e-5, rtol=0)
    assert len(np.unique(_np(results[True].tokens))) > 3             # not a degenerate continuation
    assert (_np(results[True].tokens)[:, 0] != _np(results[True].tokens)[:, 1]).any()   # distinct beams


# ---------------------------------------------------------------- generation vs HF
def _hf_new_tokens(out, prompt_len, n, pad):
    out = out[:, prompt_len:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_greedy_generation_matches_hf(hf_models, name):
    ref_model, module, variables = hf_models[name]
    ids, mask = _inputs(5)
    n = 8
    with torch.no_grad():
        free = _hf_new_tokens(ref_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                                 eos_token_id=EOS, pad_token_id=PAD), T, n, PAD)
    # make the eos fire mid-sequence in row 0: the first token HF emits there at a step >= 2 that
    # it has not emitted before (min_new_tokens=2 also forbids it at steps 0, 1 in every row)
    stop = next(j for j in range(2, n) if free[0, j] not in free[0, :j])
    eos = int(free[0, stop])
    with torch.no_grad():
        ref = _hf_new_tokens(ref_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                                min_new_tokens=2, eos_token_id=eos, pad_token_id=PAD), T, n, PAD)
    assert ref[0, stop] == eos and (ref[0, stop + 1:] == PAD).all()
    res = gen.generate(module, variables["params"], jnp.asarray(ids.numpy()), prompt_mask=jnp.asarray(mask.numpy()),
                       max_new_tokens=n, min_new_tokens=2, eos_id=eos, pad_id=PAD)
    np.testing.assert_array_equal(_np(res.tokens[:, 0]), ref)
    assert len(np.unique(ref)) > 3                         # not a degenerate constant continuation


def test_t5_greedy_generation_matches_hf(hf_models):
    ref_model, module, variables = hf_models["t5"]
    ids, mask = _inputs(6, left_pad=False)
    n = 8
    with torch.no_grad():
        free = _hf_new_tokens(ref_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                 max_new_tokens=n, eos_token_id=PAD, pad_token_id=0), 1, n, 0)
    eos = int(free[1, 2])
    with torch.no_grad():
        ref = _hf_new_tokens(ref_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                max_new_tokens=n, min_new_tokens=1, eos_token_id=eos,
                                                pad_token_id=0), 1, n, 0)
    res = gen.generate_seq2seq(module, variables["params"], jnp.asarray(ids.numpy()),
                               input_mask=jnp.asarray(mask.numpy()), max_new_tokens=n, min_new_tokens=1,
                               eos_id=eos, decoder_start_id=0, pad_id=0)
    np.testing.assert_array_equal(_np(res.tokens[:, 0]), ref)
    assert (ref[1, :3] != 0).all() and (ref[1, 3:] == 0).all()
    assert len(np.unique(ref)) > 3


def test_beam_and_sampling_run_through_the_cache(hf_models):
    """Beam search (beam 1 == greedy; beam 3 scores >= greedy's) and sampling (seeded)."""
    _, module, variables = hf_models["gpt2"]
    ids, mask = _inputs(7)
    args = (module, variables["params"], jnp.asarray(ids.numpy()))
    kw = dict(prompt_mask=jnp.asarray(mask.numpy()), max_new_tokens=6, eos_id=EOS, pad_id=PAD)
    greedy = gen.generate(*args, **kw)
    beam = jax.jit(functools.partial(gen.generate, module, strategy="beam", beam_size=3, **kw))(*args[1:])
    assert beam.tokens.shape == (B, 3, 6)
    # with no eos reached, beam search (length_penalty 0) can only improve on greedy's log-prob
    assert not (_np(greedy.tokens) == EOS).any()
    assert (_np(beam.scores[:, 0]) >= _np(greedy.scores[:, 0]) - 1e-5).all()
    assert (_np(beam.scores[:, 0]) > _np(greedy.scores[:, 0]) + 1e-4).any()
    # sampling at a low temperature mostly follows greedy; at 1.0 its log-prob is below greedy's
    cold = gen.generate(*args, strategy="sample", rng=jax.random.key(1), temperature=1e-3, **kw)
    np.testing.assert_array_equal(_np(cold.tokens), _np(greedy.tokens))
    with pytest.raises(ValueError, match="rng"):
        gen.generate(*args, strategy="sample", **kw)


def test_prefix_embeds_equal_the_same_tokens_in_the_prompt(hf_models):
    """BLIP-2 path: a soft prefix of word embeddings == those tokens in the prompt."""
    _, module, variables = hf_models["opt"]
    ids, _ = _inputs(8)
    ids = jnp.asarray(ids.numpy())
    params = variables["params"]
    kw = dict(max_new_tokens=5, eos_id=EOS, pad_id=PAD)
    plain = gen.generate(module, params, ids, **kw)
    prefix = module.apply(variables, ids[:, :3], method="embed_tokens")
    soft = gen.generate(module, params, ids[:, 3:], prefix_embeds=prefix, **kw)
    np.testing.assert_array_equal(_np(soft.tokens), _np(plain.tokens))
    np.testing.assert_allclose(_np(soft.scores), _np(plain.scores), atol=1e-4)


def test_generation_rejects_right_padding(hf_models):
    _, module, variables = hf_models["gpt2"]
    ids, mask = _inputs(1, left_pad=False)
    with pytest.raises(ValueError, match="LEFT-padded"):
        gen.generate(module, variables["params"], jnp.asarray(ids.numpy()), prompt_mask=jnp.asarray(mask.numpy()),
                     max_new_tokens=2, eos_id=EOS)


# ----------------------------------------------------------------- scanned layouts
def _grads(module, variables, *args, **kw):
    def loss(p):
        out = module.apply({"params": p}, *args, **kw)
        main = out.logits if getattr(out, "logits", None) is not None else out.hidden
        return (main ** 2).mean()
    return jax.jit(jax.grad(loss))(variables["params"])


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "llama"])
def test_scanned_import_matches_hf_and_unrolled(hf_models, name):
    """load_hf(scan_layers=True): stacked 'layers' params, same outputs as HF, same gradients."""
    ref_model, module_u, vars_u = hf_models[name]
    module_s, vars_s, _ = load_hf(PATHS[name], scan_layers=True, remat_policy="full")
    assert module_s.config.scan_layers and not module_u.config.scan_layers
    ids, mask = _inputs(5, left_pad=name in ("gpt2", "llama"))
    j_ids, j_mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    if name == "t5":
        dec = torch.randint(2, 64, (B, 5), generator=torch.Generator().manual_seed(15))
        for stack in ("encoder", "decoder"):
            assert vars_s["params"][stack]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
            assert not any(k.startswith("layers_") for k in vars_s["params"][stack])
        args, kw = (j_ids, jnp.asarray(dec.numpy())), dict(attention_mask=j_mask)
        with torch.no_grad():
            want = ref_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()
        got = module_s.apply(vars_s, *args, **kw).logits
        np.testing.assert_allclose(_np(got), want, atol=ATOL, rtol=0)
    else:
        c = module_u.config
        attn = vars_s["params"]["layers"]["attn"]
        assert attn["query"]["kernel"].shape == (c.num_layers, c.width, c.num_heads, c.width // c.num_heads
                                                 if name == "bert" else c.attn_head_dim)
        if name == "llama":
            assert attn["key"]["kernel"].shape == (3, 30, 2, 6)
        args, kw = (j_ids,), dict(attention_mask=j_mask, output_hidden_states=True)
        out_s, out_u = module_s.apply(vars_s, *args, **kw), module_u.apply(vars_u, *args, **kw)
        valid = mask.numpy().astype(bool)
        with torch.no_grad():
            if name == "bert":
                ref = ref_model(ids, attention_mask=mask)
                np.testing.assert_allclose(_np(out_s.hidden), ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)
            else:
                ref = ref_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0) * mask)
                np.testing.assert_allclose(_np(out_s.logits)[valid], ref.logits.numpy()[valid], atol=ATOL, rtol=0)
        for a, b in zip(out_u.hidden_states, out_s.hidden_states):
            np.testing.assert_allclose(_np(b), _np(a), atol=1e-5, rtol=0)
        kw.pop("output_hidden_states")
    g_u = _grads(module_u, vars_u, *args, **kw)
    containers = (("encoder",), ("decoder",)) if name == "t5" else ((),)
    stacked = g_u
    for c in containers:
        n = module_u.config.num_layers if c != ("decoder",) else module_u.config.decoder_layers
        stacked = common.stack_params(stacked, n, container=c)
    g_s = _grads(module_s, vars_s, *args, **kw)
    assert jax.tree.structure(stacked) == jax.tree.structure(g_s)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(_np(b), _np(a), atol=1e-5, rtol=1e-5)


def test_scanned_t5_kv_cache_decoding_equals_full_forward(hf_models):
    """T5 scanned (encoder and decoder stacks): steps through the stacked self/cross cache == full forward."""
    module, variables, _ = load_hf(PATHS["t5_tied"], scan_layers=True)
    ids, mask = _inputs(4, left_pad=False)
    ids, mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
    dec = jax.random.randint(jax.random.key(0), (B, 6), 2, 64)
    full = _np(module.apply(variables, ids, dec, attention_mask=mask).logits)
    state = gen.prefill_seq2seq(module, variables["params"], ids, input_mask=mask, max_new_tokens=6)
    step = jax.jit(gen.seq2seq_step_fn(module, variables["params"]))
    for t in range(6):
        logits, state, _ = step(dec[:, t], state, jnp.int32(t))
        np.testing.assert_allclose(_np(logits), full[:, t], atol=ATOL, rtol=0)


# ---------------------------------------------------- Flamingo-style declared insertion
class _GatedMediaAdd(nn.Module):
    """Flamingo-like inserted block: x + tanh(gate) * tanh(Dense(mean of the visible media)).

    x [B, T, D]; media [B, S, Dm]; media_mask [B, 1, T, S] (which media each token sees)."""
    width: int
    gate_init: float = 0.0
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, media, media_mask, *, deterministic: bool = True):
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.constant(self.gate_init), (None,)),
                          ())
        proj = Dense(self.width, (None, "embed"), name="proj")(media)                  # [B, S, D]
        w = media_mask[:, 0].astype(x.dtype)                                           # [B, T, S]
        seen = jnp.einsum("bts,bsd->btd", w, proj) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
        return x + jnp.tanh(gate) * jnp.tanh(seen)


def _flamingo_lm(scan: bool, gate: float, num_layers: int = 4):
    spec = InsertSpec(_GatedMediaAdd, {"width": 24, "gate_init": gate}, every=2, offset=1)
    return DecoderLM(DecoderLMConfig(vocab_size=40, width=24, num_layers=num_layers, num_heads=3, mlp_dim=40,
                                     max_positions=16, activation="relu", position_offset=2, insert=spec,
                                     scan_layers=scan, remat_policy="full" if scan else "none"))


def test_decoder_lm_inserted_blocks_full_decode_and_scan():
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 40)
    media = jax.random.normal(jax.random.key(2), (2, 3, 10))
    media_mask = jnp.ones((2, 1, 1, 3), bool).at[1, :, :, 2].set(False)        # row 1 sees media 0, 1
    ins = (media, media_mask)
    closed = _flamingo_lm(False, 0.0)
    variables = jax.jit(lambda: closed.init(jax.random.key(0), tokens, inserted_inputs=ins))()
    p = nn.unbox(variables["params"])
    assert sorted(k for k in p if k.startswith("inserted")) == ["inserted_0", "inserted_1"]   # own scopes
    assert all(set(p[f"layers_{i}"]) == {"attn_norm", "attn", "mlp_norm", "mlp"} for i in range(4))
    bare_cfg = dataclasses.replace(closed.config, insert=None)
    lm_params = {k: v for k, v in p.items() if not k.startswith("inserted")}
    bare = DecoderLM(bare_cfg).apply({"params": lm_params}, tokens).logits
    np.testing.assert_allclose(_np(closed.apply({"params": p}, tokens, inserted_inputs=ins).logits), _np(bare),
                               atol=1e-6)                                       # gate 0: the frozen LM exactly
    p = {**p, **{f"inserted_{m}": {**p[f"inserted_{m}"], "gate": jnp.asarray(0.7)} for m in range(2)}}
    opened = _flamingo_lm(False, 0.7)
    full = opened.apply({"params": p}, tokens, inserted_inputs=ins).logits
    assert np.abs(_np(full) - _np(bare)).max() > 1e-3
    other = opened.apply({"params": p}, tokens, inserted_inputs=(media * 2, media_mask)).logits
    assert np.abs(_np(full) - _np(other)).max() > 1e-3                          # the media matter
    # scanned: groups of (2 layers + 1 inserted block) give the same logits and gradients
    scanned = _flamingo_lm(True, 0.7)
    ps = jax.tree.map(jnp.asarray, common.stack_params(p, 4, group=2, inserts_per_group=1))
    shapes = nn.unbox(jax.eval_shape(lambda: scanned.init(jax.random.key(0), tokens, inserted_inputs=ins))["params"])
    assert jax.tree.structure(shapes) == jax.tree.structure(ps)
    assert set(ps["layers"]) == {"block_0", "block_1", "inserted_0"}
    full_s = scanned.apply({"params": ps}, tokens, inserted_inputs=ins).logits
    np.testing.assert_allclose(_np(full_s), _np(full), atol=1e-5, rtol=0)
    g_u = _grads(opened, {"params": p}, tokens, inserted_inputs=ins)
    g_s = _grads(scanned, {"params": ps}, tokens, inserted_inputs=ins)
    for a, b in zip(jax.tree.leaves(common.stack_params(g_u, 4, group=2, inserts_per_group=1)),
                    jax.tree.leaves(g_s)):
        np.testing.assert_allclose(_np(b), _np(a), atol=1e-5, rtol=1e-5)
    # the inserted blocks also run while decoding from the KV cache, unrolled and scanned
    for model, params in ((opened, p), (scanned, ps)):
        first, state = gen.prefill_decoder_lm(model, params, tokens[:, :5], max_new_tokens=5,
                                              row_inputs={"inserted_inputs": ins})
        step = jax.jit(gen.decoder_lm_step_fn(model, params))
        tok = first
        for pos in range(4, 9):
            logits, state, _ = step(tok, state, jnp.int32(pos - 4))
            np.testing.assert_allclose(_np(logits), _np(full[:, pos]), atol=ATOL, rtol=0)
            tok = tokens[:, min(pos + 1, 8)]
    with pytest.raises(ValueError, match=r"num_layers=5 to be a multiple of insert.every=2"):
        _flamingo_lm(True, 0.0, num_layers=5)


def test_bert_cross_attention_pattern_scans():
    """Q-Former layout (cross-attention every 2nd layer): scanned == unrolled; non-periodic layouts refuse scan."""
    kw = dict(vocab_size=20, width=24, num_layers=4, num_heads=3, mlp_dim=32, cross_attention_every=2)
    unrolled = BertEncoder(BertConfig(**kw))
    scanned = BertEncoder(BertConfig(**kw, scan_layers=True, remat_policy="dots"))
    tokens = jax.random.randint(jax.random.key(3), (2, 5), 0, 20)
    encoded = jax.random.normal(jax.random.key(4), (2, 3, 12))
    enc_mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    p = nn.unbox(jax.jit(unrolled.init)(jax.random.key(0), tokens, encoded=encoded)["params"])
    ps = jax.tree.map(jnp.asarray, common.stack_params(p, 4, group=2))
    assert "cross_attn" in ps["layers"]["block_0"] and "cross_attn" not in ps["layers"]["block_1"]
    call = dict(encoded=encoded, encoder_mask=enc_mask, output_hidden_states=True)
    out_u = unrolled.apply({"params": p}, tokens, **call)
    out_s = scanned.apply({"params": ps}, tokens, **call)
    np.testing.assert_allclose(_np(out_s.hidden), _np(out_u.hidden), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_np(out_s.pooled), _np(out_u.pooled), atol=1e-5, rtol=0)
    for a, b in zip(out_u.hidden_states, out_s.hidden_states):
        np.testing.assert_allclose(_np(b), _np(a), atol=1e-5, rtol=0)
    call.pop("output_hidden_states")
    g_u = _grads(unrolled, {"params": p}, tokens, **call)
    g_s = _grads(scanned, {"params": ps}, tokens, **call)
    for a, b in zip(jax.tree.leaves(common.stack_params(g_u, 4, group=2)), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(_np(b), _np(a), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"BertConfig.scan_layers=True needs a periodic layer layout"):
        BertConfig(**{**kw, "cross_attention_every": 0}, cross_attention_layers=(1,), scan_layers=True)
    BertConfig(**{**kw, "cross_attention_every": 0}, cross_attention_layers=(1,))          # unrolled: fine
    with pytest.raises(ValueError, match=r"BertConfig.remat_policy=True"):
        BertConfig(**kw, remat_policy=True)


# ------------------------------------------------------------------------ converters
def _gpt2_dir(hf_models, tmp_path):
    return _save(hf_models["gpt2"][0], tmp_path)


def test_converter_errors_name_the_key(hf_models, tmp_path):
    config, tensors = common.read_hf_dir(_gpt2_dir(hf_models, tmp_path))
    conv = lambda ts, cfg=config: CONVERTERS["GPT2LMHeadModel"](cfg, set(ts))    # noqa: E731

    missing = dict(tensors)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(common.ConversionError, match=r"missing key 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        common.convert(conv(missing), missing)

    extra = dict(tensors, **{"transformer.h.0.attn.q_norm.weight": np.zeros(4, np.float32)})
    with pytest.raises(common.ConversionError, match=r"unexpected key 'transformer\.h\.0\.attn\.q_norm\.weight'"):
        common.convert(conv(extra), extra)

    longer = dict(config, n_positions=40)
    with pytest.raises(common.ConversionError, match=r"shape mismatch for key 'transformer\.wpe\.weight'"):
        common.convert(conv(tensors, longer), tensors)

    untied = dict(tensors, **{"lm_head.weight": np.asarray(tensors["transformer.wte.weight"]) + 1.0})
    with pytest.raises(common.ConversionError, match=r"'lm_head\.weight' should be a tied copy"):
        common.convert(conv(untied), untied)
    tied_copy = dict(tensors, **{"lm_head.weight": np.array(tensors["transformer.wte.weight"])})
    common.convert(conv(tied_copy), tied_copy)              # an identical copy is accepted

    with pytest.raises(common.ConversionError, match="activation_function"):
        CONVERTERS["GPT2LMHeadModel"](dict(config, activation_function="mish"), set(tensors))
    with pytest.raises(common.ConversionError, match="unknown architecture 'Nope'"):
        load_hf(_gpt2_dir(hf_models, tmp_path / "x"), architecture="Nope")


def test_llama_converter_checks(hf_models, tmp_path):
    path = _save(hf_models["llama"][0], tmp_path)
    config, tensors = common.read_hf_dir(path)
    conv = CONVERTERS["LlamaForCausalLM"]
    cfg = conv(config, set(tensors)).module.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.attn_head_dim, cfg.norm_type, cfg.activation, cfg.use_bias,
            cfg.tie_embeddings, cfg.position_embedding) == (6, 2, 6, "rmsnorm", "gated_silu", False, False, "rotary")
    assert "position_embed" not in jax.eval_shape(lambda: conv(config, set(tensors)).module.init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    llama3 = dict(config, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(common.ConversionError, match="rope_type='llama3'"):
        conv(llama3, set(tensors))
    with pytest.raises(common.ConversionError, match="attention_bias"):
        conv(dict(config, attention_bias=True), set(tensors))
    with pytest.raises(common.ConversionError, match="hidden_act"):
        conv(dict(config, hidden_act="gelu"), set(tensors))
    missing = dict(tensors)
    del missing["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(common.ConversionError, match=r"missing key 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        common.convert(conv(config, set(missing)), missing)
    with pytest.raises(common.ConversionError, match=r"shape mismatch for key 'model\.layers\.0\.self_attn\.k_proj"):
        common.convert(conv(dict(config, num_key_value_heads=3), set(tensors)), tensors)


def test_load_onto_a_mesh(hf_models, tmp_path):
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (conftest forces 8 CPU devices)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    module, sharded, _ = load_hf(_gpt2_dir(hf_models, tmp_path), mesh=mesh)
    wi = sharded["params"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    emb = sharded["params"]["token_embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids = jnp.asarray(_inputs(1)[0].numpy())
    _, _, variables = hf_models["gpt2"]
    np.testing.assert_allclose(_np(module.apply(sharded, ids).logits), _np(module.apply(variables, ids).logits),
                               atol=1e-5)


def test_bad_inputs_give_clear_errors():
    cfg = DecoderLMConfig(vocab_size=10, width=16, num_layers=1, num_heads=2, mlp_dim=16, max_positions=8)
    lm = DecoderLM(cfg)
    with pytest.raises(ValueError, match="integer"):
        lm.init(jax.random.key(0), jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="exactly one of tokens"):
        lm.init(jax.random.key(0))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DecoderLMConfig(vocab_size=10, width=15, num_layers=1, num_heads=2, mlp_dim=16, max_positions=8)
    with pytest.raises(ValueError, match="cross_attention_layers"):
        BertConfig(vocab_size=10, width=16, num_layers=2, num_heads=2, mlp_dim=16, cross_attention_layers=(5,))
    bert = BertEncoder(BertConfig(vocab_size=10, width=16, num_layers=2, num_heads=2, mlp_dim=16,
                                  cross_attention_every=2))
    with pytest.raises(ValueError, match="pass encoded"):
        bert.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))


def test_bert_cross_attention_layers():
    """Q-Former starting point: cross-attention (Dc != D) only in the chosen layers."""
    cfg = BertConfig(vocab_size=20, width=16, num_layers=4, num_heads=2, mlp_dim=32, cross_attention_every=2)
    tokens = jnp.ones((2, 5), jnp.int32)
    encoded = jax.random.normal(jax.random.key(1), (2, 3, 24))
    variables = jax.jit(BertEncoder(cfg).init)(jax.random.key(0), tokens, encoded=encoded)
    p = nn.unbox(variables["params"])
    assert ["cross_attn" in p[f"layers_{i}"] for i in range(4)] == [True, False, True, False]
    assert p["layers_0"]["cross_attn"]["key"]["kernel"].shape == (24, 2, 8)
    out1 = BertEncoder(cfg).apply(variables, tokens, encoded=encoded).hidden
    out2 = BertEncoder(cfg).apply(variables, tokens, encoded=encoded * 2).hidden
    assert np.abs(_np(out1) - _np(out2)).max() > 1e-3
    masked = BertEncoder(cfg).apply(variables, tokens, encoded=encoded.at[:, 2].set(9.0),
                                    encoder_mask=jnp.array([[1, 1, 0]] * 2)).hidden
    unmasked_ref = BertEncoder(cfg).apply(variables, tokens, encoded=encoded, encoder_mask=jnp.array([[1, 1, 0]] * 2))
    np.testing.assert_allclose(_np(masked), _np(unmasked_ref.hidden), atol=1e-6)


# ---------------------------------------------------------------- paper-size params
def _hf_param_count(cls, cfg) -> int:
    with torch.device("meta"):
        model = cls(cfg)
    return sum(p.numel() for p in model.parameters())


def _our_param_count(module, *args) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


def test_paper_size_parameter_counts():
    tok = jnp.zeros((1, 2), jnp.int32)
    cases = {
        # bert-base-uncased (BertModel with pooler): 109.48M
        "bert-base": (BertEncoder(BertConfig.base()), (tok,), transformers.BertModel, transformers.BertConfig(), 0),
        # gpt2 (124M)
        "gpt2": (DecoderLM(DecoderLMConfig.gpt2()), (tok,), transformers.GPT2LMHeadModel,
                 transformers.GPT2Config(), 0),
        # facebook/opt-2.7b
        "opt-2.7b": (DecoderLM(DecoderLMConfig.opt("2.7b")), (tok,), transformers.OPTForCausalLM,
                     transformers.OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                                            num_attention_heads=32, max_position_embeddings=2048, vocab_size=50272,
                                            word_embed_proj_dim=2560), 0),
        # TinyLlama/TinyLlama-1.1B (GQA 32 / 4 heads, untied head)
        "tinyllama-1.1b": (DecoderLM(DecoderLMConfig.llama("tinyllama-1.1b")), (tok,), transformers.LlamaForCausalLM,
                           transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                                    num_hidden_layers=22, num_attention_heads=32,
                                                    num_key_value_heads=4), 0),
        # google/flan-t5-xl. transformers 5.x always ties T5's lm_head to the shared embedding in
        # memory (the checkpoint's separate lm_head.weight unties it only at load time), so the
        # meta-device count lacks the untied head: add V*D for it.
        "flan-t5-xl": (T5(T5Config.flan_t5("xl")), (tok, tok), transformers.T5ForConditionalGeneration,
                       transformers.T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                                             num_heads=32, feed_forward_proj="gated-gelu",
                                             tie_word_embeddings=False), 32128 * 2048),
    }
    for name, (module, args, cls, hf_cfg, untied_head) in cases.items():
        ours = _our_param_count(module, *args)
        ref = _hf_param_count(cls, hf_cfg) + untied_head
        assert abs(ours - ref) / ref < 0.01, (name, ours, ref)
        assert ours == ref, (name, ours, ref)                # in fact they agree exactly
    assert _our_param_count(T5(T5Config.flan_t5("xl")), tok, tok) == 2_849_757_184
    assert _our_param_count(DecoderLM(DecoderLMConfig.llama("7b")), tok) == 6_738_415_616     # Llama-2-7b
