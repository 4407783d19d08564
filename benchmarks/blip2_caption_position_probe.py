"""Does a BLIP-2 run's image side tell its text decoder where each object is? Teacher-forced position
words of the synthetic set's location captions, with the right image and with another image.

Every test image of the synthetic set has one caption that places each object ("a large red circle
at the top left, a small blue square in the center, ..."). The stage-2 model reads that caption
teacher-forced after its image prefix (as in training); at every position word of it (top, middle,
bottom, left, center, right) we take the LM's choice among those six words, and, as a control of the
probe, at every colour word its choice among the colours. The same captions are
read again with each image's prefix swapped for the next test image's ("shuffled"): what the text
before the word and the LM's prior give (the caption grammar alone fixes much of the choice: after
'at the' only top / bottom, after 'on the' only left / right). Position words are also scored apart on
one-object images, where no binding is needed (where is *the* shape). A prefix that carries the layout
scores above shuffled;
VQA 'position' questions then depend on whether the LM can also *answer* from it.

On a stage-1 run the decoder is the Q-Former's own ITG pass ([DEC] first, multimodal-causal mask: the
text reads the queries at every layer): does the Q-Former itself learn to place objects in words? Give the
probe the run's own ``--config.*`` overrides (its Q-Former shape, objectives), as for eval.py.

    python benchmarks/blip2_caption_position_probe.py --workdir runs/blip2_stage1 \\
        --config configs/blip2.py:stage1_synthetic
    python benchmarks/blip2_caption_position_probe.py --workdir runs/blip2_opt_frozen \\
        --config configs/blip2.py:stage2_opt_synthetic,stage1=runs/blip2_stage1,lm=runs/blip2_lm

Reads the latest checkpoint, writes nothing; prints one table.
"""
import functools
import os
import re
import sys

POSITION_WORDS = ("top", "middle", "bottom", "left", "center", "right")
LOCATED = re.compile(r"\b(at|on|in) the (top|middle|bottom|left|center|right)\b")


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import hardware, probe_run
    args, cfg, task, step, state = probe_run(
        __doc__, "configs/blip2.py:stage2_opt_synthetic", argv,
        lambda p: p.add_argument("--batch_size", type=int, default=100))
    import jax
    import jax.numpy as jnp
    import numpy as np

    stage1 = cfg.model.stage == "qformer"
    if not stage1 and (not cfg.model.stage.startswith(("opt", "t5")) or cfg.model.stage.endswith("_text")):
        raise SystemExit(f"--config {args.config}: a stage-1 run (model.stage 'qformer') or a stage-2 run "
                         f"('opt' or 't5') is needed, not model.stage={cfg.model.stage!r}.")
    if stage1 and "itg" not in cfg.model.objectives:
        raise SystemExit(f"{args.workdir}: this stage-1 run has no ITG decoder (model.objectives="
                         f"{cfg.model.objectives!r}); the probe reads its text through the ITG pass.")
    from vlm_jax.data import pipeline, synthetic
    from vlm_jax.models.blip2 import Blip2LMModel, Blip2QFormerModel
    from vlm_jax.objectives.blip2 import itg_forward, prefix_lm_split
    params = state.full_params()
    tok = task.tokenizer

    def word_ids(words):
        pieces = {w: tok.encode(w, add_special_tokens=False) for w in words}
        if any(len(v) != 1 for v in pieces.values()):
            raise SystemExit(f"the run's tokenizer splits a word into several tokens ({pieces}); this probe "
                             "scores one-token words (the synthetic set's word vocabulary).")
        return np.array([v[0] for v in pieces.values()])

    # position words, and as a control the colour words of the same captions (a prefix that names the objects'
    # colours scores above shuffled there)
    word_sets = {"position": word_ids(POSITION_WORDS), "colour (control)": word_ids(synthetic.COLORS)}

    def stage2_logits(images, tokens):
        """The LM's logits at the caption's text positions (<bos> prompt, the rest the text: no cut)."""
        return task.model.apply({"params": params}, images, *prefix_lm_split(tokens, task.tokenizer.pad_id),
                               method=Blip2LMModel.text_logits)[0]

    def itg_logits(images, tokens):
        """The ITG pass: position t of [DEC] w1 .. predicts t + 1, aligned here with the targets tokens[:, 1:]."""
        call = functools.partial(task.model.apply, {"params": params})
        feats = call(images, method=Blip2QFormerModel.image_features)
        logits, _ = itg_forward(call, feats, tokens, tokens != tok.pad_id, dec_id=task.dec_id)
        return logits[:, :-1]

    logits_fn = jax.jit(itg_logits if stage1 else stage2_logits)

    es = pipeline.load_eval_split(cfg, tok, "test")
    images, captions = [], []
    for batch in es.batches(args.batch_size):
        for k, image_id in enumerate(batch["image_id"][batch["valid"]].tolist()):
            located = [c for c in es.references[int(image_id)] if LOCATED.search(c)]
            if located:
                images.append(batch["image"][k])
                captions.append(located[0])
    length = int(cfg.data.max_caption_len) + 2
    tokens = np.stack([tok.encode_padded(c, length) for c in captions])
    images = np.stack(images)
    if stage1:                                   # targets: every token after [DEC]
        text, tm = tokens[:, 1:], tokens[:, 1:] != tok.pad_id
    else:
        _, _, text, tm = (np.asarray(x) for x in prefix_lm_split(jnp.asarray(tokens), tok.pad_id))
    logits = {}
    for name, shift in (("right image", 0), ("shuffled (the next image's prefix)", 1)):
        parts = [np.asarray(logits_fn(np.roll(images, shift, axis=0)[lo:lo + args.batch_size],
                                      jnp.asarray(tokens[lo:lo + args.batch_size])))
                 for lo in range(0, len(images), args.batch_size)]
        logits[name] = np.concatenate(parts)
    print(f"\n{args.workdir} step {step}; {hardware()}; {len(captions)} location captions")
    print("| words (choice among the set) | count | most frequent | right image | shuffled (the next image's prefix) |")
    print("|---|---|---|---|---|")
    # one-object images need no binding (where is *the* shape); with several, the word must follow its object
    n_objects = np.array([len(LOCATED.findall(c)) for c in captions])[:, None]
    rows = [(kind, ids, np.ones_like(n_objects, bool)) for kind, ids in word_sets.items()]
    rows[1:1] = [("position, one-object images", word_sets["position"], n_objects == 1),
                 ("position, images of 2+ objects", word_sets["position"], n_objects > 1)]
    for kind, ids, images_in in rows:
        where = np.isin(text, ids) & tm & images_in
        prior = np.unique(text[where], return_counts=True)[1].max() / where.sum()
        acc = {name: float((ids[np.argmax(lg[..., ids], axis=-1)] == text)[where].mean()) for name, lg in logits.items()}
        print(f"| {kind} | {int(where.sum())} | {prior:.3f} | " + " | ".join(f"{a:.3f}" for a in acc.values()) + " |")


if __name__ == "__main__":
    main()
