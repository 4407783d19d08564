"""Text generation for the LMs of `vlm_jax.layers.decoder_lm` and `vlm_jax.layers.t5`, through
`vlm_jax.decoding`.

Dimension letters: B batch, N rows seen by the step function (B, or B*beam), T0 prompt
length, P soft-prefix length, S KV-cache length (prefilled positions + max_new_tokens),
Se encoder length, D width, E word-embedding width, V vocabulary.

Decoder-only LMs (`DecoderLM`, or any module method with the same decode contract):
  1. `prefill_decoder_lm` writes ``[prefix_embeds; prompt[:, :-1]]`` into a fresh KV cache
     of length S = P + T0 - 1 + max_new_tokens (position ids from the attention mask, so
     left-padded prompts get HF's positions) and returns the decoding state and the last
     prompt token of every row, which `vlm_jax.decoding` feeds first (``first_tokens``).
  2. `decoder_lm_step_fn` advances one token against the cache.
  State (every leaf has leading dim N, so beam search can reorder rows):
    cache       the Flax 'cache' collection (per-layer keys/values [N, S, H, K], cache_index [N])
    key_valid   bool [N, S]  which cache slots hold real tokens (False for padding)
    position    i32 [N]      position id of the token fed next
    row_inputs  dict of per-row extra inputs passed to every call (e.g. Flamingo's media_valid)
  ``prefill_inputs`` (e.g. Flamingo's latents) go to `init_cache` and the prefill only: a model
  that stores what it derives from them in its cache (cross-attention keys/values) reads them
  back at every step, so they are neither kept in the state nor re-projected per token.
Sessions (`session_start` / `session_extend` / `session_respond`): one decoder-only cache kept
across the turns of a dialogue; each turn's tokens (and a new image's keys/values) are written
once, replies decode from the cache as it stands.
Encoder-decoder (`T5`): `prefill_seq2seq` runs the encoder once and makes the decoder cache:
an empty self-attention cache (length max_new_tokens) and, per decoder layer, the
cross-attention keys/values of the encoder output ``[B, Se, H, K]``, projected once;
`seq2seq_step_fn` runs the decoder one token at a time from that cache. The encoder output
itself is not kept in the state (``cache_cross_kv=False`` keeps it and recomputes the
cross-attention keys/values at every step instead: the behaviour before the cross cache,
kept for comparisons).
  State: cache (self + cross KV cache), encoder_mask bool [N, Se] (+ encoded [N, Se, D]
  only with ``cache_cross_kv=False``).

`generate` / `generate_seq2seq` put it together with ``strategy`` 'greedy' | 'beam' |
'sample' and return `vlm_jax.decoding.DecodeResult` (tokens [B, K, max_new_tokens], no
prompt, eos then pad_id). Every function here is jittable with the integer and string
arguments static.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlm_jax import decoding
from vlm_jax.layers.attention import concrete_check, init_cache
from vlm_jax.layers.text_common import positions_from_mask

PyTree = Any
STRATEGIES = ("greedy", "beam", "sample")


# ------------------------------------------------------------------------ decoder-only
def prefill_decoder_lm(model, params, prompt_tokens, *, prompt_mask=None, max_new_tokens: int,
                       prefix_embeds=None, method: str | Callable | None = None,
                       row_inputs: dict | None = None, prefill_inputs: dict | None = None) -> tuple[jax.Array, dict]:
    """Fill a fresh KV cache with the prompt; -> ``(first_tokens i32[B], state)``.

    Args:
      model, params: a `DecoderLM` (or a module whose ``method`` takes ``tokens`` /
        ``inputs_embeds``, ``position_ids``, ``key_valid``, ``decode`` and ``**row_inputs``
        and returns an object with ``.logits [B, T, V]``) and its params.
      prompt_tokens: int ``[B, T0]``, T0 >= 1, LEFT padded (the last column must be real).
      prompt_mask: ``[B, T0]`` 1 = real token (default all ones).
      max_new_tokens: number of tokens to generate (fixes the cache length).
      prefix_embeds: optional ``[B, P, E]`` word-level embeddings put before the prompt
        (BLIP-2's projected queries); always attended.
      row_inputs: per-row extra keyword inputs ``{name: [B, ...]}`` for every call.
      prefill_inputs: extra keyword inputs for `init_cache` and the prefill call only (module
        doc; Flamingo: ``{'latents': [B, M, R, D]}`` with ``row_inputs={'media_valid': [B, M]}``,
        the media keys/values then projected once).
    """
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
        raise ValueError(f"prompt_tokens must be int [B, T0] with T0 >= 1; got shape {prompt_tokens.shape}.")
    b, t0 = prompt_tokens.shape
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    mask = jnp.ones((b, t0), bool) if prompt_mask is None else jnp.asarray(prompt_mask).astype(bool)
    if mask.shape != (b, t0):
        raise ValueError(f"prompt_mask must be [B, T0] = [{b}, {t0}]; got {mask.shape}.")
    concrete_check(jnp.all(mask[:, -1]), "prompt_mask[:, -1] has padding: generation needs LEFT-padded prompts "
                                          "(pad at the start, real tokens last).")
    p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    if prefix_embeds is not None and (prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != b):
        raise ValueError(f"prefix_embeds must be [B={b}, P, E]; got {prefix_embeds.shape}.")
    filled = p + t0 - 1                                          # positions written by the prefill
    s = filled + max_new_tokens
    full_mask = jnp.concatenate([jnp.ones((b, p), bool), mask], axis=1)          # [B, P + T0]
    positions = positions_from_mask(full_mask)                                    # [B, P + T0]
    row_inputs = dict(row_inputs or {})
    prefill_inputs = dict(prefill_inputs or {})
    if set(row_inputs) & set(prefill_inputs):
        raise ValueError(f"row_inputs and prefill_inputs share {sorted(set(row_inputs) & set(prefill_inputs))}.")
    kw = dict(row_inputs, **prefill_inputs, **({} if method is None else {"method": method}))
    cache = init_cache(model, params, jnp.zeros((b, s), jnp.int32), **kw)
    key_valid = jnp.zeros((b, s), bool).at[:, :filled].set(full_mask[:, :filled])
    if filled > 0:
        if p:
            word = model.apply({"params": params}, prompt_tokens[:, :-1], method="embed_tokens")
            inputs = dict(inputs_embeds=jnp.concatenate([prefix_embeds.astype(word.dtype), word], axis=1))
        else:
            inputs = dict(tokens=prompt_tokens[:, :-1])
        _, new_vars = model.apply({"params": params, "cache": cache}, **inputs, position_ids=positions[:, :filled],
                                  key_valid=key_valid, decode=True, mutable=["cache"], **kw)
        cache = new_vars["cache"]
    state = dict(cache=cache, key_valid=key_valid, position=positions[:, -1], row_inputs=row_inputs)
    return prompt_tokens[:, -1], state


def decoder_lm_step_fn(model, params, *, method: str | Callable | None = None) -> decoding.StepFn:
    """Step function ``(tokens i32[N], state, t) -> (logits f32[N, V], state, None)``
    for states made by `prefill_decoder_lm`."""
    extra = {} if method is None else {"method": method}

    def step(tokens, state, t):
        del t
        # the slot this token is written to: the per-row cache index of any attention layer
        index = _cache_index(state["cache"])                                     # i32[N]
        s = state["key_valid"].shape[1]
        key_valid = state["key_valid"] | (jnp.arange(s)[None, :] == index[:, None])
        out, new_vars = model.apply({"params": params, "cache": state["cache"]}, tokens=tokens[:, None],
                                    position_ids=state["position"][:, None], key_valid=key_valid, decode=True,
                                    mutable=["cache"], **state["row_inputs"], **extra)
        new_state = dict(cache=new_vars["cache"], key_valid=key_valid, position=state["position"] + 1,
                         row_inputs=state["row_inputs"])
        return out.logits[:, 0], new_state, None

    return step


def _cache_leaf(cache, name: str) -> jax.Array:
    """The first leaf called ``name`` ('cache_index' i32[N], 'cached_key' [N, S, H, K]) of a KV cache."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if getattr(path[-1], "key", None) == name:
            return leaf
    raise ValueError(f"the cache has no {name!r} leaf: was it made by vlm_jax.layers.attention.init_cache "
                     "for a model whose attention runs with decode=True?")


def _cache_index(cache) -> jax.Array:
    """i32[N]: the slot the next token is written to (every layer's index is the same; a
    scanned stack stores them as i32[N, G], one per scanned group)."""
    index = _cache_leaf(cache, "cache_index")
    return index if index.ndim == 1 else index.reshape(index.shape[0], -1)[:, 0]


def _cache_length(cache) -> int:
    """S, the self-attention cache length: 'cached_key' is [N, S, H, K], or [N, G, S, H, K] in a
    scanned stack."""
    key = _cache_leaf(cache, "cached_key")
    return key.shape[1] if key.ndim == 4 else key.shape[2]


# ------------------------------------------------------------------ decoding sessions
# A session keeps one decoder-only KV cache across calls (a multi-turn dialogue): each turn's
# tokens are written once, after the earlier ones, and replies are decoded from the cache as it
# stands, so a turn costs its own tokens (and its own media), not the whole conversation again.
#   session = dict(cache, key_valid bool[B, S], position i32[B], row_inputs, pending i32[B] | None)
# ``pending`` is the last token given and not yet written (`prefill_decoder_lm` keeps its
# prompt's last token the same way): `session_respond` feeds it first; the next
# `session_extend` writes it before the new tokens. ``position`` is its position id.

def session_start(model, params, *, batch_size: int, max_len: int, method: str | Callable | None = None,
                  row_inputs: dict | None = None, cache_inputs: dict | None = None) -> dict:
    """An empty session whose cache holds ``max_len`` tokens (S: every turn and every reply).

    ``row_inputs`` are passed to every call (Flamingo: ``media_valid [B, M]``, all False at the
    start); ``cache_inputs`` only to `init_cache`, to shape the cross-attention caches (Flamingo:
    ``latents [B, M, R, D]`` of zeros for the M media slots the dialogue may fill)."""
    row_inputs = dict(row_inputs or {})
    kw = dict(row_inputs, **dict(cache_inputs or {}), **({} if method is None else {"method": method}))
    cache = init_cache(model, params, jnp.zeros((batch_size, max_len), jnp.int32), **kw)
    return dict(cache=cache, key_valid=jnp.zeros((batch_size, max_len), bool),
                position=jnp.zeros((batch_size,), jnp.int32), row_inputs=row_inputs, pending=None)


def session_extend(model, params, session: dict, tokens, *, mask=None, method: str | Callable | None = None,
                   row_inputs: dict | None = None, call_inputs: dict | None = None) -> dict:
    """Append ``tokens [B, T]`` (``mask`` 1 = real; any padding pattern, the last column real) to
    the conversation -> the new session. Writes the pending token and ``tokens[:, :-1]`` into the
    cache at its index (positions continue each row's real tokens; padding slots stay invalid) and
    keeps ``tokens[:, -1]`` pending. ``row_inputs`` replace the session's (from this call on);
    ``call_inputs`` go to this call only (Flamingo: a new image's ``latents`` and
    ``media_offset``, so only its keys/values are projected). The earlier turns are not
    recomputed: their keys/values are read from the cache."""
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"session_extend: tokens must be int [B, T] with T >= 1; got shape {tokens.shape}.")
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask.shape != (b, t):
        raise ValueError(f"session_extend: mask must be [B, T] = [{b}, {t}]; got {mask.shape}.")
    concrete_check(jnp.all(mask[:, -1]), "session_extend: mask[:, -1] has padding; the last column must be real "
                                          "(it is kept pending for the reply).")
    if session["key_valid"].shape[0] != b:
        raise ValueError(f"session_extend: the session holds batch {session['key_valid'].shape[0]}, tokens {b}.")
    row_inputs = dict(session["row_inputs"] if row_inputs is None else row_inputs)
    pending = session["pending"]
    if pending is None:                       # the first turn: positions from 0
        seq, smask, base = tokens, mask, jnp.zeros((b,), jnp.int32)
    else:                                     # the pending token (real) goes first, at its position
        seq = jnp.concatenate([pending[:, None], tokens], axis=1)
        smask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        base = session["position"]
    positions = base[:, None] + jnp.cumsum(smask.astype(jnp.int32), axis=1) - 1        # [B, T'] (pads: unused)
    write, wmask, n = seq[:, :-1], smask[:, :-1], seq.shape[1] - 1
    cache, key_valid = session["cache"], session["key_valid"]
    if n:
        s = key_valid.shape[1]
        index = _cache_index(cache)                                                     # i32[B]
        concrete_check(jnp.all(index + n <= s), f"session_extend: {n} new tokens overflow the session's cache of "
                                                 f"{s} (session_start(max_len=...)).")
        slot = jnp.arange(s)[None, :] - index[:, None]                                  # [B, S] offset in this write
        new = jnp.take_along_axis(wmask, jnp.clip(slot, 0, n - 1), axis=1) & (slot >= 0) & (slot < n)
        key_valid = key_valid | new
        kw = dict(row_inputs, **dict(call_inputs or {}), **({} if method is None else {"method": method}))
        _, new_vars = model.apply({"params": params, "cache": cache}, tokens=write, position_ids=positions[:, :-1],
                                  key_valid=key_valid, decode=True, mutable=["cache"], **kw)
        cache = new_vars["cache"]
    elif call_inputs:
        raise ValueError("session_extend: call_inputs need at least one token to write (pass the turn's tokens "
                         "with them).")
    return dict(cache=cache, key_valid=key_valid, position=positions[:, -1], row_inputs=row_inputs,
                pending=seq[:, -1])


def session_used(session: dict) -> int:
    """How many cache slots the session has written (host int; its capacity is
    ``session['key_valid'].shape[1]``)."""
    return int(jax.device_get(_cache_index(session["cache"])).max())


def session_respond(model, params, session: dict, *, max_new_tokens: int, eos_id: int, pad_id: int = 0,
                    min_new_tokens: int = 0, strategy: str = "greedy", beam_size: int = 4,
                    length_penalty: float = 0.0, rng=None, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, method: str | Callable | None = None) -> decoding.DecodeResult:
    """Decode a reply from the session's cache (the pending token first), as `generate` does from
    a prefilled prompt. The session itself is unchanged: pass the chosen reply (up to its eos)
    with the next turn's tokens to `session_extend`, which writes it once."""
    if session["pending"] is None:
        raise ValueError("session_respond: the session is empty; session_extend it with a prompt first.")
    s = session["key_valid"].shape[1]
    concrete_check(jnp.all(_cache_index(session["cache"]) + max_new_tokens <= s),
                    f"session_respond: max_new_tokens={max_new_tokens} overflows the session's cache of {s} "
                    "(session_start(max_len=...)).")
    state = {k: session[k] for k in ("cache", "key_valid", "position", "row_inputs")}
    return _run(decoder_lm_step_fn(model, params, method=method), state, session["pending"], strategy=strategy,
                bos_id=pad_id, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, beam_size=beam_size, length_penalty=length_penalty, rng=rng,
                temperature=temperature, top_k=top_k, top_p=top_p)


# ---------------------------------------------------------------------- encoder-decoder
def prefill_seq2seq(model, params, input_tokens=None, *, input_mask=None, inputs_embeds=None,
                    max_new_tokens: int, cache_cross_kv: bool = True) -> dict:
    """Run the encoder and make the decoder cache (model: `T5`) -> state for `seq2seq_step_fn`:
    ``dict(cache, encoder_mask bool[B, Se])``.

    ``cache`` holds an empty self-attention cache of length ``max_new_tokens`` and each decoder
    layer's cross-attention keys/values of the encoder output (``cached_cross_key/value
    [B, Se, H, K]``), so the steps never see the encoder output. ``cache_cross_kv=False``
    adds ``encoded [B, Se, D]`` to the state and the steps recompute the cross-attention
    keys/values from it (slower; for comparisons)."""
    encoded, _ = model.apply({"params": params}, input_tokens, attention_mask=input_mask,
                             inputs_embeds=inputs_embeds, method="encode")
    b, se = encoded.shape[0], encoded.shape[1]
    enc_mask = jnp.ones((b, se), bool) if input_mask is None else jnp.asarray(input_mask).astype(bool)
    if enc_mask.shape != (b, se):
        raise ValueError(f"input_mask must be [B, Se] = [{b}, {se}]; got {enc_mask.shape}.")
    # decode=True with the encoder output: fills the cross-attention caches; self-attention stays empty
    cache = init_cache(model, params, jnp.zeros((b, max_new_tokens), jnp.int32), encoded, encoder_mask=enc_mask,
                       method="run_decoder")
    state = dict(cache=cache, encoder_mask=enc_mask)
    if not cache_cross_kv:
        state["encoded"] = encoded
    return state


def seq2seq_step_fn(model, params) -> decoding.StepFn:
    """Step function for states made by `prefill_seq2seq`: cross-attention reads the keys/values
    stored in the cache (or, when the state carries ``encoded``, recomputes them from it)."""
    def step(tokens, state, t):
        del t
        index = _cache_index(state["cache"])                                     # i32[N]
        s = _cache_length(state["cache"])
        (logits, _, _), new_vars = model.apply(
            {"params": params, "cache": state["cache"]}, tokens[:, None], state.get("encoded"),
            encoder_mask=state["encoder_mask"], decode=True, key_valid=jnp.ones((tokens.shape[0], s), bool),
            query_pos=index[:, None], method="run_decoder", mutable=["cache"])
        return logits[:, 0], dict(state, cache=new_vars["cache"]), None

    return step


# ------------------------------------------------------------------------------ drivers
def _run(step_fn, state, first_tokens, *, strategy, bos_id, eos_id, pad_id, max_new_tokens, min_new_tokens,
         beam_size, length_penalty, rng, temperature, top_k, top_p) -> decoding.DecodeResult:
    common = dict(bos_id=bos_id, eos_id=eos_id, max_len=max_new_tokens, min_len=min_new_tokens,
                  first_tokens=first_tokens, pad_id=pad_id)
    if strategy == "greedy":
        return decoding.greedy(step_fn, state, **common)
    if strategy == "beam":
        return decoding.beam_search(step_fn, state, beam_size=beam_size, length_penalty=length_penalty, **common)
    if strategy == "sample":
        if rng is None:
            raise ValueError("strategy='sample' needs rng=jax.random.key(...).")
        return decoding.sample(step_fn, state, rng, temperature=temperature, top_k=top_k, top_p=top_p, **common)
    raise ValueError(f"strategy={strategy!r}; use one of {STRATEGIES}.")


def generate(model, params, prompt_tokens, *, prompt_mask=None, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, min_new_tokens: int = 0, strategy: str = "greedy", beam_size: int = 4,
             length_penalty: float = 0.0, rng=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             prefix_embeds=None, method=None, row_inputs=None, prefill_inputs=None) -> decoding.DecodeResult:
    """Continue left-padded prompts ``[B, T0]`` with a decoder-only LM.

    Returns `DecodeResult` (tokens ``[B, K, max_new_tokens]``: only the new tokens; eos then
    ``pad_id``). ``min_new_tokens`` forbids eos before that many tokens (HF semantics).
    See `prefill_decoder_lm` for ``prefix_embeds`` / ``method`` / ``row_inputs`` / ``prefill_inputs``.
    """
    first, state = prefill_decoder_lm(model, params, prompt_tokens, prompt_mask=prompt_mask,
                                      max_new_tokens=max_new_tokens, prefix_embeds=prefix_embeds, method=method,
                                      row_inputs=row_inputs, prefill_inputs=prefill_inputs)
    return _run(decoder_lm_step_fn(model, params, method=method), state, first, strategy=strategy,
                bos_id=pad_id, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, beam_size=beam_size, length_penalty=length_penalty, rng=rng,
                temperature=temperature, top_k=top_k, top_p=top_p)


def generate_seq2seq(model, params, input_tokens=None, *, input_mask=None, inputs_embeds=None,
                     max_new_tokens: int, eos_id: int, decoder_start_id: int = 0, pad_id: int = 0,
                     min_new_tokens: int = 0, strategy: str = "greedy", beam_size: int = 4,
                     length_penalty: float = 0.0, rng=None, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, cache_cross_kv: bool = True) -> decoding.DecodeResult:
    """Generate with an encoder-decoder (`T5`) from ``input_tokens [B, Se]`` (or
    ``inputs_embeds [B, Se, D]``, e.g. BLIP-2's query prefix + prompt). The decoder starts
    from ``decoder_start_id`` (T5: the pad id 0), which is not part of the output.
    The cross-attention keys/values are computed once (``cache_cross_kv=False``: at every
    step, from the encoder output kept in the state; see `prefill_seq2seq`)."""
    state = prefill_seq2seq(model, params, input_tokens, input_mask=input_mask, inputs_embeds=inputs_embeds,
                            max_new_tokens=max_new_tokens, cache_cross_kv=cache_cross_kv)
    return _run(seq2seq_step_fn(model, params), state, None, strategy=strategy, bos_id=decoder_start_id,
                eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                beam_size=beam_size, length_penalty=length_penalty, rng=rng, temperature=temperature,
                top_k=top_k, top_p=top_p)
