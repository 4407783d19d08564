"""Captioning losses: masked token cross-entropy, and Show, Attend and Tell's attention terms.

Dimension letters: B batch, T target positions, V vocabulary, L annotation locations.

Notation follows Xu et al. (2015): y the caption, a the annotations, alpha_ti the attention weight
of location i at step t, s_t the location sampled by hard attention, b the moving-average
baseline, lambda the doubly stochastic weight, lambda_e the entropy weight.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class XentResult(NamedTuple):
    loss: jax.Array         # f32[]     mean NLL over non-pad target tokens
    nll: jax.Array          # f32[B, T] -log p(y_t | ...), 0 at pad positions
    num_tokens: jax.Array   # f32[]     number of non-pad target tokens
    accuracy: jax.Array     # f32[]     argmax accuracy over non-pad target tokens


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> XentResult:
    """Token cross-entropy over the positions where `mask` is true.

    logits f32[B, T, V], targets i32[B, T], mask bool[B, T] (False at pad) ->
      loss = sum_{b,t} m_bt (-log p(y_bt)) / max(1, sum_{b,t} m_bt)
    Pad positions contribute nothing, whatever their logits or target ids.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"masked_cross_entropy: logits {logits.shape} must be [B, T, V] with targets and mask "
                         f"[B, T]; got targets {targets.shape}, mask {mask.shape}.")
    logits = logits.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0] * m
    num = m.sum()
    denom = jnp.maximum(num, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * m
    return XentResult(loss=nll.sum() / denom, nll=nll, num_tokens=num, accuracy=correct.sum() / denom)


def doubly_stochastic_reg(alphas: jax.Array, mask: jax.Array, weight: float) -> jax.Array:
    """Doubly stochastic attention regulariser (paper eq. 14): lambda * sum_i (1 - sum_t alpha_ti)^2.

    alphas f32[B, T, L], mask bool[B, T] (only steps t whose target is not pad are summed) -> f32[].

    The paper's per-caption loss is  -log p(y|x) + lambda * sum_i (1 - sum_t alpha_ti)^2.  Our token
    cross-entropy is that NLL summed over the batch and divided by the number of target tokens, so
    the regulariser is summed over captions and divided by the same token count: the total is
    exactly the paper's batch loss / #tokens, and lambda keeps the paper's meaning (lambda=1).
    Encourages the model to look at every part of the image over the course of the caption.
    """
    if alphas.shape[:2] != mask.shape:
        raise ValueError(f"doubly_stochastic_reg: alphas {alphas.shape} must be [B, T, L] with mask [B, T]; "
                         f"got mask {mask.shape}.")
    mask = mask.astype(jnp.float32)
    coverage = jnp.sum(alphas.astype(jnp.float32) * mask[..., None], axis=1)  # [B, L]
    per_caption = jnp.sum((1.0 - coverage) ** 2, axis=-1)                    # [B]
    return weight * jnp.sum(per_caption) / jnp.maximum(jnp.sum(mask), 1.0)


class ReinforceResult(NamedTuple):
    loss: jax.Array          # f32[]  surrogate whose gradient is the REINFORCE term
    new_baseline: jax.Array  # f32[]  b after this batch
    advantage: jax.Array     # f32[B] r - b (b before the update)


def caption_log_likelihood(nll: jax.Array) -> jax.Array:
    """Reward r = log p(y | s, a) per caption: nll f32[B, T] (0 at pad) -> f32[B]."""
    return -jnp.sum(nll, axis=-1)


def reward_to_go(nll: jax.Array, discount: float = 1.0) -> jax.Array:
    """Per-step reward r_bt = sum_{t' >= t} discount^(t' - t) log p(y_bt' | ...): nll f32[B, T] (0 at
    pad) -> f32[B, T].

    The location s_t sampled at step t cannot change the words before t (they were predicted
    before z_t existed), so scoring log p(s_t | a) with the whole caption's log-likelihood (the
    paper) adds the noise of words 1..t-1 to its weight for nothing. The reward-to-go with
    discount 1 drops exactly those terms: the gradient's expectation is unchanged (causality) and
    its variance smaller. A discount < 1 also shrinks the weight of later words, which s_t reaches
    only through the LSTM state: lower variance, at the price of a bias. r_b0 with discount 1 is
    ``caption_log_likelihood`` of the caption.
    """
    t = nll.shape[-1]
    i = jnp.arange(t)
    lag = (i[None, :] - i[:, None]).astype(jnp.float32)                         # [T, T]: t' - t
    weights = jnp.where(lag >= 0, jnp.float32(discount) ** jnp.maximum(lag, 0.0), 0.0)
    return jnp.einsum("bs,ts->bt", -nll.astype(jnp.float32), weights)


def reinforce_hard_attention(reward: jax.Array, sample_logp: jax.Array, mask: jax.Array,
                             baseline: jax.Array, *, decay: float, normalizer: jax.Array,
                             sampled: jax.Array | None = None,
                             reference: jax.Array | None = None,
                             samples_per_caption: int = 1,
                             caption_reward: jax.Array | None = None) -> ReinforceResult:
    """REINFORCE term of hard ("stochastic") attention (paper eq. 11-12) with a moving-average baseline.

    The paper's gradient for one caption with sampled locations s~ is
        dL_s/dW ~= d log p(y | s~, a)/dW + lambda_r (log p(y | s~, a) - b) d log p(s~ | a)/dW
                   + lambda_e dH[s~]/dW,           log p(s~ | a) = sum_t log alpha_{t, s~_t}.
    The first term is the token cross-entropy and the last the entropy bonus (`attention_entropy`);
    this function gives the middle one (lambda_r = 1) as a loss to minimise:
        loss = -sum_b stop_grad(r_b - b) * sum_t m_bt log alpha_{t, s_bt} / normalizer
    with r_b = log p(y_b | s~, a) (`caption_log_likelihood`), b the baseline *before* this batch.
    Use the token count as `normalizer` so the ratio to a per-token-mean cross-entropy is the
    paper's per-caption ratio. The baseline (model state, not a parameter) then moves as
        b <- decay * b + (1 - decay) * mean_{b sampled} r_b
    over the captions that sampled locations (`sampled`; default all): b estimates the reward
    of a sampled caption, the only kind whose log p(s~ | a) the surrogate scores. Averaging in
    the captions that used the expected context (the 50% mixing), whose likelihood is higher,
    leaves the estimator unbiased but offsets every advantage, adding variance. A batch with no
    sampled caption leaves b as it was.

    `reference` f32[B] (not in the paper; `model.hard_baseline='expectation'`) replaces b in the
    advantage by a per-caption baseline: the same caption's log-likelihood with the expected
    context at every step (r_b - r^_b, a self-critical control variate that removes the spread
    between easy and hard captions, which a single running scalar cannot). It does not depend
    on the sampled s~, so the estimator stays unbiased; b is still tracked, for the log.

    `samples_per_caption` K > 1 (not in the paper; `model.hard_samples`): rows k*... come in
    groups of K consecutive copies of one caption, each with its own sampled locations (the
    multi-sample estimate), and a sampled copy's baseline is the mean reward of the *other*
    sampled copies of the same caption (leave-one-out: it does not depend on the copy's own
    s~, so the estimator stays unbiased, and it removes the caption's difficulty as the
    expectation reference does, from samples of the same distribution). A copy with no other
    sampled copy falls back to ``reference`` (when given) or b.

    Per-step rewards (`reward_to_go`, `model.hard_reward='to_go'`; not in the paper): reward and
    reference f32[B, T], step t's sample scored with its own advantage r_bt - (baseline of step
    t): loss = -sum_bt stop_grad(A_bt) m_bt log alpha_{t, s_bt} / normalizer. The leave-one-out
    baseline then averages the other copies' r_bt step by step. The scalar b tracks the
    caption's log-likelihood (`caption_reward` f32[B], default r_b0, which is that only with
    discount 1) and is not a per-step baseline: per-step rewards need a reference, or K > 1 with
    every copy sampling (a sampled copy with no other sampled copy and no reference falls back to
    r_bt - b, unbiased but not centred; `tasks.sat.validate` refuses configs that allow it).

    reward f32[B] | f32[B, T], sample_logp f32[B, T] (0 where no location was sampled), mask
    bool[B, T], baseline f32[], sampled bool[B] | None, reference like reward | None ->
    ReinforceResult(loss f32[], new_baseline f32[], advantage like reward).
    """
    per_step = reward.ndim == 2
    if sample_logp.shape != mask.shape or reward.shape[0] != sample_logp.shape[0] or (
            reward.shape[1:] not in ((), sample_logp.shape[1:])):
        raise ValueError(f"reinforce_hard_attention: reward must be [B] or [B, T] and sample_logp, mask [B, T]; "
                         f"got {reward.shape}, {sample_logp.shape}, {mask.shape}.")
    reward = jax.lax.stop_gradient(reward.astype(jnp.float32))
    baseline = jax.lax.stop_gradient(jnp.asarray(baseline, jnp.float32))
    k = int(samples_per_caption)
    if reference is None:
        if per_step and k == 1:
            raise ValueError("reinforce_hard_attention: per-step rewards [B, T] need a per-caption baseline: "
                             "a reference (model.hard_baseline='expectation') or model.hard_samples > 1.")
        advantage = reward - baseline
    else:
        if reference.shape != reward.shape:
            raise ValueError(f"reinforce_hard_attention: reference must have the reward's shape {reward.shape}; "
                             f"got {reference.shape}.")
        advantage = reward - jax.lax.stop_gradient(reference.astype(jnp.float32))
    if k > 1:
        if reward.shape[0] % k:
            raise ValueError(f"reinforce_hard_attention: {reward.shape[0]} rows are not groups of "
                             f"samples_per_caption={k} copies.")
        r = reward.reshape((-1, k) + reward.shape[1:])                                 # [B/K, K(, T)]
        w = (jnp.ones((r.shape[0], k), jnp.float32) if sampled is None
             else sampled.reshape(-1, k).astype(jnp.float32))                          # [B/K, K]
        others = jnp.sum(w, axis=1, keepdims=True) - w                                 # other sampled copies
        if per_step:
            w, others = w[..., None], others[..., None]                                # [B/K, K, 1]
        loo = (jnp.sum(w * r, axis=1, keepdims=True) - w * r) / jnp.maximum(others, 1.0)
        has_other = jnp.broadcast_to(others > 0, r.shape).reshape(reward.shape)
        advantage = jnp.where(has_other, (r - loo).reshape(reward.shape), advantage)
    logp_steps = sample_logp.astype(jnp.float32) * mask.astype(jnp.float32)            # log alpha_{t, s~_t}  [B, T]
    if per_step:
        loss = -jnp.sum(advantage * logp_steps) / jnp.maximum(normalizer, 1.0)
    else:
        logp_s = jnp.sum(logp_steps, axis=-1)                                          # log p(s~ | a)  [B]
        loss = -jnp.sum(advantage * logp_s) / jnp.maximum(normalizer, 1.0)
    if caption_reward is None:
        caption_reward = reward[:, 0] if per_step else reward                          # [B]
    caption_reward = jax.lax.stop_gradient(caption_reward.astype(jnp.float32))
    if sampled is None:
        new_baseline = decay * baseline + (1.0 - decay) * jnp.mean(caption_reward)
    else:
        w = sampled.astype(jnp.float32)
        n = jnp.sum(w)
        mean_sampled = jnp.sum(w * caption_reward) / jnp.maximum(n, 1.0)
        new_baseline = jnp.where(n > 0, decay * baseline + (1.0 - decay) * mean_sampled, baseline)
    return ReinforceResult(loss=loss, new_baseline=new_baseline, advantage=advantage)


def attention_entropy(entropy: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean attention entropy H[alpha_t] = -sum_i alpha_ti log alpha_ti over non-pad steps.

    entropy f32[B, T] (per-step H[alpha_t]), mask bool[B, T] -> f32[]. The hard-attention loss
    subtracts lambda_e times this (an entropy *bonus*, paper eq. 12).
    """
    m = mask.astype(jnp.float32)
    return jnp.sum(entropy.astype(jnp.float32) * m) / jnp.maximum(m.sum(), 1.0)


class HardSchedule(NamedTuple):
    expectation_prob: jax.Array   # f32[]  probability that a caption uses the expected context
    entropy_weight: jax.Array     # f32[]  lambda_e at this update


def hard_attention_schedule(update: jax.Array, *, expectation_prob: float, expectation_warmup: int,
                            entropy_weight: float, entropy_decay: int) -> HardSchedule:
    """Schedules for hard attention's two knobs, as functions of the update count (i32[]).

    * Expectation warm-up (not in the paper; `expectation_warmup` > 0): the probability of using
      the expectation instead of a sample falls linearly from 1 to `expectation_prob` (the
      paper's 0.5) over the first `expectation_warmup` updates,
          p_t = 1 - (1 - p) * min(1, t / W),
      so the attention first learns where to look through the exact (soft) gradient, and the
      sampled locations REINFORCE scores later land on objects instead of on the background
      that fills most of a near-uniform alpha's 196 cells.
    * Entropy decay (not in the paper; `entropy_decay` > 0): lambda_e falls linearly to 0 over
      `entropy_decay` updates, lambda_e(t) = lambda_e * max(0, 1 - t / D): exploration early,
      no pull towards uniform attention once the model has learned where objects are.
    0 for either keeps the paper's constant value.
    """
    t = jnp.asarray(update, jnp.float32)
    p = jnp.asarray(expectation_prob, jnp.float32)
    if expectation_warmup > 0:
        p = 1.0 - (1.0 - p) * jnp.minimum(1.0, t / float(expectation_warmup))
    lam = jnp.asarray(entropy_weight, jnp.float32)
    if entropy_decay > 0:
        lam = lam * jnp.maximum(0.0, 1.0 - t / float(entropy_decay))
    return HardSchedule(expectation_prob=p, entropy_weight=lam)
