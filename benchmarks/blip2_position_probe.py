"""Where is the layout lost? Probes of a BLIP-2 run's image representations on the synthetic set.

For every object of an image the probe is told the object's colour and shape (one-hot) and must
name its position (the image cut in thirds: 9 classes, what the VQA 'position' questions ask).
It reads, frozen:
  vit      the image features the Q-Former cross-attends to (``LN_vision(ViT(image))``,
           [B, Nv, Dv]) through a permutation-invariant attention probe (a query made from the
           one-hot, softmax over tokens; the same kind of read the Q-Former's cross-attention does)
  queries  the Q-Former's query outputs [B, Q, D] (what stage 2 projects into the LM) through
           the same attention probe, and
  queries_flat  the query outputs flattened (slot identity kept, as the LM sees them) through an MLP
  blind    the one-hot alone (the prior of the position given colour and shape)
  control  the vit features with each token's patch row and column appended (one-hot): the
           probe itself can read layout when the tokens carry it
Each probe trains on the train split's objects (Adam, fixed epochs, seeded) and is scored on the
test split's. A representation that does not carry layout scores near ``blind``.

First it prints how sharp the Q-Former's cross-attention is on the test split's one-object images: per
cross-attention layer, the attention mass on the tokens whose patch holds object pixels, averaged over
heads x queries, and for the one head/query that puts most there (uniform attention gives the object
tokens' share of the keys). ``--attention_only`` stops there.

    python benchmarks/blip2_position_probe.py --workdir runs/blip2_stage1
    python benchmarks/blip2_position_probe.py --workdir runs/blip2_opt_frozen \\
        --config configs/blip2.py:stage2_opt_synthetic,stage1=runs/blip2_stage1,lm=runs/blip2_lm

Reads the latest checkpoint, writes nothing; prints one table.
"""
import os
import sys
import time


def position_class(bbox) -> int:
    """Third of the bbox centre: 3 * row + column (0 = top left .. 8 = bottom right)."""
    ymin, xmin, ymax, xmax = (float(v) for v in bbox)
    row = min(2, int((ymin + ymax) / 2 * 3))
    col = min(2, int((xmin + xmax) / 2 * 3))
    return 3 * row + col


def cross_attention_sharpness(cfg, task, params, pipeline):
    """Prints, per cross-attention layer, the attention mass on the object's tokens of one-object test images."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from vlm_jax.layers.attention import attention_logits       # the layers' own logits (scale 1/sqrt(K))
    es = pipeline.load_eval_split(cfg, task.tokenizer, "test")
    patch = int(cfg.model.vision.patch_size)
    images, on_object = [], []
    for batch in es.batches(100):
        for k, image_id in enumerate(batch["image_id"][batch["valid"]].tolist()):
            if len(es.objects[int(image_id)]) != 1:
                continue
            x = np.asarray(batch["image"][k])
            pixels = np.abs(x - x[0, 0]).sum(-1) > 1e-3          # differs from the (uniform) background
            side = x.shape[0] // patch
            cells = pixels[:side * patch, :side * patch].reshape(side, patch, side, patch).any((1, 3)).reshape(-1)
            images.append(x)
            on_object.append(cells)
    images, on_object = np.stack(images), np.stack(on_object)                       # [B, S, S, 3], [B, P]

    def image_only_pass(m, im):
        return m.qformer(m.image_features(im))[0]

    _, inter = task.model.apply({"params": params}, jnp.asarray(images), method=image_only_pass,
                                capture_intermediates=True)
    layers = inter["intermediates"]["qformer"]
    share = on_object.sum(1).mean() / on_object.shape[1]
    print(f"Q-Former cross-attention on {len(images)} one-object test images (object tokens "
          f"{on_object.sum(1).mean():.1f} of {on_object.shape[1]} patches: uniform mass {share:.3f})")
    print("| layer | mass on the object, mean over heads x queries | best head/query per image: mean | median |")
    print("|---|---|---|---|")
    for name in sorted((k for k in layers if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])):
        if "cross_attn" not in layers[name]:
            continue
        q = layers[name]["cross_attn"]["query"]["__call__"][0]                     # [B, Q, H, K]
        k = layers[name]["cross_attn"]["key"]["__call__"][0]                       # [B, Nv, H, K]
        a = jax.nn.softmax(attention_logits(q, k, q.shape[-1] ** -0.5), -1)         # [B, H, Q, Nv] (no mask)
        patches = a[..., -on_object.shape[1]:]                                     # drop [CLS] if present
        mass = np.asarray(jnp.einsum("bhqn,bn->bhq", patches, jnp.asarray(on_object, a.dtype)))
        best = mass.max(axis=(1, 2))
        print(f"| {name} | {mass.mean():.3f} | {best.mean():.3f} | {np.median(best):.3f} |")


def main(argv=None):
    def flags(p):
        p.add_argument("--train_images", type=int, default=6000)
        p.add_argument("--epochs", type=int, default=30)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--attention_only", action="store_true", help="print the cross-attention sharpness only")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import hardware, probe_run
    args, cfg, task, step, state = probe_run(__doc__, "configs/blip2.py:stage1_synthetic", argv, flags)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from vlm_jax.data import pipeline, synthetic
    params = state.full_params()
    model = task.model
    feats_fn = jax.jit(lambda x: model.apply({"params": params}, x, method=lambda m, im: m.image_features(im)))
    query_fn = jax.jit(lambda f: model.apply({"params": params}, f, method=lambda m, ff: m.qformer(ff)[0]))
    cond_words = list(synthetic.COLORS) + list(synthetic.SHAPES)
    print(f"\n{args.workdir} step {step}; {hardware()}")
    cross_attention_sharpness(cfg, task, params, pipeline)
    if args.attention_only:
        return

    def gather(split, limit):
        es = pipeline.load_eval_split(cfg, task.tokenizer, split).subset(limit)
        vit, qry, rows = [], [], []
        for batch in es.batches(128):
            f = feats_fn(jnp.asarray(batch["image"]))
            vit.append(np.asarray(f))
            qry.append(np.asarray(query_fn(f)))
        vit, qry = np.concatenate(vit)[:len(es)], np.concatenate(qry)[:len(es)]
        for r, image_id in enumerate(es.image_ids.tolist()):
            objects = es.objects[int(image_id)]
            for o in objects:
                c = np.zeros(len(cond_words), np.float32)
                for key in ("color", "shape"):
                    v = o[key].decode() if isinstance(o[key], bytes) else str(o[key])
                    c[cond_words.index(v)] = 1.0
                rows.append((r, c, position_class(o["bbox"]), len(objects) == 1))
        idx = np.array([row[0] for row in rows])
        cond = np.stack([row[1] for row in rows])
        label = np.array([row[2] for row in rows], np.int32)
        alone = np.array([row[3] for row in rows])          # the object is its image's only one: no binding needed
        return vit, qry, idx, cond, label, alone

    t0 = time.time()
    train = gather("train", args.train_images)
    test = gather("test", 0)
    print(f"features: {len(train[2])} train / {len(test[2])} test objects in {time.time() - t0:.0f}s")

    def init_mlp(key, sizes):
        ks = jax.random.split(key, len(sizes) - 1)
        return [dict(w=jax.random.normal(k, (a, b)) / np.sqrt(a), b=jnp.zeros(b))
                for k, a, b in zip(ks, sizes[:-1], sizes[1:])]

    def mlp(ps, x):
        for i, layer in enumerate(ps):
            x = x @ layer["w"] + layer["b"]
            if i < len(ps) - 1:
                x = jax.nn.gelu(x)
        return x

    heads, hidden = 4, 128

    def make_probe(kind, width):
        """kind 'attn' (tokens [N, K, width]), 'flat' (flattened tokens) or 'blind'."""
        def init(key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            ps = {}
            if kind == "attn":
                ps["q"] = jax.random.normal(k1, (len(cond_words), heads, hidden // heads)) / np.sqrt(len(cond_words))
                ps["k"] = jax.random.normal(k2, (width, heads, hidden // heads)) / np.sqrt(width)
                ps["v"] = jax.random.normal(k3, (width, heads, hidden // heads)) / np.sqrt(width)
                ps["out"] = init_mlp(k4, [hidden + len(cond_words), hidden, 9])
            elif kind == "flat":
                ps["out"] = init_mlp(k4, [width + len(cond_words), hidden, 9])
            else:
                ps["out"] = init_mlp(k4, [len(cond_words), hidden, 9])
            return ps

        def apply(ps, tokens, cond):
            if kind == "attn":
                mu = tokens.mean(-1, keepdims=True)
                tn = (tokens - mu) / jnp.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
                q = jnp.einsum("nc,chk->nhk", cond, ps["q"])
                k = jnp.einsum("ntd,dhk->nthk", tn, ps["k"])
                v = jnp.einsum("ntd,dhk->nthk", tn, ps["v"])
                a = jax.nn.softmax(jnp.einsum("nhk,nthk->nht", q, k) / np.sqrt(hidden // heads), -1)
                o = jnp.einsum("nht,nthk->nhk", a, v).reshape(len(cond), -1)
                return mlp(ps["out"], jnp.concatenate([o, cond], -1))
            if kind == "flat":
                return mlp(ps["out"], jnp.concatenate([tokens.reshape(len(cond), -1), cond], -1))
            return mlp(ps["out"], cond)
        return init, apply

    def run_probe(kind, source):
        if source == "vit+grid":     # the control: each token with its patch's row and column (one-hot)
            side = int(round(np.sqrt(train[0].shape[1] - 1)))
            grid = np.zeros((train[0].shape[1], 2 * side), np.float32)
            for t in range(1, train[0].shape[1]):
                grid[t, (t - 1) // side] = grid[t, side + (t - 1) % side] = 1.0
            add = lambda f: np.concatenate([f, np.broadcast_to(grid, f.shape[:2] + grid.shape[1:]) * 3.0], -1)  # noqa: E731
            feats_tr, feats_te = add(train[0]), add(test[0])
        else:
            feats_tr = {"vit": train[0], "queries": train[1]}[source]
            feats_te = {"vit": test[0], "queries": test[1]}[source]
        if kind == "flat":
            feats_tr = feats_tr.reshape(len(feats_tr), -1)
            feats_te = feats_te.reshape(len(feats_te), -1)
            mu, sd = feats_tr.mean(0), feats_tr.std(0) + 1e-6
            feats_tr, feats_te = (feats_tr - mu) / sd, (feats_te - mu) / sd
        init, apply = make_probe(kind, feats_tr.shape[-1])
        ps = init(jax.random.key(args.seed))
        opt = optax.adamw(1e-3, weight_decay=1e-2)
        opt_state = opt.init(ps)
        _, _, idx_tr, cond_tr, y_tr, _ = train
        _, _, idx_te, cond_te, y_te, alone_te = test

        @jax.jit
        def step_fn(ps, opt_state, tokens, cond, y):
            def loss(ps):
                return optax.softmax_cross_entropy_with_integer_labels(apply(ps, tokens, cond), y).mean()
            g = jax.grad(loss)(ps)
            upd, opt_state = opt.update(g, opt_state, ps)
            return optax.apply_updates(ps, upd), opt_state

        predict = jax.jit(lambda ps, tokens, cond: jnp.argmax(apply(ps, tokens, cond), -1))
        rng = np.random.default_rng(args.seed)
        n, bs = len(y_tr), 256
        for _ in range(args.epochs):
            perm = rng.permutation(n)
            for lo in range(0, n - bs + 1, bs):
                j = perm[lo:lo + bs]
                ps, opt_state = step_fn(ps, opt_state, jnp.asarray(feats_tr[idx_tr[j]]), jnp.asarray(cond_tr[j]),
                                        jnp.asarray(y_tr[j]))
        def hits(feats, idx, cond, y, chunk=512):
            """Per object: does the probe name its position (predicted in chunks of objects)."""
            pred = [np.asarray(predict(ps, jnp.asarray(feats[idx[lo:lo + chunk]]), jnp.asarray(cond[lo:lo + chunk])))
                    for lo in range(0, len(y), chunk)]
            return np.concatenate(pred) == y

        test_hits = hits(feats_te, idx_te, cond_te, y_te)
        return (float(hits(feats_tr, idx_tr, cond_tr, y_tr).mean()), float(test_hits.mean()),
                float(test_hits[alone_te].mean()))

    rows = [("blind (colour + shape one-hot only)", "blind", "vit"),
            ("control: vit features + each token's grid row/column, attention probe", "attn", "vit+grid"),
            ("vit features, attention probe", "attn", "vit"),
            ("query outputs, attention probe", "attn", "queries"),
            ("query outputs, flattened + MLP", "flat", "queries")]
    prior = np.bincount(test[4], minlength=9).max() / len(test[4])
    alone = test[5]
    prior1 = np.bincount(test[4][alone], minlength=9).max() / max(1, alone.sum())
    print(f"\n{args.epochs} epochs; test majority class {prior:.3f} "
          f"(one-object images: {int(alone.sum())} objects, majority {prior1:.3f})")
    print("| probe | train accuracy | test accuracy | test, one-object images |\n|---|---|---|---|")
    for name, kind, source in rows:
        t0 = time.time()
        tr, te, te1 = run_probe(kind, source)
        print(f"| {name} | {tr:.3f} | {te:.3f} | {te1:.3f} |  ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
