"""FLOP counting from traced programs, and the accelerators' peak rates for MFU.

`count_dot_flops(fn, *args)` traces ``fn`` (`jax.make_jaxpr`; nothing runs, arguments may be
`jax.ShapeDtypeStruct`s) and adds up the FLOPs of every ``dot_general`` and
``conv_general_dilated`` (2 per multiply-add; a conv's zero-inserted, lhs-dilated input — how the
input gradient of a strided conv is expressed — counts only its real pixels), walking nested jaxprs: jit/pjit, custom_jvp/vjp,
remat, cond (every branch — an upper bound), scan (body x length). A ``while_loop`` body is
counted once (its trip count is not static) and reported in ``while_loops``.

What the count means: the matmul/convolution work the program actually asks for — backward
passes included, frozen towers' forward only if nothing needs their gradients, rematerialised
forwards counted again (so on a remat model this is closer to "hardware" than "model" FLOPs).
Elementwise work (norms, activations, softmax) is not counted. The trainer logs it per second
(``model_tflops``) and, where the device's peak is known, as MFU against `peak_tflops`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.extend.core  # noqa: F401  (jax.extend is not imported by `import jax`)
import numpy as np

# Measured dense bf16 matmul ceilings (TFLOP/s) of this project's GPUs (../shared/design.md §4;
# 8192^3 jnp.dot). Keys are matched against `jax.Device.device_kind`.
PEAK_TFLOPS = {"H100": 683.0, "H200": 652.0}


@dataclasses.dataclass(frozen=True)
class FlopCount:
    flops: int             # dot + conv FLOPs, scans multiplied out
    while_loops: int       # while_loop bodies met (counted once each: a lower bound there)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _walk(jaxpr, whiles: list) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contract = int(np.prod([lhs[i] for i in lhs_contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contract
        elif name == "conv_general_dilated":
            dn = eqn.params["dimension_numbers"]
            rhs = eqn.invars[1].aval.shape
            k_in = rhs[dn.rhs_spec[1]]                       # input features per group
            window = int(np.prod([rhs[i] for i in dn.rhs_spec[2:]]))
            # lhs dilation (the input-gradient of a strided conv) inserts zeros between input
            # pixels: only 1 / prod(dilation) of the window's multiply-adds touch real inputs
            zeros = int(np.prod(eqn.params.get("lhs_dilation") or (1,)))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k_in * window // zeros
        else:
            if name == "while":
                whiles.append(eqn)
            mult = int(eqn.params.get("length", 1)) if name == "scan" else 1
            for sub in _sub_jaxprs(eqn):
                total += mult * _walk(sub, whiles)
    return total


def count(fn: Callable, *args, **kwargs) -> FlopCount:
    """`FlopCount` of ``fn(*args, **kwargs)`` (traced, not run)."""
    return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))


def count_jaxpr(closed_jaxpr) -> FlopCount:
    """`FlopCount` of a program already traced: a (closed) jaxpr, e.g. ``jax.jit(f).trace(...).jaxpr``."""
    whiles: list = []
    flops = _walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), whiles)
    return FlopCount(flops=flops, while_loops=len(whiles))


def count_dot_flops(fn: Callable, *args, **kwargs) -> int:
    """Dot + conv FLOPs of ``fn(*args, **kwargs)``: `count(...).flops`."""
    return count(fn, *args, **kwargs).flops


def peak_tflops(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """Per-device peak for MFU: ``override`` if > 0, else the measured ceiling of a known GPU
    (`PEAK_TFLOPS`, matched in ``device.device_kind``), else None (CPU, unknown cards)."""
    if override and override > 0:
        return float(override)
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
