"""Tests of vlm_jax.decoding on a tiny random RNN language model written in plain jnp.

The model: h' = tanh(h W + E[token]), logits = h' U + b; a second state leaf `hist` hashes the
token history so that aux (returned per step) is a known function of each hypothesis' own
history. A float64 numpy copy of the model serves as the oracle (exhaustive search, rescoring).
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decoding

BOS, EOS = 1, 2
HASH_MOD = 1_000_003


def make_params(seed, vocab, hidden=6, scale=2.0, eos_bias=0.0):
    r = np.random.RandomState(seed)
    return dict(
        E=r.randn(vocab, hidden).astype(np.float32),
        W=(r.randn(hidden, hidden) / np.sqrt(hidden)).astype(np.float32),
        U=(scale * r.randn(hidden, vocab) / np.sqrt(hidden)).astype(np.float32),
        b=(np.eye(vocab)[EOS] * eos_bias).astype(np.float32),
    )


def init_state(seed, batch, hidden=6):
    r = np.random.RandomState(1000 + seed)
    return dict(h=r.randn(batch, hidden).astype(np.float32), hist=np.zeros((batch,), np.int32))


def hash_step(hist, token):
    return (hist * 31 + token + 1) % HASH_MOD


def make_step_fn(params):
    def step_fn(tokens, state, t):
        h = jnp.tanh(state["h"] @ params["W"] + params["E"][tokens])
        hist = hash_step(state["hist"], tokens)
        logits = h @ params["U"] + params["b"]
        aux = dict(hist=hist, vec=jnp.stack([jnp.sin(hist.astype(jnp.float32)), h[:, 0]], axis=-1))
        return logits, dict(h=h, hist=hist), aux
    return step_fn


# ------------------------------------------------------------------------- numpy oracle


def np_logp(params, h, token):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = np.tanh(h @ p["W"] + p["E"][token])
    logits = h @ p["U"] + p["b"]
    logits = logits - logits.max()
    return logits - np.log(np.exp(logits).sum()), h


def np_score(params, h0, first, tokens, length, alpha):
    h, tok, total = np.asarray(h0, np.float64), first, 0.0
    for t in range(length):
        logp, h = np_logp(params, h, tok)
        total += logp[tokens[t]]
        tok = tokens[t]
    return total / length ** alpha


def exhaustive(params, h0, first, vocab, max_len, alpha, min_len=0):
    """All hypotheses (eos-terminated or truncated at max_len) with their scores, best first."""
    out = []

    def rec(h, tok, prefix, total):
        logp, h = np_logp(params, h, tok)
        t = len(prefix)
        for v in range(vocab):
            if v == EOS and t < min_len:
                continue
            s = total + logp[v]
            if v == EOS or t + 1 == max_len:
                out.append((s / (t + 1) ** alpha, tuple(prefix) + (v,)))
            else:
                rec(h, v, prefix + [v], s)

    rec(np.asarray(h0, np.float64), first, [], 0.0)
    return sorted(out, key=lambda x: -x[0])


def expected_hist(first, tokens, t):
    """hash after consuming the input of step t: first, tokens[0], ..., tokens[t-1]."""
    hist = hash_step(0, first)
    for tok in tokens[:t]:
        hist = hash_step(hist, int(tok))
    return hist


# ---------------------------------------------------------------------------- fixtures


@functools.partial(jax.jit, static_argnames=("max_len", "beam_size", "min_len"))
def run_beam(params, state, first_tokens, alpha, *, max_len, beam_size, min_len=0):
    return decoding.beam_search(make_step_fn(params), state, bos_id=BOS, eos_id=EOS, max_len=max_len,
                                beam_size=beam_size, length_penalty=alpha, first_tokens=first_tokens,
                                min_len=min_len)


@functools.partial(jax.jit, static_argnames=("max_len", "min_len"))
def run_greedy(params, state, first_tokens, *, max_len, min_len=0):
    return decoding.greedy(make_step_fn(params), state, bos_id=BOS, eos_id=EOS, max_len=max_len,
                           first_tokens=first_tokens, min_len=min_len)


@functools.partial(jax.jit, static_argnames=("max_len", "temperature", "top_k", "top_p"))
def run_sample(params, state, rng, *, max_len, temperature, top_k=0, top_p=1.0):
    return decoding.sample(make_step_fn(params), state, rng, bos_id=BOS, eos_id=EOS, max_len=max_len,
                           temperature=temperature, top_k=top_k, top_p=top_p)


def check_hypotheses(res, params, state, first, alpha, max_len):
    """Every returned hypothesis: score = rescored by the oracle, eos/pad layout, aux aligned."""
    tokens, scores, lengths = map(np.asarray, (res.tokens, res.scores, res.lengths))
    hist, vec = np.asarray(res.aux["hist"]), np.asarray(res.aux["vec"])
    batch, beams, _ = tokens.shape
    for b, k in itertools.product(range(batch), range(beams)):
        n = int(lengths[b, k])
        assert 1 <= n <= max_len
        seq = tokens[b, k]
        assert (seq[n:] == 0).all() and (hist[b, k, n:] == 0).all() and (vec[b, k, n:] == 0).all()
        assert (seq[: n - 1] != EOS).all()
        assert seq[n - 1] == EOS or n == max_len
        np.testing.assert_allclose(scores[b, k], np_score(params, state["h"][b], first[b], seq, n, alpha),
                                   rtol=1e-5, atol=1e-5)
        for t in range(n):
            want = expected_hist(int(first[b]), seq, t)
            assert hist[b, k, t] == want, (b, k, t)
            np.testing.assert_allclose(vec[b, k, t, 0], np.sin(np.float32(want)), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy(seed):
    vocab, batch, max_len = 8, 5, 7
    params = make_params(seed, vocab, eos_bias=1.5)
    state = init_state(seed, batch)
    first = np.array([BOS, 3, 4, BOS, 7], np.int32)
    g = run_greedy(params, state, first, max_len=max_len)
    bm = run_beam(params, state, first, 0.0, max_len=max_len, beam_size=1)
    np.testing.assert_array_equal(bm.tokens, g.tokens)
    np.testing.assert_array_equal(bm.lengths, g.lengths)
    np.testing.assert_allclose(bm.scores, g.scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(bm.aux["hist"], g.aux["hist"])
    lengths = np.asarray(g.lengths)[:, 0]
    assert (lengths < max_len).any(), "test model should end some rows early"
    check_hypotheses(g, params, state, first, 0.0, max_len)
    # greedy really is the per-step argmax of the oracle
    for b in range(batch):
        h, tok = np.asarray(state["h"][b], np.float64), first[b]
        for t in range(int(lengths[b])):
            logp, h = np_logp(params, h, tok)
            assert g.tokens[b, 0, t] == np.argmax(logp)
            tok = int(g.tokens[b, 0, t])
    # with a length penalty, beam 1 still contains greedy's hypothesis as a candidate
    bm_lp = run_beam(params, state, first, 1.0, max_len=max_len, beam_size=1)
    greedy_norm = np.asarray(g.scores)[:, 0] / lengths.astype(np.float64)
    assert (np.asarray(bm_lp.scores)[:, 0] >= greedy_norm - 1e-5).all()


@pytest.mark.parametrize("vocab", [4, 5])
@pytest.mark.parametrize("min_len", [0, 2])
def test_beam_search_matches_exhaustive_search(vocab, min_len):
    max_len, batch = 4, 2
    # enough to make beam search exact: every prefix stays alive ((V-1)**(T-1)) and every
    # candidate of a step ranks within the top K ((V-1)**(T-2) * V).
    beams = max((vocab - 1) ** (max_len - 1), (vocab - 1) ** (max_len - 2) * vocab)
    first = np.array([BOS, 0], np.int32)
    for seed, alpha in itertools.product(range(3), [0.0, 0.7, 2.0]):
        params = make_params(seed, vocab, scale=3.0, eos_bias=1.0)
        state = init_state(seed, batch)
        res = run_beam(params, state, first, alpha, max_len=max_len, beam_size=beams, min_len=min_len)
        scores = np.asarray(res.scores)
        for b in range(batch):
            ref = exhaustive(params, state["h"][b], first[b], vocab, max_len, alpha, min_len)
            ref_scores = np.array([s for s, _ in ref[:beams]])
            np.testing.assert_allclose(scores[b], ref_scores, rtol=1e-5, atol=1e-5,
                                       err_msg=f"seed={seed} alpha={alpha} b={b}")
            if ref[0][0] - ref[1][0] > 1e-4:
                best = tuple(int(x) for x in np.asarray(res.tokens[b, 0, : int(res.lengths[b, 0])]))
                assert best == ref[0][1], (seed, alpha, b)
        check_hypotheses(res, params, state, first, alpha, max_len)


def test_beam_search_larger_model_sorted_consistent_and_beats_greedy():
    vocab, batch, max_len, beams = 12, 3, 8, 4
    params = make_params(7, vocab, scale=2.5, eos_bias=0.5)
    state = init_state(7, batch)
    first = np.full((batch,), BOS, np.int32)
    for alpha in (0.0, 1.0):
        res = run_beam(params, state, first, alpha, max_len=max_len, beam_size=beams)
        scores = np.asarray(res.scores)
        assert np.isfinite(scores).all()
        assert (np.diff(scores, axis=1) <= 0).all(), "beams must be sorted best first"
        assert res.tokens.shape == (batch, beams, max_len)
        assert res.aux["vec"].shape == (batch, beams, max_len, 2)
        check_hypotheses(res, params, state, first, alpha, max_len)
        # distinct hypotheses per example
        for b in range(batch):
            hyps = {tuple(np.asarray(res.tokens[b, k])) for k in range(beams)}
            assert len(hyps) == beams
        g = run_greedy(params, state, first, max_len=max_len)
        g_norm = np.asarray(g.scores)[:, 0] / np.asarray(g.lengths)[:, 0].astype(np.float64) ** alpha
        assert (scores[:, 0] >= g_norm - 1e-5).all()


def test_min_len_forbids_early_eos():
    vocab, batch, max_len = 6, 4, 6
    params = make_params(3, vocab, eos_bias=6.0)  # eos very likely at every step
    state = init_state(3, batch)
    first = np.full((batch,), BOS, np.int32)
    g0 = run_greedy(params, state, first, max_len=max_len)
    assert (np.asarray(g0.lengths) == 1).all()
    g = run_greedy(params, state, first, max_len=max_len, min_len=3)
    assert (np.asarray(g.lengths) == 4).all()
    bm = run_beam(params, state, first, 0.0, max_len=max_len, beam_size=3, min_len=3)
    assert (np.asarray(bm.lengths)[:, 0] == 4).all()
    assert (np.asarray(bm.tokens)[:, :, :3] != EOS).all()


def test_top_k_and_top_p_filters_hand_example():
    probs = np.array([[0.15, 0.5, 0.05, 0.3], [0.25, 0.25, 0.4, 0.1]], np.float32)
    logits = jnp.log(probs) + 3.0  # shift: filters must not depend on normalisation
    kept = lambda x: np.isfinite(np.asarray(x))
    np.testing.assert_array_equal(kept(decoding.top_p_filter(logits, 0.75)),
                                  [[False, True, False, True], [True, True, True, False]])
    np.testing.assert_array_equal(kept(decoding.top_p_filter(logits, 0.3)),
                                  [[False, True, False, False], [False, False, True, False]])
    np.testing.assert_array_equal(kept(decoding.top_p_filter(logits, 0.9)),
                                  [[True, True, False, True], [True, True, True, False]])
    np.testing.assert_array_equal(kept(decoding.top_p_filter(logits, 0.97)), np.ones((2, 4), bool))
    np.testing.assert_array_equal(kept(decoding.top_k_filter(logits, 1)),
                                  [[False, True, False, False], [False, False, True, False]])
    np.testing.assert_array_equal(kept(decoding.top_k_filter(logits, 3)),
                                  [[True, True, False, True], [True, True, True, False]])
    # kept entries are unchanged
    np.testing.assert_array_equal(np.asarray(decoding.top_p_filter(logits, 0.75))[0, [1, 3]],
                                  np.asarray(logits)[0, [1, 3]])
    with pytest.raises(ValueError, match="top_p"):
        decoding.top_p_filter(logits, 0.0)


def test_sampling_frequencies_follow_filtered_distribution():
    """One step from a fixed distribution: top-p 0.75 leaves {1: 0.5, 3: 0.3} renormalised."""
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)
    batch = 4000

    def step_fn(tokens, state, t):
        return jnp.broadcast_to(jnp.log(probs), (tokens.shape[0], 4)), state, None

    state = dict(dummy=jnp.zeros((batch,)))
    res = decoding.sample(step_fn, state, jax.random.key(0), bos_id=0, eos_id=2, max_len=1, top_p=0.75)
    counts = np.bincount(np.asarray(res.tokens[:, 0, 0]), minlength=4) / batch
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.5 / 0.8) < 0.03
    np.testing.assert_allclose(np.asarray(res.scores[:, 0]), np.log(probs)[np.asarray(res.tokens[:, 0, 0])],
                               rtol=1e-6)
    res_t = decoding.sample(step_fn, state, jax.random.key(0), bos_id=0, eos_id=2, max_len=1, temperature=0.5)
    counts_t = np.bincount(np.asarray(res_t.tokens[:, 0, 0]), minlength=4) / batch
    sharp = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(counts_t, sharp, atol=0.03)


def test_sampling_top_k_one_and_zero_temperature_equal_greedy():
    vocab, batch, max_len = 9, 6, 7
    params = make_params(11, vocab, eos_bias=1.0)
    state = init_state(11, batch)
    first = np.full((batch,), BOS, np.int32)
    g = run_greedy(params, state, first, max_len=max_len)
    for kwargs in (dict(temperature=1.0, top_k=1), dict(temperature=0.0), dict(temperature=1e-3),
                   dict(temperature=1.3, top_p=1e-6)):
        s = run_sample(params, state, jax.random.key(5), max_len=max_len, **kwargs)
        np.testing.assert_array_equal(s.tokens, g.tokens, err_msg=str(kwargs))
        np.testing.assert_allclose(s.scores, g.scores, rtol=1e-6, err_msg=str(kwargs))
        np.testing.assert_array_equal(s.aux["hist"], g.aux["hist"])
    # real sampling differs from greedy somewhere and is still self-consistent
    s = run_sample(params, state, jax.random.key(5), max_len=max_len, temperature=1.0)
    assert not np.array_equal(np.asarray(s.tokens), np.asarray(g.tokens))
    check_hypotheses(s, params, state, first, 0.0, max_len)
    s2 = run_sample(params, state, jax.random.key(5), max_len=max_len, temperature=1.0)
    np.testing.assert_array_equal(s.tokens, s2.tokens)  # deterministic given the key


def test_early_exit_counts_steps():
    calls = []
    vocab = 8

    def step_fn(tokens, state, t):
        jax.debug.callback(lambda: calls.append(1))
        logits = jnp.where(jnp.arange(vocab) == EOS, 10.0, 0.0)  # eos (prob ~0.9995) at every step
        return jnp.broadcast_to(logits, (tokens.shape[0], vocab)), state, None

    state = dict(x=jnp.zeros((3, 2)))
    g = decoding.greedy(step_fn, state, bos_id=BOS, eos_id=EOS, max_len=10)
    jax.effects_barrier()
    assert len(calls) == 1 and (np.asarray(g.lengths) == 1).all()
    calls.clear()
    # beam 2: step 0 finishes one hypothesis, step 1 fills the finished set with eos-terminated
    # hypotheses no alive one can beat -> stop after 2 of 10 steps.
    bm = jax.jit(lambda s: decoding.beam_search(step_fn, s, bos_id=BOS, eos_id=EOS, max_len=10, beam_size=2,
                                                length_penalty=0.0))(state)
    jax.effects_barrier()
    assert len(calls) == 2
    np.testing.assert_array_equal(bm.lengths, [[1, 2]] * 3)
    assert bm.aux is None
    calls.clear()
    decoding.beam_search(step_fn, state, bos_id=BOS, eos_id=EOS, max_len=10, beam_size=2, length_penalty=0.0,
                         min_len=4)
    jax.effects_barrier()
    assert len(calls) == 5  # eos forbidden at steps 0-3; step 4 finishes both beams


def test_contract_errors_are_clear():
    params = jax.tree.map(jnp.asarray, make_params(0, 6))
    step_fn = make_step_fn(params)
    good = init_state(0, 3)
    bad = dict(h=good["h"], hist=np.zeros((2,), np.int32))
    with pytest.raises(ValueError, match=r"\['hist'\].*leading dim"):
        decoding.greedy(step_fn, bad, bos_id=BOS, eos_id=EOS, max_len=4)

    def bad_dtype(tokens, state, t):
        logits, new, aux = step_fn(tokens, state, t)
        return logits, dict(h=new["h"].astype(jnp.bfloat16), hist=new["hist"]), aux

    with pytest.raises(ValueError, match=r"\['h'\].*dtype"):
        decoding.beam_search(bad_dtype, good, bos_id=BOS, eos_id=EOS, max_len=4, beam_size=2)
    with pytest.raises(ValueError, match="eos_id=9"):
        decoding.greedy(step_fn, good, bos_id=BOS, eos_id=9, max_len=4)
    with pytest.raises(TypeError, match="max_len"):
        decoding.greedy(step_fn, good, bos_id=BOS, eos_id=EOS, max_len=4.0)
    with pytest.raises(ValueError, match="first_tokens"):
        decoding.greedy(step_fn, good, bos_id=BOS, eos_id=EOS, max_len=4, first_tokens=np.zeros((3, 1), np.int32))
