"""The engine: optimizer groups, gradient accumulation, sharding that is applied, init sources
(partial restore from an earlier run; SAT's coco encoder from a Hugging Face ResNet)."""
import contextlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import sat_config
from vlm_jax import config_lib, init_sources, optim, sharding, train_lib
from vlm_jax.layers.bert import BertConfig, BertEncoder
from vlm_jax.tasks.base import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAT = os.path.join(ROOT, "configs", "sat.py")


# ----------------------------------------------------------------------------- a toy task
def toy_config(batch_size=8, accum=1, groups=None, lr=1e-2, weight_decay=0.0):
    c = ml_collections.ConfigDict()
    c.task, c.seed = "toy", 0
    c.optim = ml_collections.ConfigDict(dict(lr=lr, end_lr_fraction=1.0, warmup_steps=0, weight_decay=weight_decay,
                                             grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_accum_steps=accum))
    c.optim.groups = ml_collections.ConfigDict(groups or {})
    c.train = ml_collections.ConfigDict(dict(batch_size=batch_size, num_steps=10))
    return c


class ToyTask(Task):
    """A 1-layer BERT (odd widths) regressing a scalar from token ids: per-example mean loss."""
    name = "toy"
    T = 6

    def __init__(self, config, width=24, heads=3, mlp=40):
        super().__init__(config)
        self.model = BertEncoder(BertConfig(vocab_size=37, width=width, num_layers=1, num_heads=heads,
                                            mlp_dim=mlp, max_positions=16, pooler=False))
        self.head = nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed", None)))

    def train_iterator(self, **kw):
        raise NotImplementedError

    def example_batch(self, n):
        return {"tokens": np.zeros((n, self.T), np.int32), "target": np.zeros((n,), np.float32)}

    def init(self, rng, batch):
        r1, r2 = jax.random.split(rng)
        enc = self.model.init(r1, jnp.asarray(batch["tokens"]))["params"]
        head = self.head.init(r2, jnp.zeros((1, self.model.config.width)))["params"]
        return {"params": {"text": enc, "head": head}, "model_state": {}}

    def loss_fn(self, params, model_state, batch, rng, *, train):
        h = self.model.apply({"params": params["text"]}, batch["tokens"]).hidden      # [B, T, D]
        pred = self.head.apply({"params": params["head"]}, h.mean(axis=1))[:, 0]     # [B]
        loss = jnp.mean((pred - batch["target"]) ** 2)
        return loss, ({"mse": loss}, model_state)


def toy_batch(n, seed=0):
    r = np.random.default_rng(seed)
    return {"tokens": r.integers(0, 37, (n, ToyTask.T)).astype(np.int32),
            "target": r.standard_normal(n).astype(np.float32)}


def one_device_mesh():
    return sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _run(config, batch, steps=1, mesh=None, task=None):
    mesh = mesh or one_device_mesh()
    task = task or ToyTask(config)
    prog = train_lib.build_program(config, task, mesh)
    state = prog.init_state(jax.random.key(0))
    init = jax.device_get(state)
    for _ in range(steps):
        state, metrics = prog.train_step(state, sharding.put_batch(batch, mesh, prog.batch_sharding),
                                         jax.random.key(1))
    return prog, init, jax.device_get(state), jax.device_get(metrics)


def _leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- optimizer groups
def test_frozen_group_and_lr_multiplier_behave_as_configured():
    batch = toy_batch(8)
    groups = {"frozen_head": dict(pattern="head/.*", trainable=False),
              "slow_text": dict(pattern="text/layers_0/.*", lr_mult=0.25)}
    prog, init, after, _ = _run(toy_config(groups=groups), batch)
    # frozen: not in the trainable tree, no optimizer slots, bit-identical after the step
    assert "head" not in after.params and "head" in after.frozen
    for k, v in _leaves(after.frozen).items():
        np.testing.assert_array_equal(v, _leaves(init.frozen)[k])
    assert not any("head" in optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(after.opt_state))
    # Adam's first update is -lr * g / (|g| + eps) ~ -lr * sign(g): the 0.25 group moves 4x less.
    _, init1, after1, _ = _run(toy_config(), batch)
    d_slow = {k: v - _leaves(init.params)[k] for k, v in _leaves(after.params).items()}
    d_full = {k: v - _leaves(init1.params)[k] for k, v in _leaves(after1.params).items()}
    key = "text/layers_0/mlp/wi/kernel"
    assert key in d_slow
    np.testing.assert_allclose(d_slow[key], 0.25 * d_full[key], rtol=1e-5, atol=1e-9)
    other = "text/word_embed/embedding"
    # the embedding is in the default group: the same first-step magnitude (lr) in both runs
    np.testing.assert_allclose(np.abs(d_slow[other]).max(), np.abs(d_full[other]).max(), rtol=1e-5)
    assert prog.groups["slow_text"].lr_mult == 0.25


def test_group_errors_name_the_group():
    with pytest.raises(config_lib.ConfigError, match=r"groups.typo.pattern='nothere/.\*' matches no parameter"):
        train_lib.build_program(toy_config(groups={"typo": dict(pattern="nothere/.*")}), ToyTask(toy_config()),
                                one_device_mesh())
    two = {"a": dict(pattern="head/.*"), "b": dict(pattern="head/kernel")}
    with pytest.raises(config_lib.ConfigError, match=r"'head/kernel' matches config.optim.groups \['a', 'b'\]"):
        train_lib.build_program(toy_config(groups=two), ToyTask(toy_config()), one_device_mesh())
    with pytest.raises(config_lib.ConfigError, match=r"groups.x.dtype='int8'"):
        optim.groups_from_config(toy_config(groups={"x": dict(pattern=".*", dtype="int8")}))


def test_group_dtype_stores_frozen_params_in_bfloat16():
    groups = {"frozen_text": dict(pattern="text/.*", trainable=False, dtype="bfloat16")}
    prog, init, after, metrics = _run(toy_config(groups=groups), toy_batch(8))
    assert {x.dtype for x in jax.tree.leaves(after.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(after.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(metrics["loss"])


def test_gradients_only_for_trainable_params_in_the_flop_count():
    """A frozen tower's gradient matmuls are not traced: the step counts fewer FLOPs."""
    cfg_all = toy_config()
    cfg_frozen = toy_config(groups={"t": dict(pattern="text/.*", trainable=False)})
    f_all = train_lib.build_program(cfg_all, ToyTask(cfg_all), one_device_mesh()).step_flops().flops
    f_frozen = train_lib.build_program(cfg_frozen, ToyTask(cfg_frozen), one_device_mesh()).step_flops().flops
    # all trainable: forward + dX + dW of every matmul (~3x forward); a frozen encoder below the
    # trainable head needs neither its dX nor its dW, so little more than its forward remains
    assert f_frozen < f_all / 2, (f_frozen, f_all)


# ----------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_equals_one_big_step():
    """k microbatches of B/k == one step on the batch of B: the gradient the optimizer receives
    and the loss agree to <= 1e-6 (f32), on 1 device and on a data x fsdp mesh. (The parameters
    after an Adam step are not compared: Adam divides by |g|, so components of g near zero turn
    1e-9 gradient differences into lr-sized update differences.)"""
    import functools
    batch = toy_batch(16, seed=3)
    config = toy_config(batch_size=16)
    task = ToyTask(config)
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        n = int(np.prod(list(shape.values())))
        mesh = sharding.create_mesh(shape, jax.devices()[:n])
        prog = train_lib.build_program(config, task, mesh)
        state = prog.init_state(jax.random.key(0))
        b = sharding.put_batch(batch, mesh, prog.batch_sharding)
        results = {}
        for k in ((1, 2, 4) if shape["data"] == 1 else (1, 4)):
            fn = jax.jit(functools.partial(train_lib.loss_and_grads, task=task, accum=k))
            with sharding.rules_context(mesh):
                loss, _, _, grads = jax.device_get(fn(state, b, jax.random.key(1)))
            results[k] = (float(loss), grads)
        for k in [k for k in results if k > 1]:
            diff = max(float(np.max(np.abs(a - g))) for a, g in zip(jax.tree.leaves(results[1][1]),
                                                                   jax.tree.leaves(results[k][1])))
            assert diff <= 1e-6, (shape, k, diff)
            assert abs(results[1][0] - results[k][0]) <= 1e-6
    # and the trainer's own step with accumulation runs
    _, _, _, m = _run(toy_config(batch_size=16, accum=4), batch, steps=1)
    assert np.isfinite(m["loss"])


def test_accumulation_batch_must_split():
    c = config_lib.load_config(f"{SAT}:tiny", {"optim.grad_accum_steps": "3"})
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=3"):
        config_lib.validate_common(c, 1)


# ----------------------------------------------------------------------------- sharding applied
def _compiled_text(config, task, mesh, with_rules=True):
    prog = train_lib.build_program(config, task, mesh)
    ctx = (lambda m: sharding.rules_context(m)) if with_rules else (lambda m: contextlib.nullcontext())
    state = prog.abstract_state
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=prog.batch_sharding[k])
             for k, v in task.example_batch(config.train.batch_size).items()}
    from vlm_jax.train_lib import _train_step
    import functools
    fn = jax.jit(functools.partial(_train_step, task=task, tx=prog.tx),
                 in_shardings=(prog.state_sharding, prog.batch_sharding, sharding.replicated(mesh)),
                 out_shardings=(prog.state_sharding, sharding.replicated(mesh)))
    with ctx(mesh):
        return fn.lower(state, batch, jax.random.key(0)).compile().as_text()


def test_activation_shardings_follow_the_rules_in_the_compiled_step():
    """fsdp=4 x tensor=2: the MLP hidden activation [B, T, F] is split 4-way on the batch (the
    'activation_batch' rule) and 2-way on F ('activation_mlp'); without the rules context the
    constraint is a no-op and the compiled step has no such per-device shape."""
    assert jax.device_count() == 8
    config = toy_config(batch_size=16)
    task = ToyTask(config, width=32, heads=4, mlp=48)
    mesh = sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    local = f"f32[4,{ToyTask.T},24]"          # [16/4, T, 48/2]
    with_rules = _compiled_text(config, task, mesh, with_rules=True)
    assert local in with_rules, "the MLP hidden activation is not split over (fsdp, tensor)"
    # the engine traces under the rules: its own train_step compiles to the same sharded program
    prog = train_lib.build_program(config, task, mesh)
    state = prog.init_state(jax.random.key(0))
    b = sharding.put_batch(toy_batch(16), mesh, prog.batch_sharding)
    with sharding.rules_context(mesh):
        text = prog.train_step.__wrapped__.lower(state, b, jax.random.key(0)).compile().as_text()
    assert local in text
    # the constraint is what does it: without the rules context it disappears
    without = _compiled_text(config, task, mesh, with_rules=False)
    assert local not in without


def test_batch_leaves_are_sharded_from_the_declared_logical_axes():
    """Task.batch_axes: a leaf with declared axes follows the rules (batch over data x fsdp, a
    feature dim over tensor); undeclared leaves split dim 0; nested per-source batches nest."""
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    P = jax.sharding.PartitionSpec
    batch = {"image": np.zeros((8, 4, 4, 3), np.float32), "feats": np.zeros((8, 6), np.float32),
             "docs": {"tokens": np.zeros((4, 5), np.int32), "media": np.zeros((4, 2, 6), np.float32)}}
    axes = {"feats": ("activation_batch", "activation_mlp"),
            "docs": {"media": ("activation_batch", None, "activation_mlp")}}
    sh = sharding.batch_shardings(batch, mesh, axes)
    assert sh["image"].spec == P(("data", "fsdp"), None, None, None)
    assert sh["feats"].spec == P(("data", "fsdp"), "tensor")
    assert sh["docs"]["tokens"].spec == P(("data", "fsdp"), None)
    assert sh["docs"]["media"].spec == P(("data", "fsdp"), None, "tensor")
    put = sharding.put_batch(batch, mesh, sh)
    assert put["docs"]["media"].sharding == sh["docs"]["media"]
    assert put["feats"].addressable_shards[0].data.shape == (2, 3)
    with pytest.raises(ValueError, match=r"batch leaf 'feats' has 2 dims but its logical axes"):
        sharding.batch_shardings(batch, mesh, {"feats": ("activation_batch",)})


def test_large_replicated_parameter_is_reported_once(caplog):
    mesh = sharding.create_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    spec = jax.sharding.PartitionSpec("fsdp", None)
    with caplog.at_level("WARNING", logger="vlm_jax.sharding"):
        for _ in range(2):
            sharding.fit_spec((1027, 1024), spec, mesh, "params['embed']")
    hits = [r for r in caplog.records if "stays replicated" in r.getMessage()]
    assert len(hits) == 1 and "1027" in hits[0].getMessage()


# ----------------------------------------------------------------------------- init sources
sat_tiny = sat_config


def test_partial_restore_seeds_named_subtrees_from_an_earlier_run(data_dir, tmp_path):
    run_a = str(tmp_path / "a")
    a = train_lib.train(sat_tiny(data_dir, train__num_steps=2), run_a)
    a_params = jax.device_get(a.state.full_params())
    # B: a wider LSTM (hidden 40), the same encoder and attention projection W_a
    b_cfg = sat_tiny(data_dir, model__hidden_dim=40)
    b_cfg.unlock()
    b_cfg.init.encoder.update(source="checkpoint", path=run_a)
    b_cfg.init.att = ml_collections.ConfigDict(dict(target="att_a", source="checkpoint", path=run_a, step=2,
                                                    source_target=""))
    b_cfg.lock()
    task, mesh = train_lib.make_task_and_mesh(b_cfg, str(tmp_path / "b"))
    prog = train_lib.build_program(b_cfg, task, mesh)
    seeded = jax.device_get(prog.init_state(jax.random.key(0), init_sources.sources_from_config(b_cfg)).full_params())
    fresh = jax.device_get(prog.init_state(jax.random.key(0)).full_params())
    for sub in ("encoder", "att_a"):
        for k, v in _leaves(seeded[sub]).items():
            np.testing.assert_array_equal(v, _leaves(a_params[sub])[k], err_msg=f"{sub}/{k}")
    # the rest is B's own random init, bitwise what the full init gives, though the seeded init skipped
    # the seeded subtrees (init_variables_except: None there, so their random draws were never compiled)
    rest = sorted(set(fresh) - {"encoder", "att_a"})
    assert "lstm_h" in rest and "init_h" in rest
    for sub in rest:
        for k, v in _leaves(seeded[sub]).items():
            np.testing.assert_array_equal(v, _leaves(fresh[sub])[k], err_msg=f"{sub}/{k}")
    pruned = prog.init_variables_except(("att_a", "encoder"))(jax.random.key(0))["params"]
    assert pruned["encoder"] is None and pruned["att_a"] is None and pruned["lstm_h"] is not None
    assert seeded["init_h"]["kernel"].shape[-1] == 40

    # a target that B does not have, and a subtree whose shapes differ (hidden 32 vs 40); B's
    # compiled init is reused, only the sources change
    variables = prog.init_variables(jax.random.key(0))
    for target, match in (("nothere", r"target='nothere' is not a parameter subtree.*top-level subtrees"),
                          ("init_h", r"cannot seed params/init_h.*shape differences")):
        bad = [init_sources.InitSource(name="encoder", target=target, source="checkpoint", path=run_a)]
        with pytest.raises(init_sources.InitSourceError, match=match):
            init_sources.apply_sources(variables, bad, prog.variable_sharding)
    # a source directory that is not a run
    not_a_run = [init_sources.InitSource(name="encoder", target="encoder", source="checkpoint", path=str(tmp_path))]
    with pytest.raises(init_sources.InitSourceError, match=r"holds no checkpoints/"):
        init_sources.apply_sources(variables, not_a_run, prog.variable_sharding)


def test_prune_unprune_and_unseeded_leaves_are_named():
    """`init_sources.prune` drops a target's subtree from params and from each model-state collection
    that has it; `unprune` puts back its shapes; a shape left unseeded is an error naming it."""
    import jax.numpy as jnp
    v = {"params": {"enc": {"w": jnp.ones(2)}, "dec": {"w": jnp.ones(3)}},
         "model_state": {"batch_stats": {"enc": {"mean": jnp.zeros(2)}}, "other": {"x": jnp.zeros(1)}}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
    p = init_sources.prune(v, ("enc",))
    assert p["params"]["enc"] is None and p["model_state"]["batch_stats"]["enc"] is None
    assert p["params"]["dec"] is v["params"]["dec"] and p["model_state"]["other"] is v["model_state"]["other"]
    assert v["params"]["enc"] is not None                       # the input is not modified
    u = init_sources.unprune(p, abstract, ("enc",))
    assert u["params"]["enc"]["w"] == abstract["params"]["enc"]["w"]
    assert u["model_state"]["batch_stats"]["enc"]["mean"] == abstract["model_state"]["batch_stats"]["enc"]["mean"]
    with pytest.raises(init_sources.InitSourceError, match=r"left \[.*enc/.*\] \(2 leaves\)"):
        init_sources.check_all_seeded({"params": u["params"], "model_state": u["model_state"]}, ("enc",))
    init_sources.check_all_seeded(v, ("enc",))


def test_checkpoint_source_reads_a_frozen_subtree_of_the_earlier_run(data_dir, tmp_path):
    """Run A froze its encoder (so it lives in A's frozen_params/, not in A's steps); B, which
    trains its encoder, is seeded from it bitwise."""
    run_a = str(tmp_path / "a")
    a = train_lib.train(sat_tiny(data_dir, model__freeze_encoder=True, train__num_steps=2), run_a)
    assert "encoder" in a.state.frozen
    b_cfg = sat_tiny(data_dir, init__encoder__source="checkpoint", init__encoder__path=run_a)
    task, mesh = train_lib.make_task_and_mesh(b_cfg, str(tmp_path / "b"))
    prog = train_lib.build_program(b_cfg, task, mesh)
    state = prog.init_state(jax.random.key(5), init_sources.sources_from_config(b_cfg))
    assert "encoder" in state.params            # trainable in B
    got, want = _leaves(jax.device_get(state.params["encoder"])), _leaves(jax.device_get(a.state.frozen["encoder"]))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_init_source_config_errors(data_dir, tmp_path):
    c = sat_tiny(data_dir)
    c.unlock()
    c.init.encoder.update(source="hf", path="")
    with pytest.raises(config_lib.ConfigError, match=r"init.encoder.source='hf' needs a directory"):
        init_sources.sources_from_config(c)
    c.init.encoder.update(path=str(tmp_path / "missing"))
    with pytest.raises(config_lib.ConfigError, match=r"is not a directory"):
        init_sources.sources_from_config(c)
    c.init.encoder.update(source="s3")
    with pytest.raises(config_lib.ConfigError, match=r"source='s3'"):
        init_sources.sources_from_config(c)
    coco = config_lib.load_config(f"{SAT}:coco")
    from vlm_jax.tasks import sat as sat_task
    with pytest.raises(config_lib.ConfigError, match=r"init.encoder.source='hf' needs a directory"):
        init_sources.sources_from_config(coco)
    coco.unlock()
    coco.init.encoder.source = ""
    with pytest.raises(config_lib.ConfigError, match=r"frozen random network"):
        sat_task.validate(coco)


def _tiny_hf_resnet(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 12, 16, 20],
                                    depths=[1, 1, 2, 1], layer_type="bottleneck", hidden_act="relu",
                                    downsample_in_first_stage=False)
    model = transformers.ResNetModel(cfg).eval()
    with torch.no_grad():           # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def test_sat_coco_shaped_config_trains_on_a_frozen_hf_resnet(data_dir, tmp_path):
    """The `coco` path in miniature: the encoder comes from a tiny random HF ResNetModel through
    config.init, stays bitwise equal to the HF weights after training, and its annotation grid
    equals HF's features."""
    torch = pytest.importorskip("torch")
    hf_dir = str(tmp_path / "hf_resnet")
    hf = _tiny_hf_resnet(hf_dir)
    # 64 px -> stride 32 -> a 2x2 grid of the last stage's 20 channels (HF hidden_sizes are block outputs)
    cfg = sat_tiny(data_dir, data__image_size=64, model__encoder="resnet", model__grid=2, model__annotation_dim=20,
                   model__freeze_encoder=True, init__encoder__source="hf", init__encoder__path=hf_dir,
                   # coco's model: the paper's annotations (no position table added) and query
                   model__position_embedding="none", model__attention_query="hidden",
                   train__num_steps=2, train__checkpoint_every=2)
    result = train_lib.train(cfg, str(tmp_path / "run"))
    assert result.step == 2
    from vlm_jax.convert import load_hf
    module, hf_vars, _ = load_hf(hf_dir)
    params = jax.device_get(result.state.full_params())
    assert "encoder" in jax.device_get(result.state.frozen) and "encoder" not in result.state.params
    for k, v in _leaves(hf_vars["params"]).items():
        np.testing.assert_array_equal(_leaves(params["encoder"])[k], v, err_msg=k)
    stats = jax.device_get(result.state.model_state["batch_stats"]["encoder"])
    for k, v in _leaves(hf_vars["batch_stats"]).items():
        np.testing.assert_array_equal(_leaves(stats)[k], v, err_msg=k)
    assert os.path.isdir(os.path.join(str(tmp_path / "run"), "frozen_params"))

    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    task = result.task
    ours = task.model.apply({"params": params, "batch_stats": result.state.model_state["batch_stats"]},
                            jnp.asarray(images), method=type(task.model).encode)        # [B, L, D]
    with torch.no_grad():
        theirs = hf(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()  # [B, C, 2, 2]
    theirs = theirs.transpose(0, 2, 3, 1).reshape(2, 4, 20)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_eval_restores_frozen_params_and_rebuilds_them_when_missing(data_dir, tmp_path, caplog):
    """A frozen group: saved once in frozen_params/ (not in the step), restored by eval; when the
    directory is gone it is rebuilt from the init (deterministic) with a warning."""
    from vlm_jax import checkpoint as ckpt_lib
    cfg = sat_tiny(data_dir, model__freeze_encoder=True, train__num_steps=2)
    workdir = str(tmp_path)
    result = train_lib.train(cfg, workdir)
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    saved = ck.manager.item_metadata(2)["state"]
    saved = getattr(saved, "tree", saved)
    assert "encoder" not in saved["params"]
    task, mesh = train_lib.make_task_and_mesh(cfg, workdir)
    prog = train_lib.build_program(cfg, task, mesh)
    _, state, _ = train_lib.restore_state(prog, ck, cfg, task, data_state=False)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.full_params())),
                    jax.tree.leaves(jax.device_get(result.state.full_params()))):
        np.testing.assert_array_equal(a, b)
    import shutil
    shutil.rmtree(os.path.join(workdir, "frozen_params"))
    with caplog.at_level("WARNING", logger="vlm_jax"):
        _, state2, _ = train_lib.restore_state(prog, ck, cfg, task, data_state=False)
    ck.close()
    assert any("frozen_params is missing" in r.getMessage() for r in caplog.records)
    for a, b in zip(jax.tree.leaves(jax.device_get(state2.frozen)), jax.tree.leaves(jax.device_get(state.frozen))):
        np.testing.assert_array_equal(a, b)


def test_train_step_runs_under_transfer_guard(data_dir, tmp_path):
    """No hidden host<->device transfers in the SAT step (the loop runs it under the guard too)."""
    cfg = sat_tiny(data_dir)
    task, mesh = train_lib.make_task_and_mesh(cfg, str(tmp_path))
    prog = train_lib.build_program(cfg, task, mesh)
    state = prog.init_state(jax.random.key(0))
    batch = sharding.put_batch(next(task.train_iterator()), mesh, prog.batch_sharding)
    rng = jax.random.key(1)
    state, _ = prog.train_step(state, batch, rng)            # compile outside the guard
    with jax.transfer_guard("disallow"):
        state, metrics = prog.train_step(state, batch, rng)
        jax.block_until_ready(metrics)
