"""Contrastive and matching objectives over the *global* batch: label-smoothed InfoNCE with
same-image exclusions (BLIP-2's ITC, CLIP-style towers) and hard-negative sampling (ITM).

Dimension letters: B global batch (images and texts pair up row by row), C candidates.

"Global" needs no explicit all-gather here: the train step is one `jax.jit` over batch-sharded
arrays, so a ``[B, B]`` similarity matrix spans every device's examples and XLA inserts the
collectives. A text's negatives (and hard negatives) therefore come from every device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def smoothed_nll(logits, target, allowed=None, smoothing: float = 0.0):
    """Label-smoothed negative log-likelihood over the *allowed* classes.

    logits ``[..., C]``, target int ``[...]``, allowed bool ``[..., C]`` (None: all; the target
    must be allowed). With K allowed classes the target distribution is ``(1 - s) * onehot +
    s / K`` on them and 0 elsewhere — torch's ``label_smoothing`` when every class is allowed.
    -> ``[...]``.
    """
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, NEG_INF)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    if smoothing == 0.0:
        return nll
    if allowed is None:
        uniform = -jnp.mean(logp, axis=-1)
    else:
        uniform = -jnp.sum(jnp.where(allowed, logp, 0.0), axis=-1) / jnp.maximum(jnp.sum(allowed, axis=-1), 1)
    return (1.0 - smoothing) * nll + smoothing * uniform


def same_image_pairs(image_ids):
    """bool ``[B, B]``: rows i, j show the same image (several captions of one image in a batch)."""
    return image_ids[:, None] == image_ids[None, :]


def itc_loss(logits, image_ids, *, smoothing: float = 0.0):
    """Symmetric InfoNCE: ``logits [B, B]`` (image i vs text j, already divided by the
    temperature), the positive of row i is column i; pairs i != j that share an image id are
    not negatives (removed from both softmaxes).

    -> (loss, {'loss_i2t', 'loss_t2i', 'acc_i2t', 'acc_t2i'}).
    """
    b = logits.shape[0]
    eye = jnp.eye(b, dtype=bool)
    allowed = ~same_image_pairs(image_ids) | eye
    target = jnp.arange(b)
    i2t = jnp.mean(smoothed_nll(logits, target, allowed, smoothing))
    t2i = jnp.mean(smoothed_nll(logits.T, target, allowed.T, smoothing))
    masked = jnp.where(allowed, logits, NEG_INF)
    metrics = {"loss_i2t": i2t, "loss_t2i": t2i,
               "acc_i2t": jnp.mean(jnp.argmax(masked, axis=1) == target),
               "acc_t2i": jnp.mean(jnp.argmax(masked, axis=0) == target)}
    return 0.5 * (i2t + t2i), metrics


def sample_hard_negatives(rng, logits, exclude):
    """One negative per row, drawn from ``softmax(logits)`` over the non-excluded columns.

    logits ``[B, C]`` (gradients are stopped), exclude bool ``[B, C]`` (the positive and every
    same-image pair). -> (index int32 ``[B]``, found bool ``[B]``); a row whose every column is
    excluded has ``found=False`` and an arbitrary index, which callers must not train on.
    """
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    idx = jax.random.categorical(rng, jnp.where(exclude, NEG_INF, logits), axis=-1).astype(jnp.int32)
    found = jnp.any(~exclude, axis=-1)
    return idx, found
