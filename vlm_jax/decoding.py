"""Decoding: greedy search, beam search and sampling over one step-function contract.

Dimension letters:
  B  batch (examples)
  K  beams per example (1 for greedy and sampling)
  N  rows the step function sees: B * K for beam search, B otherwise
  V  vocabulary
  T  max_len, the number of generated positions (bos / prompt not included)

The step-function contract
--------------------------
Every model decodes through a function

    step_fn(tokens: i32[N], state, t: i32[]) -> (logits f32[N, V], new_state, aux)

  tokens     the previous token of every row (at t = 0: `first_tokens`, default bos).
  state      any pytree whose every leaf has leading dim N: the LSTM (h, c) plus the
             annotations of Show-Attend-Tell, the KV caches of a transformer LM, ...
             Anything that differs per row MUST be stored per row -- in particular a KV
             cache's write index is an i32[N] leaf, not a scalar -- because beam search
             reorders rows by gathering axis 0 of every leaf. Constants shared by all rows
             (weights) belong in the closure of `step_fn`, not in the state.
             `new_state` must have exactly the structure, shapes and dtypes of `state`
             (it is a `lax.while_loop` carry); this is checked with a clear error.
  t          i32[] number of tokens generated so far, i.e. the output position the
             logits predict (0, 1, ..., T-1). Useful for position embeddings.
  logits     unnormalised scores [N, V] (any float dtype; log-softmax is taken in float32).
  aux        None or a pytree of per-row arrays [N, ...] to record with the token chosen at
             this step (Show-Attend-Tell's attention alpha [N, L]). It is returned as
             [B, K, T, ...] aligned with `tokens`: aux[b, k, t] is what the step that
             produced tokens[b, k, t] returned for that hypothesis' own history.

The functions below take the state with leading dim B (one row per example); beam search
repeats every leaf K times (row b*K + k is beam k of example b). Prompted LMs prefill their
cache themselves and pass the last prompt token as `first_tokens`.

All functions are jittable (a `lax.while_loop` over fixed-size buffers that exits early once
every row is finished); the keyword arguments other than `length_penalty` and
`first_tokens` must be Python values (static under `jax.jit`).

Scores are sums of the model's log-probabilities (log-softmax of the raw logits, before any
temperature or top-k/top-p filtering); beam search divides by length**length_penalty, where
the length counts the eos token. Outputs hold no bos; after eos (or for rows never started)
they hold `pad_id`, and aux holds zeros.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
StepFn = Callable[[jax.Array, PyTree, jax.Array], tuple[jax.Array, PyTree, PyTree]]

__all__ = ["DecodeResult", "greedy", "beam_search", "sample", "top_k_filter", "top_p_filter"]


class DecodeResult(NamedTuple):
    """Output of every decoder (a pytree, so it can be returned from `jax.jit`).

    tokens:  i32[B, K, T]  generated tokens, no bos; eos then pad_id.
    scores:  f32[B, K]     sum log p (beam search: / length**length_penalty), best first.
    lengths: i32[B, K]     number of generated tokens including eos (T if eos never came).
    aux:     pytree [B, K, T, ...] of the step function's aux, aligned with tokens, or None.
    """
    tokens: jax.Array
    scores: jax.Array
    lengths: jax.Array
    aux: PyTree


# ----------------------------------------------------------------------------- helpers


def _static_int(value, name: str, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a Python int (it fixes buffer sizes / is static under jit); "
                        f"got {type(value).__name__}. Pass e.g. {name}=int(...) outside jit.") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return value


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _batch_size(state: PyTree, first_tokens) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if first_tokens is not None:
        first_tokens = jnp.asarray(first_tokens)
        if first_tokens.ndim != 1:
            raise ValueError(f"first_tokens must be i32[B] (one token per example); got shape {first_tokens.shape}.")
        batch = first_tokens.shape[0]
    elif leaves:
        leaf = leaves[0][1]
        if jnp.ndim(leaf) == 0:
            raise ValueError(f"state leaf {_path_str(leaves[0][0])} is a scalar; every state leaf needs a "
                             "leading batch dim B (store per-row values, e.g. a KV-cache index as i32[B]).")
        batch = jnp.shape(leaf)[0]
    else:
        raise ValueError("cannot infer the batch size: state has no array leaves and first_tokens is None. "
                         "Pass first_tokens=i32[B].")
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0 or shape[0] != batch:
            raise ValueError(f"state leaf {_path_str(path)} has shape {shape}, but every state leaf must have "
                             f"the batch size B={batch} as its leading dim (beam search gathers axis 0). "
                             "Store per-row values per row and keep shared constants in step_fn's closure.")
    return batch


def _first_tokens(first_tokens, batch: int, bos_id: int) -> jax.Array:
    if first_tokens is None:
        return jnp.full((batch,), bos_id, jnp.int32)
    return jnp.asarray(first_tokens).astype(jnp.int32)


def _check_step_fn(step_fn: StepFn, tokens: jax.Array, state: PyTree, eos_id: int, pad_id: int):
    """Abstractly evaluates one step; checks the contract; returns (V, aux ShapeDtypeStructs)."""
    rows = tokens.shape[0]
    try:
        logits, new_state, aux = jax.eval_shape(step_fn, tokens, state, jnp.zeros((), jnp.int32))
    except Exception as e:
        e.add_note(f"(raised while tracing step_fn(tokens i32[{rows}], state, t i32[]) in vlm_jax.decoding)")
        raise
    if len(logits.shape) != 2 or logits.shape[0] != rows:
        raise ValueError(f"step_fn must return logits of shape [N, V] = [{rows}, V]; got {logits.shape}.")
    vocab = logits.shape[1]
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= value < vocab:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab}) of step_fn's logits.")
    in_flat, in_tree = jax.tree_util.tree_flatten_with_path(state)
    out_flat, out_tree = jax.tree_util.tree_flatten_with_path(new_state)
    if in_tree != out_tree:
        raise ValueError(f"step_fn's new_state has structure {out_tree}, but the state passed in has {in_tree}; "
                         "return a state with the same pytree structure (it is a while_loop carry).")
    for (path, x), (_, y) in zip(in_flat, out_flat):
        if tuple(jnp.shape(x)) != tuple(y.shape) or jnp.result_type(x) != y.dtype:
            raise ValueError(f"step_fn changed state leaf {_path_str(path)} from {jnp.result_type(x)}"
                             f"{list(jnp.shape(x))} to {y.dtype}{list(y.shape)}; new_state must keep every "
                             "leaf's shape and dtype (cast with .astype(old.dtype) inside step_fn).")
    for path, a in jax.tree_util.tree_flatten_with_path(aux)[0]:
        if len(a.shape) == 0 or a.shape[0] != rows:
            raise ValueError(f"step_fn's aux leaf {_path_str(path)} has shape {a.shape}; aux leaves must be "
                             f"per-row arrays [N, ...] with N={rows}.")
    return vocab, aux


def _log_probs(logits: jax.Array, t: jax.Array, eos_id: int, min_len: int) -> jax.Array:
    """float32 log-softmax [..., V]; eos gets -inf while t < min_len."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if min_len > 0:
        is_eos = jnp.arange(logp.shape[-1]) == eos_id
        logp = jnp.where(is_eos & (t < min_len), -jnp.inf, logp)
    return logp


def _write(buffers: PyTree, values: PyTree, t: jax.Array, axis: int) -> PyTree:
    """buffers[..., t, ...] = values, with t on `axis` of every buffer leaf."""
    return jax.tree.map(
        lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), t, axis), buffers, values)


# ------------------------------------------------------------------- greedy & sampling


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of the last axis, sets the others to -inf. [..., V] -> [..., V].

    k = 0 (or k >= V) disables the filter. Values tied with the k-th largest are kept too.
    """
    k = _static_int(k, "top_k", 0)
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter over the last axis: [..., V] -> [..., V].

    Keeps the smallest set of most probable tokens whose total probability reaches p: a token
    (taken in order of decreasing probability) is kept iff the probability of the tokens
    before it is < p, so the most probable token is always kept. The rest get -inf.
    p = 1 disables the filter. Values tied with the last kept logit are kept too.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {p}.")
    if p == 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    # the smallest kept logit: sorted is descending, keep is a prefix.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _decode_rows(step_fn, state, choose, *, bos_id, eos_id, pad_id, max_len, min_len, first_tokens,
                 rng) -> DecodeResult:
    """Shared loop of greedy and sampling: one hypothesis per example (K = 1)."""
    max_len = _static_int(max_len, "max_len", 1)
    min_len = _static_int(min_len, "min_len", 0)
    batch = _batch_size(state, first_tokens)
    tokens0 = _first_tokens(first_tokens, batch, bos_id)
    _, aux_shape = _check_step_fn(step_fn, tokens0, state, eos_id, pad_id)

    carry = dict(
        t=jnp.zeros((), jnp.int32),
        token=tokens0,                                                     # i32[B] next input
        seq=jnp.full((batch, max_len), pad_id, jnp.int32),                 # i32[B, T]
        logp=jnp.zeros((batch,), jnp.float32),                             # f32[B]
        length=jnp.full((batch,), max_len, jnp.int32),                     # i32[B]
        finished=jnp.zeros((batch,), bool),                                # bool[B]
        aux=jax.tree.map(lambda a: jnp.zeros((batch, max_len) + a.shape[1:], a.dtype), aux_shape),
        state=state,
        rng=rng,
    )

    def cond(c):
        return (c["t"] < max_len) & ~jnp.all(c["finished"])

    def body(c):
        t = c["t"]
        logits, new_state, aux_t = step_fn(c["token"], c["state"], t)
        logp = _log_probs(logits, t, eos_id, min_len)                      # f32[B, V]
        rng, key = (None, None) if c["rng"] is None else jax.random.split(c["rng"])
        token = choose(logp, key).astype(jnp.int32)                        # i32[B]
        live = ~c["finished"]
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
        out = jnp.where(live, token, pad_id)
        aux_t = jax.tree.map(lambda a: jnp.where(live.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0), aux_t)
        ends = live & (token == eos_id)
        return dict(
            t=t + 1,
            token=out,
            seq=_write(c["seq"], out, t, axis=1),
            logp=c["logp"] + jnp.where(live, token_logp, 0.0),
            length=jnp.where(ends, t + 1, c["length"]),
            finished=c["finished"] | ends,
            aux=_write(c["aux"], aux_t, t, axis=1),
            state=new_state,
            rng=rng,
        )

    c = jax.lax.while_loop(cond, body, carry)
    return DecodeResult(tokens=c["seq"][:, None], scores=c["logp"][:, None], lengths=c["length"][:, None],
                        aux=jax.tree.map(lambda a: a[:, None], c["aux"]))


def greedy(step_fn: StepFn, state: PyTree, *, bos_id: int, eos_id: int, max_len: int,
           first_tokens: jax.Array | None = None, min_len: int = 0, pad_id: int = 0) -> DecodeResult:
    """Greedy search: at each step the most probable token (argmax of the log-probabilities).

    Args:
      step_fn: see the module docstring.
      state: pytree, every leaf [B, ...].
      bos_id: first input token of every row when `first_tokens` is None.
      eos_id: ends a row (the eos is written and counted in the length).
      max_len: T, number of generated positions.
      first_tokens: optional i32[B] first input tokens (e.g. the last prompt token of a
        prefilled LM); default bos_id.
      min_len: eos is forbidden at steps t < min_len (so an eos-terminated output has at
        least min_len tokens before its eos; HF's `min_new_tokens` semantics).
      pad_id: fills positions after eos.
    Returns:
      DecodeResult with K = 1; scores = sum of log p of the generated tokens.
    """
    return _decode_rows(step_fn, state, lambda logp, key: jnp.argmax(logp, axis=-1), bos_id=bos_id,
                        eos_id=eos_id, pad_id=pad_id, max_len=max_len, min_len=min_len,
                        first_tokens=first_tokens, rng=None)


def sample(step_fn: StepFn, state: PyTree, rng: jax.Array, *, bos_id: int, eos_id: int, max_len: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           first_tokens: jax.Array | None = None, min_len: int = 0, pad_id: int = 0) -> DecodeResult:
    """Ancestral sampling with temperature, top-k and top-p (nucleus) filtering.

    Per step: logits/temperature, then `top_k_filter`, then `top_p_filter`, then a draw from
    the categorical (rng split once per step). temperature = 0 is greedy (argmax).
    top_k = 0 and top_p = 1 disable those filters. Other arguments as in `greedy`.

    Returns:
      DecodeResult with K = 1; scores = sum of the model's log p of the sampled tokens
      (unfiltered, temperature 1), so they are comparable with greedy's.
    """
    try:
        temperature = float(temperature)
        top_p = float(top_p)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError("temperature and top_p must be Python floats (static under jit).") from None
    top_k = _static_int(top_k, "top_k", 0)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}.")

    def choose(logp, key):
        if temperature == 0.0:
            return jnp.argmax(logp, axis=-1)
        scaled = top_p_filter(top_k_filter(logp / temperature, top_k), top_p)
        return jax.random.categorical(key, scaled, axis=-1)

    return _decode_rows(step_fn, state, choose, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                        min_len=min_len, first_tokens=first_tokens, rng=rng)


# ------------------------------------------------------------------------- beam search


def _gather_beams(tree: PyTree, idx: jax.Array) -> PyTree:
    """tree leaves [B, K_in, ...], idx i32[B, K_out] -> leaves [B, K_out, ...]."""
    def take(x):
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return jax.tree.map(take, tree)


def beam_search(step_fn: StepFn, state: PyTree, *, bos_id: int, eos_id: int, max_len: int, beam_size: int,
                length_penalty: float | jax.Array = 0.0, first_tokens: jax.Array | None = None,
                min_len: int = 0, pad_id: int = 0) -> DecodeResult:
    """Beam search with separate alive and finished hypothesis sets.

    Each step extends the K alive hypotheses of every example by every token and ranks the
    2K best candidates by sum log p. Those among the top K that end in eos -- and, at the last
    step, all of the top K (truncated at T, length T) -- enter the finished set, which keeps
    the K best by score = sum log p / length**length_penalty (length counts the eos); the K
    best non-eos candidates stay alive (2K candidates guarantee K of them). An eos candidate
    ranked below K is dropped, as in Hugging Face's beam search. The state (every leaf's axis 0) and the aux buffers are
    reordered with the beams. A row stops changing once no alive hypothesis can still beat
    its K-th finished one (the bound uses that sum log p only decreases); the loop exits
    when every example is done or after T steps.

    With beam_size = 1 and length_penalty = 0 this returns exactly `greedy`'s result; with
    length_penalty > 0 it may find a longer hypothesis with a better normalised score.

    Args:
      step_fn: see the module docstring; it sees N = B * beam_size rows.
      state: pytree, every leaf [B, ...] (repeated to [B*K, ...] here, row b*K + k).
      beam_size: K.
      length_penalty: alpha (0 = plain sum of log-probabilities); may be a traced scalar.
      other arguments: as in `greedy`.
    Returns:
      DecodeResult, hypotheses sorted best first. If fewer than K distinct hypotheses exist
      (tiny V * T), the extra slots have score -inf.
    """
    max_len = _static_int(max_len, "max_len", 1)
    min_len = _static_int(min_len, "min_len", 0)
    beams = _static_int(beam_size, "beam_size", 1)
    batch = _batch_size(state, first_tokens)
    rows = batch * beams
    tokens0 = _first_tokens(first_tokens, batch, bos_id)
    state = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), beams, axis=0), state)     # [N, ...]
    vocab, aux_shape = _check_step_fn(step_fn, jnp.repeat(tokens0, beams), state, eos_id, pad_id)
    alpha = jnp.asarray(length_penalty, jnp.float32)
    neg_inf = jnp.float32(-jnp.inf)

    def norm(length):
        return length.astype(jnp.float32) ** alpha

    def empty_aux(k):
        return jax.tree.map(lambda a: jnp.zeros((batch, k, max_len) + a.shape[1:], a.dtype), aux_shape)

    carry = dict(
        t=jnp.zeros((), jnp.int32),
        alive_token=jnp.repeat(tokens0[:, None], beams, axis=1),                  # i32[B, K]
        alive_seq=jnp.full((batch, beams, max_len), pad_id, jnp.int32),           # i32[B, K, T]
        # only beam 0 is live at the start, so the K copies do not yield duplicates.
        alive_logp=jnp.where(jnp.arange(beams) == 0, 0.0, neg_inf)[None].repeat(batch, 0),  # f32[B, K]
        alive_aux=empty_aux(beams),
        state=state,
        fin_seq=jnp.full((batch, beams, max_len), pad_id, jnp.int32),
        fin_score=jnp.full((batch, beams), neg_inf),                              # sorted descending
        fin_len=jnp.zeros((batch, beams), jnp.int32),
        fin_aux=empty_aux(beams),
    )

    def row_done(c):
        # Upper bound of any future finished score of an alive hypothesis with sum s <= 0:
        # s' <= s and length in [t+1, T], so score <= s / max((t+1)**alpha, T**alpha).
        best_alive = jnp.max(c["alive_logp"], axis=1)
        bound = best_alive / jnp.maximum(norm(c["t"] + 1), norm(jnp.int32(max_len)))
        return c["fin_score"][:, -1] >= bound                                     # bool[B]

    def cond(c):
        return (c["t"] < max_len) & ~jnp.all(row_done(c))

    def body(c):
        t = c["t"]
        logits, new_state, aux_t = step_fn(c["alive_token"].reshape(rows), c["state"], t)
        logp = _log_probs(logits, t, eos_id, min_len).reshape(batch, beams, vocab)
        cand = (c["alive_logp"][:, :, None] + logp).reshape(batch, beams * vocab)
        cand_logp, cand_idx = jax.lax.top_k(cand, 2 * beams)                       # [B, 2K]
        cand_beam = cand_idx // vocab
        cand_token = (cand_idx % vocab).astype(jnp.int32)
        cand_seq = _write(_gather_beams(c["alive_seq"], cand_beam), cand_token, t, axis=2)
        aux_t = jax.tree.map(lambda a: a.reshape((batch, beams) + a.shape[1:]), aux_t)
        cand_aux = _write(_gather_beams(c["alive_aux"], cand_beam), _gather_beams(aux_t, cand_beam), t, axis=2)
        is_eos = cand_token == eos_id

        # finished set: the K best of (old finished, candidates that end here). Only the K
        # best-ranked candidates of this step may end, so an eos ranked below K (which a
        # K-beam would not have kept) is dropped: this makes beam 1 exactly greedy.
        ends = (is_eos | (t == max_len - 1)) & (jnp.arange(2 * beams) < beams)[None]
        cand_score = jnp.where(ends, cand_logp / norm(t + 1), neg_inf)
        pool_score = jnp.concatenate([c["fin_score"], cand_score], axis=1)         # [B, 3K]
        fin_score, fin_idx = jax.lax.top_k(pool_score, beams)
        pool_len = jnp.concatenate([c["fin_len"], jnp.full((batch, 2 * beams), t + 1, jnp.int32)], axis=1)
        pool_seq = jnp.concatenate([c["fin_seq"], cand_seq], axis=1)
        pool_aux = jax.tree.map(lambda f, a: jnp.concatenate([f, a], axis=1), c["fin_aux"], cand_aux)

        # alive set: the K best candidates that did not emit eos.
        alive_logp, alive_idx = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logp), beams)
        source = jnp.take_along_axis(cand_beam, alive_idx, axis=1)                 # [B, K]
        rows_idx = (jnp.arange(batch)[:, None] * beams + source).reshape(rows)
        return dict(
            t=t + 1,
            alive_token=jnp.take_along_axis(cand_token, alive_idx, axis=1),
            alive_seq=_gather_beams(cand_seq, alive_idx),
            alive_logp=alive_logp,
            alive_aux=_gather_beams(cand_aux, alive_idx),
            state=jax.tree.map(lambda x: jnp.take(x, rows_idx, axis=0), new_state),
            fin_seq=_gather_beams(pool_seq, fin_idx),
            fin_score=fin_score,
            fin_len=jnp.take_along_axis(pool_len, fin_idx, axis=1),
            fin_aux=_gather_beams(pool_aux, fin_idx),
        )

    c = jax.lax.while_loop(cond, body, carry)
    return DecodeResult(tokens=c["fin_seq"], scores=c["fin_score"], lengths=c["fin_len"], aux=c["fin_aux"])
