"""The transformer block and the one layer stack shared by every tower (ViT, CLIP, EVA,
GPT-2, OPT, LLaMA, BERT / Q-Former, T5 encoder and decoder).

Dimension letters: B batch, T length, S encoder/media length, D width, Dc encoder width,
Dm media width, H heads, K head dim, F FFN width, L layers, P pattern length, N group size,
G groups (L / N).

Block
-----
`BlockConfig` describes one block; `TransformerBlock(config)` is the block:

  pre-norm  (GPT-2, OPT, LLaMA, ViT, CLIP, EVA, T5) post-norm (BERT)
    x = x + Drop(SelfAttn(N1(x)))                   x = N1(x + Drop(SelfAttn(x)))
    x = x + Drop(CrossAttn(N2(x), enc))  [opt]      x = N2(x + Drop(CrossAttn(x, enc)))  [opt]
    x = x + Drop(MLP(N3(x)))                        x = N3(x + Drop(MLP(x)))

Submodule / parameter names: ``attn_norm``, ``attn`` (MultiHeadAttention: query, key,
value, out), ``cross_norm``, ``cross_attn`` (only with ``cross_attention=True``),
``mlp_norm``, ``mlp`` (MLP: wi | wi_0, wi_1, wo). In post-norm blocks the same names
denote the norm applied after each residual add. Each residual step is a method
(`attention_sublayer`, `cross_attention_sublayer`, `mlp_sublayer`): a block variant (e.g.
BLIP-2's Q-Former block, whose FFN runs separately on the first Q positions) subclasses
`TransformerBlock`, overrides one of them, and is passed to the stack as ``block_cls``.

Stack
-----
`TransformerStack(blocks, num_layers, ...)` applies L blocks. Per-layer variation is
declarative:

* ``blocks``: one `BlockConfig` or a repeating *group pattern* ``(c_0, .., c_{P-1})``:
  layer i uses ``blocks[i % P]`` (BERT/Q-Former with cross-attention every 2nd layer =
  ``(cross_block, plain_block)``). `periodic_pattern` reduces a per-layer list of configs
  to its shortest period.
* ``insert``: an `InsertSpec` (a Flax module class + kwargs, ``every=N``, ``offset=k``):
  an extra block runs *before* layer i iff ``i % N == k`` (open_flamingo: offset N-1;
  IDEFICS: offset 0). It is called ``inserted(x [B, T, D], *inserted_inputs,
  deterministic=...) -> [B, T, D]`` with the ``inserted_inputs`` tuple given to the stack
  call (e.g. ``(media [B, S, Dm], media_mask [B|1, 1, T, S])``), and is rematerialised
  with the stack's policy.

Parameter layout:

  unrolled (``scan_layers=False``)   ``layers_0 .. layers_{L-1}`` (block params),
                                     ``inserted_0 .. inserted_{I-1}`` (I = number of
                                     insertions, in layer order); never inside ``layers_i``.
  scanned, group size N = 1, no insert  ``layers/<block params>`` with a leading axis L.
  scanned, otherwise                 ``layers/block_0 .. block_{N-1}`` and
                                     ``layers/inserted_0 .. inserted_{M-1}`` (M insertions
                                     per group), each with a leading axis G = L / N.

The group size is N = lcm(P, every); scanning needs ``L % N == 0`` (clear error otherwise).
Stacked leading axes carry the logical name 'layers'. KV-cache leaves are stacked on axis 1
(``[B, G, ...]``) so every cache leaf keeps its leading batch dim (beam search reorders axis
0). `vlm_jax.convert.common.stack_layers` turns an unrolled tree into the scanned layout.

Rematerialisation (``remat_policy``, `REMAT_POLICIES`): 'none'; 'full' (save nothing: every
block is recomputed in the backward pass); 'dots' (`jax.checkpoint_policies.
dots_with_no_batch_dims_saveable`: keep the weight matmul outputs); 'save_attention_out'
(keep only each attention sub-block's output, named ``attention_out``); 'save_qkv_attention_out'
(also the q/k/v projections, ``query_proj``/``key_proj``/``value_proj``). Names are set with
`jax.ad_checkpoint.checkpoint_name` in `vlm_jax.layers.attention` and `vlm_jax.layers.mlp`
(``mlp_hidden``).

Activations are constrained to ('activation_batch', 'activation_length', 'activation_embed')
at every block boundary.

Decoding (``decode=True``): self-attention uses the KV cache (`vlm_jax.layers.attention`).
Cross-attention blocks store the keys/values of ``encoded`` in the cross-attention cache
when ``encoded`` is passed, and reuse them when ``encoded`` is None, so a decoding loop
fills the cache once (e.g. with `vlm_jax.layers.attention.init_cache` given ``encoded``)
and then steps without the encoder output and without re-projecting it. Inserted blocks
get their ``inserted_inputs`` on every call (also while decoding), and the decode flag too
when their `InsertSpec` has ``pass_decode`` (Flamingo's gated blocks cache the media keys/values
that way).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import IMPLEMENTATIONS, MultiHeadAttention
from vlm_jax.layers.mlp import ACTIVATIONS, MLP
from vlm_jax.layers.norms import NORM_TYPES, make_norm

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = ("none", "full", "dots", "save_attention_out", "save_qkv_attention_out")


def remat_policy_fn(name: str, *, field: str = "remat_policy"):
    """The `jax.checkpoint` policy of a `REMAT_POLICIES` name (None for 'none' and 'full':
    'full' uses jax's default, which saves nothing but the block inputs)."""
    check_remat_policy(name, field=field)
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": cp.dots_with_no_batch_dims_saveable,
        "save_attention_out": cp.save_only_these_names("attention_out"),
        "save_qkv_attention_out": cp.save_only_these_names("query_proj", "key_proj", "value_proj",
                                                           "attention_out"),
    }[name]


def check_remat_policy(name, *, field: str = "remat_policy"):
    """Raise a ValueError naming ``field`` unless ``name`` is one of `REMAT_POLICIES`."""
    if name not in REMAT_POLICIES:
        hint = " (the boolean `remat` was replaced: True -> 'full', False -> 'none')" if isinstance(name, bool) else ""
        raise ValueError(f"{field}={name!r} is not a remat policy; use one of {REMAT_POLICIES}{hint}.")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One transformer block.

    num_heads, head_dim: H, K (attention width H*K may differ from D, as in T5).
    mlp_dim: F. activation: see `vlm_jax.layers.mlp.ACTIVATIONS`.
    norm_position: 'pre' | 'post'. norm_type: 'layernorm' | 'rmsnorm'. norm_eps.
    attn_bias / attn_out_bias / mlp_bias: biases of q,k,v / attention output / MLP dense layers.
    attention_scale: None -> 1/sqrt(K); T5 uses 1.0.
    cross_attention: add a cross-attention sub-block (keys/values from ``encoded``).
    dropout_rate: residual-branch dropout. attention_dropout_rate: on attention probs.
    mlp_dropout_rate: on the MLP hidden activation.
    implementation: attention kernel, None | 'xla' | 'cudnn'.
    causal: self-attention is causal (decoder LMs), applied by the kernel (``is_causal``)
      on top of any ``mask`` passed; no causal mask array needed.
    num_kv_heads: key/value heads of the self-attention (grouped-query attention, must
      divide num_heads); None = num_heads. Cross-attention always uses num_heads.
    rope_theta: rotary position embeddings (base theta) on the self-attention q/k, at the
      ``positions`` given to the block (LLaMA); None = none.
    """
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "gelu"
    norm_position: str = "pre"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    attention_scale: float | None = None
    cross_attention: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    mlp_dropout_rate: float = 0.0
    implementation: str | None = None
    causal: bool = False
    num_kv_heads: int | None = None
    rope_theta: float | None = None

    def __post_init__(self):
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"BlockConfig.norm_position={self.norm_position!r}; use 'pre' or 'post'.")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"BlockConfig.norm_type={self.norm_type!r}; use one of {NORM_TYPES}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BlockConfig.activation={self.activation!r}; use one of {ACTIVATIONS}.")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"BlockConfig.implementation={self.implementation!r}; use one of {IMPLEMENTATIONS}.")
        for f in ("num_heads", "head_dim", "mlp_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"BlockConfig.{f} must be positive; got {getattr(self, f)}.")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"BlockConfig.num_kv_heads={self.num_kv_heads} must be a positive divisor of "
                             f"num_heads={self.num_heads} (grouped-query attention), or None.")
        if self.rope_theta is not None and (self.rope_theta <= 0 or self.head_dim % 2):
            raise ValueError(f"BlockConfig.rope_theta={self.rope_theta} needs rope_theta > 0 and an even "
                             f"head_dim (got {self.head_dim}).")


@dataclasses.dataclass(frozen=True)
class InsertSpec:
    """An extra block inserted into a stack every ``every`` layers.

    module: a Flax module class, built as ``module(**kwargs, dtype=..., param_dtype=...)``
      when ``pass_dtypes`` (default) else ``module(**kwargs)``, and called as
      ``inserted(x [B, T, D], *inserted_inputs, deterministic=bool) -> [B, T, D]`` (with
      ``pass_decode`` also ``decode=bool``: the stack's decode flag, for an inserted block that
      keeps its own cache, e.g. Flamingo's cross-attention keys/values).
    kwargs: its attributes (a mapping; stored as sorted ``(key, value)`` pairs so the spec
      stays hashable).
    every, offset: insert before layer i iff ``i % every == offset`` (0 <= offset < every).
      open_flamingo: ``offset=every - 1`` (before layers N-1, 2N-1, ..); IDEFICS: ``offset=0``.
    """
    module: type
    kwargs: Any = ()
    every: int = 1
    offset: int = 0
    pass_dtypes: bool = True
    pass_decode: bool = False

    def __post_init__(self):
        if isinstance(self.kwargs, Mapping):
            object.__setattr__(self, "kwargs", tuple(sorted(self.kwargs.items())))
        if not (isinstance(self.module, type) and issubclass(self.module, nn.Module)):
            raise ValueError(f"InsertSpec.module must be a flax.linen.Module class; got {self.module!r}.")
        if self.every < 1:
            raise ValueError(f"InsertSpec.every must be >= 1; got {self.every}.")
        if not 0 <= self.offset < self.every:
            raise ValueError(f"InsertSpec.offset must be in [0, every={self.every}); got {self.offset}.")

    def before(self, i: int) -> bool:
        """Whether the block is inserted before layer ``i``."""
        return i % self.every == self.offset


def periodic_pattern(per_layer: Sequence[BlockConfig]) -> tuple[BlockConfig, ...]:
    """The shortest pattern p (len(p) dividing L) with ``per_layer[i] == p[i % len(p)]``."""
    n = len(per_layer)
    for p in range(1, n + 1):
        if n % p == 0 and all(per_layer[i] == per_layer[i % p] for i in range(n)):
            return tuple(per_layer[:p])
    raise AssertionError("unreachable")


class TransformerBlock(nn.Module):
    """One block: ``x [B, T, D]`` (+ ``encoded [B, S, Dc]``) -> ``[B, T, D]``."""
    config: BlockConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda **extra: MultiHeadAttention(  # noqa: E731
            num_heads=c.num_heads, head_dim=c.head_dim, use_bias=c.attn_bias, out_bias=c.attn_out_bias,
            scale=c.attention_scale, dropout_rate=c.attention_dropout_rate,
            implementation=c.implementation, **extra, **kw)
        self.attn_norm = make_norm(c.norm_type, c.norm_eps, **kw)
        self.attn = attn(num_kv_heads=c.num_kv_heads, rope_theta=c.rope_theta)
        if c.cross_attention:
            self.cross_norm = make_norm(c.norm_type, c.norm_eps, **kw)
            self.cross_attn = attn()
        self.mlp_norm = make_norm(c.norm_type, c.norm_eps, **kw)
        self.mlp = MLP(hidden_dim=c.mlp_dim, activation=c.activation, use_bias=c.mlp_bias,
                       dropout_rate=c.mlp_dropout_rate, **kw)
        self.drop = nn.Dropout(c.dropout_rate)

    def __call__(self, x, mask=None, *, encoded=None, cross_mask=None, attn_bias=None, cross_bias=None,
                 deterministic: bool = True, decode: bool = False, positions=None):
        """Args:
          x: ``[B, T, D]``; mask: bool ``[B|1, 1|H, T, T(or cache S)]``; attn_bias: ``[B|1, H, T, S]``.
          positions: int ``[B|1, T]`` rotary positions (only read with ``config.rope_theta``).
          encoded: ``[B, S, Dc]`` for cross-attention (required iff ``config.cross_attention``,
            except while decoding: with ``decode=True`` a given ``encoded`` is projected and
            stored in the cross-attention cache, and None reuses the stored keys/values);
          cross_mask: bool ``[B|1, 1|H, T, S]``; cross_bias: ``[B|1, H, T, S]``.
          deterministic: False enables dropout ('dropout' rng). decode: use the KV cache.
        Returns ``[B, T, D]``.
        """
        c = self.config
        self.check_encoded(encoded, decode)
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_AXES)   # residual stream in compute dtype
        if positions is None:
            x = self.attention_sublayer(x, mask, attn_bias, deterministic=deterministic, decode=decode)
        else:       # only passed when given, so block variants with the older signature keep working
            x = self.attention_sublayer(x, mask, attn_bias, deterministic=deterministic, decode=decode,
                                        positions=positions)
        if c.cross_attention:
            x = self.cross_attention_sublayer(x, encoded, cross_mask, cross_bias, deterministic=deterministic,
                                              decode=decode)
        x = self.mlp_sublayer(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, ACT_AXES)

    def check_encoded(self, encoded, decode: bool):
        """Raise unless ``encoded`` is given exactly when the block cross-attends (decoding may
        omit it to reuse the cross-attention KV cache). A block variant may relax this."""
        c = self.config
        if c.cross_attention and encoded is None and not decode:
            raise ValueError("This block has cross_attention=True: pass encoded=[B, S, Dc] (only decode=True may "
                             "omit it, to reuse the cross-attention KV cache).")
        if not c.cross_attention and encoded is not None:
            raise ValueError("encoded was given but BlockConfig.cross_attention is False.")

    def residual(self, x, norm, fn, deterministic: bool):
        """Pre-norm ``x + Drop(fn(norm(x)))`` or post-norm ``norm(x + Drop(fn(x)))``."""
        if self.config.norm_position == "pre":
            return x + self.drop(fn(norm(x)), deterministic=deterministic)
        return norm(x + self.drop(fn(x), deterministic=deterministic))

    def attention_sublayer(self, x, mask, bias, *, deterministic: bool, decode: bool, positions=None):
        """Self-attention residual step: ``[B, T, D] -> [B, T, D]`` (``positions [B|1, T]``: rotary)."""
        return self.residual(x, self.attn_norm, lambda h: self.attn(
            h, mask=mask, bias=bias, deterministic=deterministic, decode=decode,
            is_causal=self.config.causal, positions=positions), deterministic)

    def cross_attention_sublayer(self, x, encoded, mask, bias, *, deterministic: bool, decode: bool):
        """Cross-attention residual step: ``x [B, T, D]``, ``encoded [B, S, Dc]`` -> ``[B, T, D]``."""
        return self.residual(x, self.cross_norm, lambda h: self.cross_attn(
            h, encoded, mask=mask, bias=bias, deterministic=deterministic, decode=decode,
            kv_from_cache=decode and encoded is None), deterministic)

    def mlp_sublayer(self, x, *, deterministic: bool):
        """FFN residual step: ``[B, T, D] -> [B, T, D]`` (the seam for a Q-Former block whose
        FFN runs separately on the query positions)."""
        return self.residual(x, self.mlp_norm, lambda h: self.mlp(h, deterministic=deterministic),
                             deterministic)


# ------------------------------------------------------------------ static-flag wrappers
# `nn.remat` / `nn.scan` must see arrays only, so the Python flags become module attributes.
@functools.cache
def _static_block(cls: type) -> type:
    class StaticBlock(cls):
        deterministic: bool = True
        decode: bool = False

        def __call__(self, x, mask, encoded, cross_mask, attn_bias, cross_bias, positions=None):
            extra = {} if positions is None else {"positions": positions}
            return cls.__call__(self, x, mask, encoded=encoded, cross_mask=cross_mask, attn_bias=attn_bias,
                                cross_bias=cross_bias, deterministic=self.deterministic, decode=self.decode,
                                **extra)
    StaticBlock.__name__ = StaticBlock.__qualname__ = f"Static{cls.__name__}"
    return StaticBlock


@functools.cache
def _static_inserted(cls: type, pass_decode: bool = False) -> type:
    class StaticInserted(cls):
        deterministic: bool = True
        decode: bool = False

        def __call__(self, x, *inputs):
            extra = {"decode": self.decode} if pass_decode else {}
            return cls.__call__(self, x, *inputs, deterministic=self.deterministic, **extra)
    StaticInserted.__name__ = StaticInserted.__qualname__ = f"Static{cls.__name__}"
    return StaticInserted


def _maybe_remat(cls: type, policy: str, *, scanned: bool) -> type:
    if policy == "none":
        return cls
    return nn.remat(cls, policy=remat_policy_fn(policy), prevent_cse=not scanned)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a stack (or one scanned group) needs to build its blocks."""
    pattern: tuple[BlockConfig, ...]
    block_cls: type
    insert: InsertSpec | None
    remat_policy: str
    scanned: bool
    deterministic: bool
    decode: bool
    dtype: Any
    param_dtype: Any
    block_kwargs: tuple = ()

    def block(self, i: int, name: str) -> nn.Module:
        cls = _maybe_remat(_static_block(self.block_cls), self.remat_policy, scanned=self.scanned)
        return cls(config=self.pattern[i % len(self.pattern)], dtype=self.dtype, param_dtype=self.param_dtype,
                   deterministic=self.deterministic, decode=self.decode, name=name, **dict(self.block_kwargs))

    def inserted(self, name: str) -> nn.Module:
        spec = self.insert
        cls = _maybe_remat(_static_inserted(spec.module, spec.pass_decode), self.remat_policy, scanned=self.scanned)
        kw = dict(spec.kwargs)
        if spec.pass_dtypes:
            kw.update(dtype=self.dtype, param_dtype=self.param_dtype)
        return cls(**kw, deterministic=self.deterministic, decode=self.decode, name=name)

    def run_block(self, blk, i, x, args):
        mask, encoded, cross_mask, attn_bias, cross_bias, positions = args
        if self.pattern[i % len(self.pattern)].cross_attention:
            return blk(x, mask, encoded, cross_mask, attn_bias, cross_bias, positions)
        return blk(x, mask, None, None, attn_bias, None, positions)


class _Group(nn.Module):
    """Scan body: N consecutive layers (+ their insertions). carry = (x, selected, layer
    index); ys = the N layer outputs (or None)."""
    plan: _Plan
    size: int
    target: int = -1          # index into hidden_states (1..L) whose value is kept in `selected`
    collect: bool = False

    def setup(self):
        p = self.plan
        self.blocks = [p.block(j, name=f"block_{j}") for j in range(self.size)]
        if p.insert is not None:
            self.inserts = [p.inserted(name=f"inserted_{m}")
                            for m in range(sum(p.insert.before(j) for j in range(self.size)))]
        else:
            self.inserts = []
            if self.size == 1:        # plain repeated block: its params sit directly under `layers`
                nn.share_scope(self, self.blocks[0])

    def __call__(self, carry, mask, encoded, cross_mask, attn_bias, cross_bias, positions, inserted_inputs):
        x, selected, i = carry
        p, outs, m = self.plan, [], 0
        args = (mask, encoded, cross_mask, attn_bias, cross_bias, positions)
        for j in range(self.size):
            if p.insert is not None and p.insert.before(j):
                x = self.inserts[m](x, *inserted_inputs)
                m += 1
            x = p.run_block(self.blocks[j], j, x, args)
            i = i + 1
            selected = jnp.where(i == self.target, x, selected)
            outs.append(x)
        return (x, selected, i), (tuple(outs) if self.collect else None)


def group_size(num_pattern: int, insert: InsertSpec | None) -> int:
    """N = lcm(P, every): the smallest run of layers that repeats (blocks and insertions)."""
    return math.lcm(num_pattern, insert.every if insert is not None else 1)


class TransformerStack(nn.Module):
    """L blocks: ``x [B, T, D]`` (+ ``encoded [B, S, Dc]``) -> ``(out [B, T, D], hidden_states)``.

    Attributes:
      blocks: a `BlockConfig` or a pattern tuple (layer i uses ``blocks[i % P]``).
      num_layers: L.
      scan_layers: one `nn.scan` over G = L / N groups of N layers (module docstring).
      remat_policy: one of `REMAT_POLICIES`.
      insert: optional `InsertSpec`.
      block_cls: the block module (`TransformerBlock` or a subclass).

    A tower that must keep its parameters at its own level (``layers_i`` next to its
    embeddings) creates the stack in ``setup`` and calls ``nn.share_scope(self, stack)``.

    With ``decode=True`` and cross-attention blocks, ``encoded=None`` reuses the cross-attention
    KV cache (see `TransformerBlock`).

    ``hidden_states`` (only with ``output_hidden_states=True``, else None) is a tuple of
    L+1 arrays ``[B, T, D]``: the input, then the output of each layer (HF convention; an
    inserted block's effect shows in the output of the layer it precedes).
    ``out`` is ``hidden_states[output_layer]`` (default -1: the last layer). Unrolled, layers
    after ``output_layer`` are not computed at apply time; under scan all L layers run.
    """
    blocks: BlockConfig | tuple[BlockConfig, ...]
    num_layers: int
    scan_layers: bool = False
    remat_policy: str = "none"
    insert: InsertSpec | None = None
    block_cls: type = TransformerBlock
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def pattern(self) -> tuple[BlockConfig, ...]:
        return (self.blocks,) if isinstance(self.blocks, BlockConfig) else tuple(self.blocks)

    @nn.compact
    def __call__(self, x, mask=None, *, encoded=None, cross_mask=None, attn_bias=None, cross_bias=None,
                 inserted_inputs: tuple = (), deterministic: bool = True, decode: bool = False,
                 output_layer: int = -1, output_hidden_states: bool = False, block_kwargs=None, positions=None):
        """Args:
          x ``[B, T, D]``; mask bool ``[B|1, 1|H, T, S]``; attn_bias ``[B|1, H, T, S]``;
          positions: int ``[B|1, T]`` rotary positions for blocks with ``rope_theta`` (None:
            0..T-1, or the KV-cache index onwards while decoding);
          encoded ``[B, S, Dc]``, cross_mask, cross_bias: for the cross-attention blocks;
          inserted_inputs: tuple of extra arrays for the inserted blocks (``insert``);
          deterministic, decode, output_layer, output_hidden_states: see the class docstring.
          block_kwargs: static attributes for every block of this call (a dict of hashable
            values, e.g. the Q-Former block's ``query_length``); they never change the
            parameter layout, only how a block variant routes its inputs.
        Returns ``(out [B, T, D], hidden_states or None)``.
        """
        n, pattern = self.num_layers, self.pattern
        if not pattern:
            raise ValueError("TransformerStack.blocks is empty; give a BlockConfig or a tuple of them.")
        check_remat_policy(self.remat_policy, field="TransformerStack.remat_policy")
        if not isinstance(inserted_inputs, tuple):
            raise ValueError("TransformerStack(inserted_inputs=...) must be a tuple of arrays, e.g. (media, mask).")
        if inserted_inputs and self.insert is None:
            raise ValueError("inserted_inputs were given but the stack has no InsertSpec (insert=None).")
        if not -(n + 1) <= output_layer <= n:
            raise ValueError(f"output_layer={output_layer} is out of range for {n} layers "
                             f"(hidden states are indexed 0..{n}, or -{n + 1}..-1).")
        target = output_layer % (n + 1)
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_AXES)
        args = (mask, encoded, cross_mask, attn_bias, cross_bias, positions)
        plan = _Plan(pattern=pattern, block_cls=self.block_cls, insert=self.insert, remat_policy=self.remat_policy,
                     scanned=self.scan_layers, deterministic=deterministic, decode=decode, dtype=self.dtype,
                     param_dtype=self.param_dtype, block_kwargs=tuple(sorted((block_kwargs or {}).items())))
        if not self.scan_layers:
            hidden, h, m = [x], x, 0
            for i in range(n):
                if i >= target and not output_hidden_states and not self.is_initializing():
                    break
                if self.insert is not None and self.insert.before(i):
                    h = plan.inserted(name=f"inserted_{m}")(h, *inserted_inputs)
                    m += 1
                h = plan.run_block(plan.block(i, name=f"layers_{i}"), i, h, args)
                hidden.append(h)
            return hidden[target], (tuple(hidden) if output_hidden_states else None)

        size = group_size(len(pattern), self.insert)
        if n % size:
            raise ValueError(
                f"scan_layers=True needs num_layers={n} to be a multiple of the group size {size} "
                f"(= lcm(block pattern length {len(pattern)}, insert every "
                f"{self.insert.every if self.insert else 1})); change the layer count or the pattern/insertion "
                "period, or use scan_layers=False.")
        scanned = nn.scan(_Group, variable_axes={"params": 0, "cache": 1},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast,) * 7, length=n // size,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        carry0 = (x, x, jnp.zeros((), jnp.int32))
        (_, selected, _), ys = scanned(plan=plan, size=size, target=target, collect=output_hidden_states,
                                       name="layers")(carry0, *args, inserted_inputs)
        out = selected if target != 0 else x
        hidden = None
        if output_hidden_states:
            hidden = (x,) + tuple(ys[j][g] for g in range(n // size) for j in range(size))
        return out, hidden
