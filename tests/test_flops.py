"""vlm_jax.flops: traced dot/conv FLOP counts (hand-computed cases) and MFU peaks."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlm_jax import flops  # noqa: E402


def _s(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_dot_conv_scan_while_cond_counts():
    # [4, 8] @ [8, 16]: 2*4*8*16
    assert flops.count_dot_flops(jnp.dot, _s(4, 8), _s(8, 16)) == 2 * 4 * 8 * 16
    # batched einsum [B=3, T=5, D=8] x [D=8, H=2, K=4]
    assert flops.count_dot_flops(lambda x, w: jnp.einsum("btd,dhk->bthk", x, w), _s(3, 5, 8), _s(8, 2, 4)) \
        == 2 * 3 * 5 * 2 * 4 * 8
    # NHWC conv, 3x3 kernel, 4 -> 6 channels, SAME: 2 * out elements * (3*3*4)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count_dot_flops(conv, _s(2, 7, 7, 4), _s(3, 3, 4, 6)) == 2 * (2 * 7 * 7 * 6) * (3 * 3 * 4)

    # strided conv (stride 2): its input gradient is a conv over a zero-dilated cotangent;
    # only the real pixels count, so forward + backward = 3 x forward
    strided = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "SAME",  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
    fwd = flops.count_dot_flops(strided, _s(2, 8, 8, 4), _s(3, 3, 4, 6))
    assert fwd == 2 * (2 * 4 * 4 * 6) * (3 * 3 * 4)
    assert flops.count_dot_flops(jax.grad(strided, argnums=(0, 1)), _s(2, 8, 8, 4), _s(3, 3, 4, 6)) == 3 * fwd

    # scan: body x length; gradient of a matmul = 3x its forward (fwd, dX, dW)
    def scanned(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=7)[0].sum()
    one = 2 * 4 * 8 * 8
    assert flops.count(scanned, _s(4, 8), _s(8, 8)) == flops.FlopCount(7 * one, 0)
    assert flops.count_dot_flops(jax.grad(scanned, argnums=(0, 1)), _s(4, 8), _s(8, 8)) == 3 * 7 * one

    # while_loop: the body once, and reported
    def looped(x, w):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]
    assert flops.count(looped, _s(4, 8), _s(8, 8)) == flops.FlopCount(one, 1)

    # cond: every branch (upper bound); jit-wrapped calls are walked into
    def branchy(p, x, w):
        return jax.lax.cond(p, lambda: jax.jit(jnp.dot)(x, w), lambda: x @ w @ jnp.eye(8))
    assert flops.count_dot_flops(branchy, jax.ShapeDtypeStruct((), bool), _s(4, 8), _s(8, 8)) == 3 * one


def test_peak_tflops():
    cpu = jax.devices("cpu")[0]
    assert flops.peak_tflops(cpu) is None
    assert flops.peak_tflops(cpu, 123.0) == 123.0

    class FakeGPU:
        platform = "gpu"
        device_kind = "NVIDIA H100 80GB HBM3"

    assert flops.peak_tflops(FakeGPU()) == 683.0
    FakeGPU.device_kind = "NVIDIA H200"
    assert flops.peak_tflops(FakeGPU()) == 652.0
    FakeGPU.device_kind = "NVIDIA A100-SXM4-80GB"
    assert flops.peak_tflops(FakeGPU()) is None
    assert np.isclose(flops.peak_tflops(FakeGPU(), 312.0), 312.0)
