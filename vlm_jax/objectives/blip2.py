"""BLIP-2 stage-1 objective: ITC + ITM (hard negatives) + ITG in one step (paper section 3.2), and
stage 2's prefix-LM split of a caption for an encoder-decoder LM (section 3.3, `prefix_lm_split`).

Dimension letters: B global batch, S image side, T text length ([CLS] w1 .. wn [SEP] pad..),
Nv image tokens, Dv image width, Q queries, E ITC width, V vocabulary.

  ITC  s_ij = max_q z_iq . z_j / tau over the global batch, label smoothing 0.1 (LAVIS),
       same-image pairs are not negatives                      (`contrastive.itc_loss`)
  ITM  per text one hard-negative image, per image one hard-negative text, each drawn from
       softmax(s) with the positive and same-image pairs excluded; 2-way CE over the B
       positives and 2B negatives                              (`contrastive.sample_hard_negatives`)
  ITG  [DEC] replaces [CLS]; next-token CE (label smoothing 0.1, LAVIS) over the text given
       all queries, multimodal-causal mask
  loss = ITC + ITM + ITG (unweighted, as the paper and LAVIS)

``objectives`` selects a subset for the paper's ablation (Table 5 / Fig. 5: ITC alone, ITC + ITM,
all three): a term left out is neither computed nor logged. ITM's hard negatives are drawn from
the ITC similarities, which are computed (not trained) when only ITC's loss is left out.

The ITC image embeddings come from the ITG pass's query outputs: under the multimodal-causal
mask the queries attend only to each other, so they equal an image-only pass (one pass saved).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlm_jax.models.blip2 import Blip2QFormerModel, itc_similarity
from vlm_jax.objectives.contrastive import itc_loss, same_image_pairs, sample_hard_negatives, smoothed_nll


OBJECTIVES = ("itc", "itm", "itg")
PREFIX_LM_SPLITS = ("none", "random")


def prefix_lm_split(tokens, pad_id: int, rng=None):
    """Stage 2's caption split -> (prompt, prompt_mask, text, text_mask) for `Blip2LMModel.text_logits`.

    ``tokens [B, T]``: <bos> w_1 .. w_m <eos> pad... Without ``rng``: prompt = the <bos> ``[B, 1]``,
    text = the rest ``[B, T-1]`` (the decoder-only LM's plain LM loss; a T5 then generates the whole
    caption). With ``rng``: the paper's prefix-LM split for an encoder-decoder LM (section 3.3: "the
    prefix text is concatenated with the visual representation as input to the LLM's encoder; the
    suffix text is used as the generation target"): per caption a cut k ~ U{0, .., m-1};
    prompt = <bos> w_1 .. w_k ``[B, T]`` right padded, text = w_k+1 .. w_m <eos> ``[B, T]``
    left-aligned and right padded, so at least one word and the <eos> are generated.
    """
    if rng is None:
        prompt, text = tokens[:, :1], tokens[:, 1:]
        return prompt, prompt != pad_id, text, text != pad_id
    b, t = tokens.shape
    words = jnp.maximum(jnp.sum(tokens != pad_id, axis=1) - 2, 1)               # m [B]
    cut = jnp.floor(jax.random.uniform(rng, (b,)) * words).astype(jnp.int32)    # k [B], 0 <= k <= m - 1
    j = jnp.arange(t)[None, :]
    prompt_mask = j < 1 + cut[:, None]                                          # <bos> + k words
    prompt = jnp.where(prompt_mask, tokens, pad_id)
    src = j + 1 + cut[:, None]                                                  # text[j] = tokens[1 + k + j]
    text = jnp.where(src < t, jnp.take_along_axis(tokens, jnp.minimum(src, t - 1), axis=1), pad_id)
    return prompt, prompt_mask, text, text != pad_id


def parse_objectives(spec) -> tuple[str, ...]:
    """'itc,itm,itg' (or a sequence) -> the ordered subset of `OBJECTIVES`; ValueError on an unknown,
    repeated or empty selection."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    bad = [n for n in names if n not in OBJECTIVES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"objectives={spec!r}: give a non-empty, comma-separated subset of {', '.join(OBJECTIVES)} "
                         "without repeats (the paper trains all three: 'itc,itm,itg').")
    return tuple(n for n in OBJECTIVES if n in names)


def itg_forward(call, feats, tokens, valid, *, dec_id: int, deterministic: bool = True, rngs=None):
    """The ITG pass on a stage-1 batch's tokens: ``tokens [B, T]`` come [CLS] first (the ITC / ITM
    text), and ITG reads them with [DEC] in its place (paper section 3.2). ``call``: the model's
    ``apply`` bound to its params. -> (text logits f32 ``[B, T, V]``: position t predicts token t + 1,
    query outputs ``[B, Q, D]``)."""
    return call(feats, tokens.at[:, 0].set(dec_id), valid, deterministic=deterministic, rngs=rngs or {},
                method=Blip2QFormerModel.itg_pass)


def stage1_loss(model: Blip2QFormerModel, params, batch, rng, *, dec_id: int, pad_id: int,
                itc_smoothing: float = 0.1, itg_smoothing: float = 0.1, itm_negatives: str = "hard",
                objectives=OBJECTIVES, train: bool = True):
    """batch: image f32 ``[B, S, S, 3]``, tokens int ``[B, T]`` ([CLS] first), image_id int ``[B]``.

    itm_negatives: 'hard' (the paper: drawn from the ITC softmax) or 'random' (uniform over the
    same allowed columns; a diagnostic, not the paper).
    objectives: the terms summed into the loss (see `parse_objectives`).

    -> (loss, metrics) with every term logged on its own.
    """
    use = parse_objectives(objectives)
    if itm_negatives not in ("hard", "random"):
        raise ValueError(f"itm_negatives={itm_negatives!r}: use 'hard' (the paper) or 'random'.")
    images, tokens, image_ids = batch["image"], batch["tokens"], batch["image_id"]
    valid = tokens != pad_id                                                   # [B, T]
    r_drop, r_img, r_txt = jax.random.split(rng, 3)
    det = not train
    call = functools.partial(model.apply, {"params": params})
    drop = (lambda k: {"dropout": jax.random.fold_in(r_drop, k)}) if train else (lambda k: {})  # noqa: E731

    feats = call(images, method=Blip2QFormerModel.image_features)             # [B, Nv, Dv]

    terms, metrics = {}, {}

    # ITG pass; its query outputs also give the ITC image embeddings (else an image-only pass).
    need_sim = "itc" in use or ("itm" in use and itm_negatives == "hard")
    if "itg" in use:
        itg_logits, q_out = itg_forward(call, feats, tokens, valid, dec_id=dec_id, deterministic=det,
                                        rngs=drop(0))                        # [B, T, V], [B, Q, D]
        img_emb = call(q_out, method=Blip2QFormerModel.project_queries)      # [B, Q, E]
    elif need_sim:
        img_emb, _ = call(feats, deterministic=det, rngs=drop(0), method=Blip2QFormerModel.image_embeds)

    # ITC
    if need_sim:
        txt_emb = call(tokens, valid, deterministic=det, rngs=drop(1),
                       method=Blip2QFormerModel.text_embeds)                  # [B, E]
        temp = params["temp"]
        sim = itc_similarity(img_emb, txt_emb) / temp                         # [B (images), B (texts)]
        loss_itc, itc_m = itc_loss(sim, image_ids, smoothing=itc_smoothing)
        metrics.update(loss_itc=loss_itc, itc_acc_i2t=itc_m["acc_i2t"], itc_acc_t2i=itc_m["acc_t2i"],
                       temperature=temp)
        if "itc" in use:
            terms["itc"] = loss_itc
        else:                      # similarities only pick the hard negatives: no gradient through them
            sim = jax.lax.stop_gradient(sim)
    if "itm" in use:
        terms["itm"], itm_m = _itm_loss(call, feats, tokens, valid, image_ids, sim if need_sim else None, r_img,
                                        r_txt, drop(2), det, itm_negatives)
        metrics.update(itm_m)
    if "itg" in use:
        terms["itg"], itg_m = _itg_loss(itg_logits, tokens, valid, itg_smoothing)
        metrics.update(itg_m)

    loss = sum(terms.values())
    return loss, {"loss": loss, **metrics}


def _itm_loss(call, feats, tokens, valid, image_ids, sim, r_img, r_txt, rngs, det, itm_negatives):
    """ITM with one hard-negative image per text and one hard-negative text per image over the
    global batch (``sim [B, B]`` the ITC logits; None with random negatives)."""
    b = tokens.shape[0]
    same = same_image_pairs(image_ids)                                        # includes the diagonal
    neg_logits = sim if itm_negatives == "hard" else jnp.zeros(same.shape, jnp.float32)   # 'random': uniform
    neg_img, found_img = sample_hard_negatives(r_img, neg_logits.T, same.T)   # per text: an image
    neg_txt, found_txt = sample_hard_negatives(r_txt, neg_logits, same)       # per image: a text
    feats_all = jnp.concatenate([feats, feats[neg_img], feats], axis=0)       # [3B, Nv, Dv]
    tokens_all = jnp.concatenate([tokens, tokens, tokens[neg_txt]], axis=0)   # [3B, T]
    valid_all = jnp.concatenate([valid, valid, valid[neg_txt]], axis=0)
    itm_logits = call(feats_all, tokens_all, valid_all, deterministic=det, rngs=rngs,
                      method=Blip2QFormerModel.itm_logits)                    # [3B, 2]
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    weight = jnp.concatenate([jnp.ones((b,), bool), found_img, found_txt]).astype(jnp.float32)
    itm_nll = smoothed_nll(itm_logits, labels)
    loss_itm = jnp.sum(itm_nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    itm_acc = jnp.sum((jnp.argmax(itm_logits, -1) == labels) * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return loss_itm, {"loss_itm": loss_itm, "itm_acc": itm_acc,
                      "itm_missing_negatives": 2 * b - jnp.sum(found_img) - jnp.sum(found_txt)}


def _itg_loss(itg_logits, tokens, valid, smoothing):
    """ITG: position t predicts token t+1 (text only; the queries carry no loss)."""
    target, tmask = tokens[:, 1:], valid[:, 1:].astype(jnp.float32)
    itg_nll = smoothed_nll(itg_logits[:, :-1], target, smoothing=smoothing)
    num_tokens = jnp.maximum(jnp.sum(tmask), 1.0)
    loss_itg = jnp.sum(itg_nll * tmask) / num_tokens
    itg_acc = jnp.sum((jnp.argmax(itg_logits[:, :-1], -1) == target) * tmask) / num_tokens
    return loss_itg, {"loss_itg": loss_itg, "itg_acc": itg_acc, "num_tokens": jnp.sum(tmask)}
