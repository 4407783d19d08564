"""Dense layers with logical axis names, and the transformer feed-forward block.

Dimension letters: B batch, T length, D width (in/out), F FFN hidden width.

`Dense`: ``[..., Din] -> [..., Dout]``, kernel ``[Din, Dout]`` with logical axes ``axes``
(default ``('embed', 'mlp')``), bias ``[Dout]`` with ``(axes[-1],)``.

`MLP`: ``[B, T, D] -> [B, T, Dout]``; activations (``ACTIVATIONS``):

  ============== =========================================== ==========================
  name           f(x)                                        used by
  ============== =========================================== ==========================
  gelu           x * Phi(x) (exact, erf)                     BERT, ViT, EVA
  gelu_tanh      tanh approximation of GELU ("gelu_new")     GPT-2
  quick_gelu     x * sigmoid(1.702 x)                        CLIP
  relu           max(x, 0)                                   OPT, T5 v1.0
  squared_relu   relu(x)^2                                   Flamingo (Perceiver / xattn FFW)
  gated_gelu     gelu_tanh(x W0) * (x W1)                    T5 v1.1 / Flan-T5
  gated_gelu_exact gelu(x W0) * (x W1)
  gated_silu     silu(x W0) * (x W1)
  ============== =========================================== ==========================

The hidden activation ``[B, T, F]`` is constrained to ('activation_batch',
'activation_length', 'activation_mlp') and named ``mlp_hidden`` for remat policies.

Parameter names: plain MLPs ``wi`` (D->F) and ``wo`` (F->D); gated MLPs ``wi_0`` (the
activated branch), ``wi_1`` (the linear branch) and ``wo`` (as T5 names them).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def squared_relu(x):
    return jnp.square(jax.nn.relu(x))


_PLAIN = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "squared_relu": squared_relu,
    "silu": jax.nn.silu,
}
_GATED = {
    "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gated_gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "gated_silu": jax.nn.silu,
}
ACTIVATIONS = tuple(_PLAIN) + tuple(_GATED)


def activation_fn(name: str) -> Callable:
    """The elementwise function of a plain activation name (see ACTIVATIONS)."""
    if name in _PLAIN:
        return _PLAIN[name]
    if name in _GATED:
        return _GATED[name]
    raise ValueError(f"activation={name!r} is not known; use one of {ACTIVATIONS}.")


class Dense(nn.Module):
    """``[..., *In] -> [..., *Out]`` with logically-named kernel ``[*In, *Out]`` and bias ``[*Out]``.

    ``features``: Out, an int or a tuple (attention's ``(H, K)``); ``contract``: how many trailing
    input dims are contracted (attention's output projection contracts ``(H, K)``: 2).
    ``axes`` names every kernel dim (In then Out); the bias takes the names of the Out dims.
    The kernel is created at its full shape (flax's DenseGeneral creates a flattened one, which
    the logical axis rules cannot constrain)."""
    features: int | tuple[int, ...]
    axes: tuple[str | None, ...] = ("embed", "mlp")
    use_bias: bool = True
    contract: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = DEFAULT_KERNEL_INIT

    @nn.compact
    def __call__(self, x):
        """x: ``[..., *In]`` -> ``[..., *Out]`` (params ``kernel [*In, *Out]``, ``bias [*Out]``)."""
        out = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = tuple(x.shape[x.ndim - self.contract:]) + out
        if len(self.axes) != len(shape):
            raise ValueError(f"Dense.axes={self.axes} names {len(self.axes)} dims but the kernel is {shape}.")
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
                            shape, self.param_dtype)
        y = jnp.tensordot(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), axes=self.contract)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   tuple(self.axes[len(shape) - len(out):])),
                              out, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


class MLP(nn.Module):
    """Transformer FFN: ``[B, T, D] -> [B, T, out_dim or D]``.

    Attributes: ``hidden_dim`` (F), ``activation`` (see ACTIVATIONS), ``use_bias``,
    ``dropout_rate`` (applied to the hidden activation, as T5/ViT do), ``out_dim``.
    """
    hidden_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    out_dim: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = DEFAULT_KERNEL_INIT

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        """x: ``[..., D]`` -> ``[..., out_dim or D]``."""
        out_dim = self.out_dim or x.shape[-1]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init)
        if self.activation in _GATED:
            act = _GATED[self.activation]
            h = act(Dense(self.hidden_dim, ("embed", "mlp"), name="wi_0", **kw)(x)) * \
                Dense(self.hidden_dim, ("embed", "mlp"), name="wi_1", **kw)(x)
        elif self.activation in _PLAIN:
            h = _PLAIN[self.activation](Dense(self.hidden_dim, ("embed", "mlp"), name="wi", **kw)(x))
        else:
            raise ValueError(f"MLP activation={self.activation!r} is not known; use one of {ACTIVATIONS}.")
        if h.ndim == 3:
            h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return Dense(out_dim, ("mlp", "embed"), name="wo", **kw)(h)
