"""Show, Attend and Tell (Xu et al., 2015): an LSTM captioner with soft or hard visual attention.

Dimension letters:
  B batch, N rows being decoded (batch * beam), S image side, G annotation grid side,
  L = G*G annotation locations, C encoder channels, D annotation width, A attention width,
  E word-embedding width, n LSTM units (the paper's n), T caption length (with <bos>), V vocabulary.

The paper's mechanism, in the notation of its Section 3 (all of it lives in `SATModel._step`):

  annotations      a = {a_1 .. a_L}, a_i in R^D     (CNN grid [B, G, G, C] -> optional 1x1 proj. -> [B, L, D])
                   [deviation `position_embedding`: a_i + p_i, p a learned or fixed 2-D sin-cos table
                   [L, D], or [a_i; p_i] with a [L, P] table (`position_dim` = P); the paper's
                   annotations carry no explicit position]
  attention score  e_ti = w . tanh(W_a a_i + W_h h_{t-1})  (W_a a is computed once per image)
                   [deviation `attention_query='hidden+word'`: + W_y E y_{t-1}, so the attention that
                   produces word t knows word t-1 (the paper's f_att sees h_{t-1} only, which does not
                   contain the word beam search just chose)]
  weights          alpha_t = softmax_i(e_ti)                                   [B, L]
  gate             beta_t = sigmoid(f_beta(h_{t-1}))   (a scalar per caption and step; 1 if gate=False)
  context          soft: z_t = beta_t * sum_i alpha_ti a_i
                   hard: s_t ~ Categorical(alpha_t), z_t = beta_t * a_{s_t}; during training each
                   caption uses the expectation sum_i alpha_ti a_i instead with probability
                   `hard_sample_fraction` (the paper's 0.5); outside training the expectation
                   (`hard_decode='expectation'`, the paper's test rule) or the argmax cell a_{argmax alpha_t}
  initial state    h_0 = tanh(f_init,h(mean_i a_i)),  c_0 = tanh(f_init,c(mean_i a_i))
  LSTM             [i; f; o; g] = T([E y_{t-1}; z_t]) + U h_{t-1};  c_t = f*c_{t-1} + i*tanh(g);
                   h_t = o * tanh(c_t)   (i, f, o through sigmoid)
  deep output      p(y_t | a, y_<t) = softmax(L_o dropout(E y_{t-1} + L_h h_t + L_z z_t))

`SATModel.__call__` runs this teacher-forced over a caption with `nn.scan`; `encode`,
`init_decode_state` and `decode_step` expose the same step one token at a time for beam search
(`vlm_jax.decoding`), and match the teacher-forced forward exactly.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.cnn import adaptive_avg_pool, grid_sincos_embedding

Dtype = Any
State = dict[str, jax.Array]

ENCODERS = ("cnn", "resnet")
ATTENTIONS = ("soft", "hard")
POSITION_EMBEDDINGS = ("none", "learned", "sincos")
ATTENTION_QUERIES = ("hidden", "hidden+word")
HARD_DECODES = ("expectation", "argmax")


def _dense(features: int, names: tuple[str | None, str | None], *, use_bias: bool = True,
           kernel_init=nn.initializers.lecun_normal(), dtype: Dtype, param_dtype: Dtype,
           name: str | None = None) -> nn.Dense:
    """nn.Dense whose kernel carries logical axis names `names` (bias: names[1])."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name)


class SATModel(nn.Module):
    """Show, Attend and Tell captioner.

    Attributes (config.model fields of the same meaning, see docs/interfaces.md):
      vocab_size: V.
      encoder_kind: 'cnn' (a `GridCNN`: ``encoder(images)``) | 'resnet' (a `ResNet`:
        ``encoder(images, train=...)``, BatchNorm statistics in 'batch_stats').
      encoder: the encoder module (built by the task from config.model, or from the HF
        checkpoint that initialises it); maps images [B, S, S, 3] to a feature map [B, h, w, C].
      grid: G; the annotation grid is G x G, L = G*G.
      annotation_dim: D; a 1x1 projection maps the encoder's C channels to D when C != D.
      embed_dim: E.  hidden_dim: n.  attention_dim: A.
      dropout: rate on the deep-output layer (before L_o), training only.
      attention: 'soft' | 'hard'.
      gate: use the beta gate (else beta = 1).
      position_embedding: 'none' (paper) | 'learned' (a trainable [L, D] table, init N(0, 0.02^2)) |
        'sincos' (fixed 2-D sine-cosine table: half of D encodes the row, half the column), added
        to the annotations so the attention scores and the context z_t can use where a cell is.
      position_dim: 0 = p_i has D dims and is added, a_i + p_i (content and position share every
        dimension); P > 0 = p_i has P dims and is concatenated, [a_i; p_i] in R^{D+P}, so content
        and position reach W_a, the LSTM and the deep output through separate weights.
      position_scale: multiplies the 'sincos' table (rows have norm sqrt(D/2), comparable to the
        CNN's annotations, which a full-scale table drowns: README ablation).
      attention_query: 'hidden' (paper: f_att(a_i, h_{t-1})) | 'hidden+word' (adds W_y E y_{t-1}).
      hard_sample_fraction: probability that a caption uses the expected context instead of a
        sampled location while training with hard attention (paper: 0.5).
      hard_decode: hard attention outside training: 'expectation' (paper) | 'argmax' (the
        context of the most attended cell, the closest deterministic stand-in for a sample).
      freeze_encoder: the encoder output is wrapped in stop_gradient and a ResNet runs its
        BatchNorm in inference mode (the optimizer freezes the encoder params, see the task).
      dtype: compute dtype. param_dtype: parameter dtype (float32).

    RNG collections: 'dropout' (dropout), 'hard' (hard-attention sampling); both only with train=True.
    """

    vocab_size: int
    encoder: nn.Module
    encoder_kind: str = "cnn"
    grid: int = 14
    annotation_dim: int = 512
    embed_dim: int = 512
    hidden_dim: int = 1024
    attention_dim: int = 512
    dropout: float = 0.0
    attention: str = "soft"
    gate: bool = True
    position_embedding: str = "none"
    position_scale: float = 1.0
    position_dim: int = 0
    attention_query: str = "hidden"
    hard_sample_fraction: float = 0.5
    hard_decode: str = "expectation"
    freeze_encoder: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.encoder_kind not in ENCODERS:
            raise ValueError(f"model.encoder={self.encoder_kind!r} is not supported; use one of {ENCODERS}.")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"model.attention={self.attention!r} is not supported; use 'soft' or 'hard'.")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"model.position_embedding={self.position_embedding!r} is not supported; "
                             f"use one of {POSITION_EMBEDDINGS}.")
        if self.attention_query not in ATTENTION_QUERIES:
            raise ValueError(f"model.attention_query={self.attention_query!r} is not supported; "
                             f"use one of {ATTENTION_QUERIES}.")
        if self.vocab_size < 4:
            raise ValueError(f"model.vocab_size={self.vocab_size}: set it from the tokenizer "
                             "(tokenizer.vocab_size) before building the SAT model.")
        if self.hard_decode not in HARD_DECODES:
            raise ValueError(f"model.hard_decode={self.hard_decode!r} is not supported; use one of {HARD_DECODES}.")
        if not 0.0 <= self.hard_sample_fraction <= 1.0:
            raise ValueError(f"model.hard_sample_fraction={self.hard_sample_fraction} must be in [0, 1].")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1).")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder_proj = _dense(self.annotation_dim, ("embed", "hidden"), **kw)
        # h_0, c_0 = tanh(f_init(mean a))
        self.init_h = _dense(self.hidden_dim, ("embed", "hidden"), **kw)
        self.init_c = _dense(self.hidden_dim, ("embed", "hidden"), **kw)
        # e_ti = w . tanh(W_a a_i + W_h h_{t-1})
        self.att_a = _dense(self.attention_dim, ("embed", "hidden"), **kw)                  # W_a (+ bias)
        self.att_h = _dense(self.attention_dim, ("embed", "hidden"), use_bias=False, **kw)  # W_h
        self.att_w = _dense(1, ("hidden", None), use_bias=False, **kw)                      # w
        if self.attention_query == "hidden+word":
            self.att_y = _dense(self.attention_dim, ("embed", "hidden"), use_bias=False, **kw)  # W_y
        if self.position_embedding == "learned":
            self.pos_embed = self.param(
                "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (self.grid * self.grid, self.position_dim or self.annotation_dim), self.param_dtype)  # p  [L, P or D]
        if self.gate:
            self.gate_beta = _dense(1, ("embed", None), **kw)                                # f_beta
        self.embed = nn.Embed(
            self.vocab_size, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.embed_dim ** -0.5), ("vocab", "embed")))
        # LSTM: gates = T [E y_{t-1}; z_t] + U h_{t-1}
        self.lstm_x = _dense(4 * self.hidden_dim, ("embed", "hidden"), **kw)
        self.lstm_h = _dense(4 * self.hidden_dim, ("embed", "hidden"), use_bias=False,
                             kernel_init=nn.initializers.orthogonal(), **kw)
        # deep output: L_o(E y_{t-1} + L_h h_t + L_z z_t)
        self.out_h = _dense(self.embed_dim, ("embed", "hidden"), use_bias=False, **kw)       # L_h
        self.out_z = _dense(self.embed_dim, ("embed", "hidden"), use_bias=False, **kw)       # L_z
        self.out_o = _dense(self.vocab_size, ("embed", "vocab"), **kw)                       # L_o
        self.out_dropout = nn.Dropout(self.dropout)

    # ------------------------------------------------------------------ encoder
    def encode(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images f32[B, S, S, 3] -> annotations a [B, L, D] (L = grid*grid; [B, L, D + P] with a
        concatenated position table, position_dim = P)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"SATModel.encode: images must be [B, S, S, 3] (NHWC, RGB), got shape {images.shape}.")
        if self.encoder_kind == "cnn":
            feats = self.encoder(images)
        else:
            feats = self.encoder(images, train=train and not self.freeze_encoder)
        feats = adaptive_avg_pool(feats, (self.grid, self.grid))                # [B, G, G, C]
        if self.freeze_encoder:
            feats = jax.lax.stop_gradient(feats)
        if feats.shape[-1] != self.annotation_dim:
            feats = self.encoder_proj(feats)                                     # 1x1 conv C -> D
        b, g, _, d = feats.shape
        a = feats.reshape(b, g * g, d).astype(self.dtype)
        if self.position_embedding != "none":
            if self.position_embedding == "learned":
                p = self.pos_embed                                                       # [L, P or D]
            else:
                p = self.position_scale * grid_sincos_embedding(g, self.position_dim or d)
            p = p.astype(self.dtype)[None]
            if self.position_dim:
                a = jnp.concatenate([a, jnp.broadcast_to(p, (b,) + p.shape[1:])], axis=-1)   # [a_i; p_i]  [B, L, D+P]
            else:
                a = a + p                                                                # a_i + p_i  [B, L, D]
        return nn.with_logical_constraint(a, ("activation_batch", None, None))

    # ------------------------------------------------------------------ decoder
    def init_decode_state(self, annotations: jax.Array) -> State:
        """annotations [B, L, D] -> state dict (every leaf has leading dim B):

        h f32[B, n], c f32[B, n]    h_0, c_0 = tanh(f_init(mean_i a_i))
        annotations [B, L, D]       a
        projected [B, L, A]         W_a a_i + b (computed once per image)
        """
        width = self.annotation_dim + (self.position_dim if self.position_embedding != "none" else 0)
        if annotations.ndim != 3 or annotations.shape[-1] != width:
            raise ValueError(f"SATModel.init_decode_state: annotations must be [B, L, {width}], "
                             f"got shape {annotations.shape}; pass the output of encode().")
        mean_a = annotations.mean(axis=1)
        return dict(
            h=jnp.tanh(self.init_h(mean_a)).astype(jnp.float32),
            c=jnp.tanh(self.init_c(mean_a)).astype(jnp.float32),
            annotations=annotations,
            projected=self.att_a(annotations),
        )

    def _step(self, state: State, y_prev: jax.Array, use_sample: jax.Array | None,
              train: bool, drop_scale: jax.Array | None = None) -> tuple[State, dict[str, jax.Array]]:
        """One time step t. y_prev i32[N] (y_{t-1}); use_sample bool[N] (hard + train; None: the
        expected context for every row, nothing sampled); drop_scale f32[N, E] (train: a given
        dropout mask, 0 or 1/keep, in place of drawing one).

        -> (new state, dict(logits f32[N, V], alpha f32[N, L], beta f32[N],
                            sample_logp f32[N] (log alpha_{t,s_t}; 0 where the expectation is used),
                            entropy f32[N] (H[alpha_t]))).
        """
        h, c, a, wa = state["h"], state["c"], state["annotations"], state["projected"]
        emb = self.embed(y_prev)                                                  # E y_{t-1}  [N, E]
        # e_ti = w . tanh(W_a a_i + W_h h_{t-1} [+ W_y E y_{t-1}]);  alpha_t = softmax_i e_ti
        query = self.att_h(h)                                                     # [N, A]
        if self.attention_query == "hidden+word":
            query = query + self.att_y(emb)
        e = self.att_w(jnp.tanh(wa + query[:, None, :]))[..., 0]                  # [N, L]
        log_alpha = jax.nn.log_softmax(e.astype(jnp.float32), axis=-1)
        alpha = jnp.exp(log_alpha)
        entropy = -jnp.sum(alpha * log_alpha, axis=-1)                            # H[alpha_t]  [N]
        expected = jnp.einsum("nl,nld->nd", alpha.astype(a.dtype), a)             # sum_i alpha_ti a_i
        sample_logp = jnp.zeros_like(entropy)
        if self.attention == "hard" and train and use_sample is not None:
            s = jax.random.categorical(self.make_rng("hard"), log_alpha, axis=-1)  # s_t ~ alpha_t  [N]
            sampled = jnp.take_along_axis(a, s[:, None, None], axis=1)[:, 0]      # a_{s_t}  [N, D]
            ctx = jnp.where(use_sample[:, None], sampled, expected)
            logp_s = jnp.take_along_axis(log_alpha, s[:, None], axis=1)[:, 0]
            sample_logp = jnp.where(use_sample, logp_s, 0.0)
        elif self.attention == "hard" and not train and self.hard_decode == "argmax":
            best = jnp.argmax(alpha, axis=-1)                                    # argmax_i alpha_ti  [N]
            ctx = jnp.take_along_axis(a, best[:, None, None], axis=1)[:, 0]      # a_{argmax}  [N, D]
        else:
            ctx = expected
        if self.gate:
            beta = jax.nn.sigmoid(self.gate_beta(h)[:, 0].astype(jnp.float32))   # beta_t  [N]
        else:
            beta = jnp.ones(h.shape[:1], jnp.float32)
        z = beta[:, None].astype(ctx.dtype) * ctx                                 # z_t  [N, D]
        # LSTM on [E y_{t-1}; z_t] and h_{t-1}
        gates = (self.lstm_x(jnp.concatenate([emb, z], axis=-1)) + self.lstm_h(h)).astype(jnp.float32)
        i, f, o, g = jnp.split(gates, 4, axis=-1)
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        # deep output: L_o(E y_{t-1} + L_h h_t + L_z z_t)
        deep = emb + self.out_h(h_new) + self.out_z(z)
        if drop_scale is not None and train:
            deep = deep * drop_scale.astype(deep.dtype)
        else:
            deep = self.out_dropout(deep, deterministic=not train)
        logits = self.out_o(deep).astype(jnp.float32)                            # [N, V]
        new_state = dict(h=h_new, c=c_new, annotations=a, projected=wa)
        return new_state, dict(logits=logits, alpha=alpha, beta=beta, sample_logp=sample_logp, entropy=entropy)

    def decode_step(self, tokens: jax.Array, state: State) -> tuple[jax.Array, State, jax.Array]:
        """tokens i32[N] (previous word), state (leading dim N) -> (logits f32[N, V], new state, alpha f32[N, L]).

        Inference step (no dropout; hard attention uses the expected context).
        """
        if tokens.ndim != 1:
            raise ValueError(f"SATModel.decode_step: tokens must be i32[N] (one previous word per row), "
                             f"got shape {tokens.shape}.")
        new_state, out = self._step(state, tokens, None, train=False)
        return out["logits"], new_state, out["alpha"]

    # ------------------------------------------------------------------ teacher forcing
    def __call__(self, images: jax.Array, tokens: jax.Array, *, train: bool,
                 expectation_prob: jax.Array | float | None = None,
                 with_reference: bool = False) -> dict[str, jax.Array]:
        """Teacher-forced forward. images f32[B, S, S, 3], tokens i32[B, T] (<bos> w1 .. <eos> <pad>..).

        expectation_prob (hard attention, training): probability that a caption uses the expected
        context instead of sampled locations; None = `hard_sample_fraction` (the task schedules it).
        with_reference (hard attention, training): also decode every caption with the expected
        context at every step, from the same annotations (the encoder runs once) and with the same
        dropout masks as the main pass -> ``reference_logits`` f32[B, T-1, V] (the self-critical
        baseline of ``model.hard_baseline='expectation'``; the caller stops its gradient, so only
        its forward is computed).

        Predicts tokens[:, 1:] from tokens[:, :-1]. Returns
          logits f32[B, T-1, V], alphas f32[B, T-1, L], betas f32[B, T-1], entropy f32[B, T-1]
          (H[alpha_t]), and for attention='hard' also sample_logp f32[B, T-1] (log p(s_t | a), 0
          where the caption used the expectation or train=False) and sampled bool[B] (the captions
          that sampled locations).
        """
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"SATModel: tokens must be i32[B, T] with T >= 2 (<bos> ... <eos>), got shape {tokens.shape}.")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"SATModel: tokens must be integer ids, got dtype {tokens.dtype}.")
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"SATModel: images batch {images.shape[0]} != tokens batch {tokens.shape[0]}.")
        annotations = self.encode(images, train=train)
        state = self.init_decode_state(annotations)
        b = tokens.shape[0]
        hard_train = self.attention == "hard" and train
        if hard_train:
            # per caption: sample locations with prob. 1 - expectation_prob, else use the expectation
            p_exp = self.hard_sample_fraction if expectation_prob is None else expectation_prob
            use_sample = jax.random.bernoulli(self.make_rng("hard"), 1.0 - jnp.asarray(p_exp, jnp.float32), (b,))
        else:
            use_sample = jnp.zeros((b,), bool)
        inputs = jnp.swapaxes(tokens[:, :-1], 0, 1)                              # [T-1, B]
        flags = jnp.broadcast_to(use_sample, inputs.shape)                       # [T-1, B]
        reference = with_reference and hard_train
        # with a reference pass, both passes read one dropout mask per step drawn here
        scales = (self.out_dropout(jnp.ones(inputs.shape + (self.embed_dim,), jnp.float32), deterministic=False)
                  if reference else None)                                        # [T-1, B, E]: 0 or 1/keep

        def body(mdl, carry, xs):
            y_prev, flag, scale = xs
            return mdl._step(carry, y_prev, flag, train, scale)

        def run(use_flags):
            scan = nn.scan(body, variable_broadcast="params",
                           split_rngs={"params": False, "dropout": True, "hard": True},
                           in_axes=0, out_axes=0)
            _, outs = scan(self, state, (inputs, use_flags, scales))             # each [T-1, B, ...]
            return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outs)

        outs = run(flags)
        result = dict(
            logits=nn.with_logical_constraint(outs["logits"], ("activation_batch", "activation_length", "activation_vocab")),
            alphas=outs["alpha"],
            betas=outs["beta"],
            entropy=outs["entropy"],
        )
        if self.attention == "hard":
            result["sample_logp"] = outs["sample_logp"]
            result["sampled"] = use_sample                                       # bool[B]
        if reference:
            result["reference_logits"] = run(None)["logits"]                    # expected context throughout
        return result
