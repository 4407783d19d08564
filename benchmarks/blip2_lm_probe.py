"""What a BLIP-2 synthetic stage-0 LM (``configs/blip2.py:lm_opt_synthetic`` / ``lm_t5_synthetic``) answers from text:
VQA accuracy (the project's VQAv2 scoring, per question type) of greedy answers to the test
split's questions in the VQA prompt, (a) with one of the image's captions in the place of the
image prefix (``caption <bos> Question: q Short answer:``; caption k = question k mod 6), (a')
the same with a caption that states the answer where only some captions do (position and
relation questions; `vlm_jax.data.synthetic.answer_evidence`), and (b) from the question alone
(``<bos> Question: q Short answer:``, what stage 2's ``vqa_blind`` sees). (a) and (a') say
whether the frozen LM can answer from a description in its context — what stage 2's image
prefix then has to supply; (b) is the answer prior. A T5 stage 0 reads the same text in its
encoder and generates the answer with its decoder (the prefix-LM split of stage 2).

With ``--clauses``, a second table on the position questions whose answer a caption states: the
context is that caption, then one clause naming only the asked object's place in the captions'
word order (``a red circle at the top left``), then the same clause position first (``at the top
left there is a red circle``): does the LM read a place whatever the word order, or copy the words
that follow the object's name?

With ``--bos_at Q`` (OPT), every prompt's ``<bos>`` sits at position Q (the context just before it),
where stage 2 puts it after a Q-vector image prefix, instead of at the context's length: can the
LM read at the positions stage 2 uses? (A stage 0 whose documents all start at position 0 rarely
sees text there; ``data.text.random_offset``.)

    python benchmarks/blip2_lm_probe.py --workdir runs/blip2_lm [--questions 600] [--clauses] [--bos_at 32]
    python benchmarks/blip2_lm_probe.py --workdir runs/blip2_lm_t5 --config configs/blip2.py:lm_t5_synthetic

Reads the latest checkpoint, writes nothing.
"""
import os
import sys


def main(argv=None):
    def flags(p):
        p.add_argument("--questions", type=int, default=600)
        p.add_argument("--max_len", type=int, default=5)
        p.add_argument("--clauses", action="store_true", help="also the one-clause position contexts (module doc)")
        p.add_argument("--bos_at", type=int, default=-1,
                       help="OPT: put each prompt's <bos> at this position (stage 2: the prefix length); -1: after "
                            "the context, from position 0")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import probe_run
    args, cfg, task, step, state = probe_run(__doc__, "configs/blip2.py:lm_opt_synthetic", argv, flags)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vlm_jax.data import pipeline
    from vlm_jax.data.datasets import get_dataset
    from vlm_jax.evaluation.vqa import vqa_scores
    params = state.full_params()["lm"]
    tok, t_len = task.tokenizer, task.seq_len
    meta = get_dataset(cfg.data).meta("test")
    record = {int(i): r for r, i in enumerate(meta.image_ids)}
    table = pipeline.load_eval_split(cfg, tok, "test").question_table()
    table = dict(list(table.items())[: args.questions])

    if args.bos_at >= 0 and task.seq2seq:
        raise SystemExit("blip2_lm_probe: --bos_at is for a decoder-only (OPT) LM; T5's relative positions do not "
                         "depend on where the prompt starts.")
    fwd = jax.jit(lambda t, pos: task.model.apply({"params": params}, t, attention_mask=t != tok.pad_id,
                                                  position_ids=pos).logits)

    def positions(prompts):
        """[B, T] position ids: 0.. from each row's start, or (--bos_at) shifted so <bos> sits at bos_at."""
        start = [0 if args.bos_at < 0 else args.bos_at - list(x).index(tok.bos_id) for x in prompts]
        return np.clip(np.asarray(start)[:, None] + np.arange(t_len)[None], 0, cfg.model.lm.max_positions - 1)

    from vlm_jax import generate as gen
    from vlm_jax.models.blip2 import Blip2LMConfig
    t5_greedy = jax.jit(lambda t: gen.generate_seq2seq(
        task.model, params, t, input_mask=t != tok.pad_id, max_new_tokens=args.max_len, eos_id=tok.eos_id,
        pad_id=tok.pad_id, decoder_start_id=Blip2LMConfig.decoder_start_id).tokens[:, 0])

    def answer_seq2seq(prompts):
        """T5: the encoder reads each id list (right padded), the decoder answers greedily."""
        toks = np.full((len(prompts), t_len), tok.pad_id, np.int32)
        for i, x in enumerate(prompts):
            toks[i, :len(x)] = x
        out = []
        for row in np.asarray(t5_greedy(jnp.asarray(toks))).tolist():
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            out.append(tok.decode(row).strip())
        return out

    def answer(prompts):
        """Greedy continuation of each id list (right padded in one [B, T] array) until <eos>."""
        b = len(prompts)
        toks = np.full((b, t_len), tok.pad_id, np.int32)
        lens = np.array([len(x) for x in prompts])
        for i, x in enumerate(prompts):
            toks[i, :len(x)] = x
        pos = jnp.asarray(positions(prompts), jnp.int32)
        out = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for _ in range(args.max_len):
            nxt = np.asarray(jnp.argmax(fwd(jnp.asarray(toks), pos)[np.arange(b), lens - 1], -1))
            for i in range(b):
                if not done[i]:
                    if nxt[i] == tok.eos_id or lens[i] >= t_len:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
                        toks[i, lens[i]] = nxt[i]
                        lens[i] += 1
        return [tok.decode(o).strip() for o in out]

    from vlm_jax.data.synthetic import answer_evidence

    def prompt_ids(q, context: str):
        ids = [tok.bos_id] + list(tok.encode(cfg.evals.vqa.prompt.format(q["question"]), add_special_tokens=False))
        if context:
            ctx = list(tok.encode(context, add_special_tokens=False))
            room = 0 if task.seq2seq else args.max_len       # T5's answer goes to the decoder
            ids = ctx[max(0, len(ctx) + len(ids) + room - t_len):] + ids
        return ids

    def scores(questions: dict, contexts: list) -> dict:
        prompts = [prompt_ids(q, c) for q, c in zip(questions.values(), contexts)]
        preds = []
        for lo in range(0, len(prompts), 128):
            preds += (answer_seq2seq if task.seq2seq else answer)(prompts[lo:lo + 128])
        return vqa_scores(dict(zip(questions, preds)), questions)

    rows = {}
    for name, context in (("caption in context", "any"), ("answer-stating caption in context", "stating"),
                          ("question alone", "")):
        contexts = []
        for qid, q in table.items():
            if not context:
                contexts.append("")
                continue
            caps = meta.captions[record[q["image_id"]]]
            k = (qid % 1000) % len(caps)
            stating = answer_evidence(q, caps) if context == "stating" else []
            if stating:                       # the same rule as qa_context_caption='stating'
                k = stating[qid % len(stating)]
            contexts.append(caps[k])
        rows[name] = scores(table, contexts)
    types = sorted(k.split("/", 1)[1] for k in rows["question alone"] if k.startswith("accuracy/"))
    print(f"step {step}, {len(table)} test questions, greedy")
    print("| prompt | overall | " + " | ".join(types) + " |")
    print("|---|---|" + "---|" * len(types))
    for name, m in rows.items():
        print(f"| {name} | {m['accuracy']:.3f} | " + " | ".join(f"{m['accuracy/' + t]:.3f}" for t in types) + " |")
    if args.clauses:
        clause_table(table, meta, record, scores)


def clause_table(table: dict, meta, record: dict, scores) -> None:
    """The ``--clauses`` table (module doc): position questions whose answer some caption states."""
    import re

    from vlm_jax.data.synthetic import answer_evidence
    picked, contexts = {}, {"answer-stating caption": [], "one clause, the captions' order": [],
                            "one clause, position first": [], "question alone": []}
    for qid, q in table.items():
        m = re.match(r"where is the (\w+) (\w+)\?", q["question"])
        caps = meta.captions[record[q["image_id"]]]
        stating = answer_evidence(q, caps) if m else []
        place = re.search(rf"\b{m.group(1)} {m.group(2)} ((at|on|in) the [a-z ]+?)(,| and |$| corner)",
                          caps[stating[0]]) if stating else None
        if place is None:
            continue
        picked[qid] = q
        obj, where = f"{m.group(1)} {m.group(2)}", place.group(1)
        for name, text in zip(contexts, (caps[stating[0]], f"a {obj} {where}", f"{where} there is a {obj}", "")):
            contexts[name].append(text)
    print(f"\n{len(picked)} position questions, greedy")
    print("| context | position accuracy |\n|---|---|")
    for name, ctx in contexts.items():
        print(f"| {name} | {scores(picked, ctx)['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
