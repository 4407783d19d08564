"""In-context copying of a Flamingo stage-0 LM (``model.stage='lm'``), measured on the text form of
the nonce episodes: accuracy of the next-token prediction of the nonce word, split by whether its
(colour, word) pair already occurred earlier in the episode (only then is it predictable).

    python benchmarks/flamingo_lm_probe.py --workdir runs/flamingo_lm [--config configs/flamingo.py:lm_synthetic]
        [--episodes 64]

Episodes are drawn from indices no training step reached (100000 + j); reads the latest checkpoint,
writes nothing.
"""
import os
import sys


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import probe_run
    args, cfg, task, step, state = probe_run(
        __doc__, "configs/flamingo.py:lm_synthetic", argv,
        lambda p: p.add_argument("--episodes", type=int, default=64))
    import jax
    import numpy as np
    params = state.full_params()
    src = task._sources("train")["nonce"]
    tok, words = task.tokenizer, set(task.nonce_pool())
    toks = np.stack([src[100000 + j]["tokens"] for j in range(args.episodes)])
    logits = jax.jit(lambda p_, t: task.model.apply({"params": p_}, t, attention_mask=t != tok.pad_id).logits)(params,
                                                                                                           toks)
    pred = np.asarray(logits.argmax(-1))
    hit = {True: [], False: []}
    for b in range(len(toks)):
        seen = set()
        for t in range(1, toks.shape[1]):
            w = tok.id_to_word(int(toks[b, t])) if toks[b, t] < tok.vocab_size else ""
            if w in words:
                pair = (tok.id_to_word(int(toks[b, t - 1])), w)
                hit[pair in seen].append(pred[b, t - 1] == toks[b, t])
                seen.add(pair)
    print(f"step {step}: nonce word accuracy, colour seen earlier in the episode: {np.mean(hit[True]):.3f} "
          f"(n={len(hit[True])}); first occurrence: {np.mean(hit[False]):.3f} (n={len(hit[False])})")


if __name__ == "__main__":
    main()
