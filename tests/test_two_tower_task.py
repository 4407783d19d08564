"""The engine's Task interface proven by a task that lives in the tests (tests/engine_tasks/two_tower.py):
a CLIP-style two-tower model (frozen Hugging Face ViT seeded by config.init + random BertEncoder over
a WordPiece tokenizer trained here) trains, checkpoints, resumes and evaluates through the unchanged
`vlm_jax.train_lib` path; optimizer groups (config-side freeze, lr multiplier, task-side freeze),
constrain_params, data-parallel equality, no host transfers in the step and FSDP memory."""
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from engine_tasks import two_tower
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import init_sources, optim, sharding, train_lib


# ----------------------------------------------------------------------------- fixtures
def _make_wordpiece(d, sentences):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.train_from_iterator(sentences, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", t.token_to_id("[CLS]")), ("[SEP]", t.token_to_id("[SEP]"))])
    t.decoder = decoders.WordPiece()
    d.mkdir(parents=True, exist_ok=True)
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]", "do_lower_case": True}))
    return str(d)


def _make_hf_vit(d):
    """A tiny HF ViTModel with odd widths (16px, patch 4, hidden 24, 3 heads, 2 layers, FFN 40)."""
    import torch
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_attention_heads=3,
                               num_hidden_layers=2, intermediate_size=40), add_pooling_layer=False)
    with torch.no_grad():     # non-trivial LayerNorm / bias values, so "unchanged" means something
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_tower")
    data_dir = str(root / "tfds")
    from vlm_jax.data.pipeline import get_dataset
    base = two_tower.get_config(data_dir=data_dir, vit_dir="", tokenizer_dir="")
    captions = [c for caps in get_dataset(base.data).meta("train").captions for c in caps]
    return {"data_dir": data_dir, "tokenizer_dir": _make_wordpiece(root / "tokenizer", captions),
            "vit_dir": _make_hf_vit(root / "vit")}


def cfg(assets, **kw):
    return two_tower.get_config(data_dir=assets["data_dir"], vit_dir=assets["vit_dir"],
                                tokenizer_dir=assets["tokenizer_dir"], **kw)


def _leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _max_diff(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    return max(float(np.max(np.abs(la[k].astype(np.float64) - lb[k].astype(np.float64)))) for k in la)


def _hf_vision_params(assets):
    from vlm_jax.convert import load_hf
    return load_hf(assets["vit_dir"])[1]["params"]


def _assert_bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k]), k


# ----------------------------------------------------------------------------- 1. the trainer end to end
def test_trains_evaluates_and_resumes_through_the_engine(assets, tmp_path, caplog):
    """train_and_evaluate on one device; the final checkpoint restored onto a data=2 x fsdp=2 mesh
    (frozen tree from frozen_params/); stop_at=2 + rerun == the uninterrupted run."""
    one = dict(mesh_data=1, num_steps=4, eval_every=2)
    straight_dir = str(tmp_path / "straight")
    metrics = train_lib.train_and_evaluate(cfg(assets, **one), straight_dir)

    # the evaluator's metrics come back under its name, and it ran at its period and at the end
    r = metrics["retrieval"]
    assert set(r) == {"t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "num_examples"} and r["num_examples"] == 16
    assert all(0.0 <= r[k] <= 1.0 for k in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"))
    assert r["t2i_r1"] <= r["t2i_r5"] and r["i2t_r1"] <= r["i2t_r5"]
    assert sorted(os.listdir(os.path.join(straight_dir, "eval"))) == ["step_2", "step_4"]
    for step in (2, 4):
        saved = json.load(open(os.path.join(straight_dir, "eval", f"step_{step}", "metrics.json")))
        assert saved["step"] == step and saved["final"] == (step == 4)
    assert saved["t2i_r1"] == r["t2i_r1"] and saved["i2t_r5"] == r["i2t_r5"]
    lines = [json.loads(l) for l in open(os.path.join(straight_dir, "metrics.jsonl"))]
    assert [l["step"] for l in lines if l["split"] == "eval/retrieval"] == [2, 4]
    train_lines = [l for l in lines if l["split"] == "train"]
    assert train_lines and {"loss", "loss_i2t", "loss_t2i", "accuracy_i2t", "accuracy_t2i", "temperature",
                            "grad_norm", "learning_rate"} <= set(train_lines[-1])
    assert all(np.isfinite(l["loss"]) for l in train_lines)

    # the final state restored the way eval.py / a resume sees it, onto another mesh (2 x 2)
    config = cfg(assets, num_steps=4, eval_every=2, mesh_data=2, mesh_fsdp=2)
    task, mesh22 = train_lib.make_task_and_mesh(config, straight_dir)
    prog = train_lib.build_program(config, task, mesh22)
    ck = ckpt_lib.Checkpointer(straight_dir, async_save=False)
    with caplog.at_level(logging.WARNING, logger="vlm_jax"):
        step, final, _ = train_lib.restore_state(prog, ck, config, task, data_state=False)
    ck.close()
    assert not any("is missing" in rec.getMessage() for rec in caplog.records), "frozen_params/ was not used"
    assert step == 4
    assert {x.sharding.spec for x in jax.tree.leaves(final.frozen)} != {jax.sharding.PartitionSpec()}

    # groups: the ViT is frozen by the config group (no optimizer slots), the text tower is 'text' (lr_mult 0.5)
    assert "vision" not in final.params and set(final.frozen) == {"vision"}
    assert not any("vision" in optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(final.opt_state))
    assert {optim.path_str(p).split("/")[0] for p, l in jax.tree_util.tree_leaves_with_path(prog.labels)
            if l == "text"} == {"text"}
    assert prog.groups["vision"].trainable is False and prog.groups["text"].lr_mult == 0.5
    assert prog.groups["temperature"].weight_decay is False          # the task's default group
    # the frozen ViT is bit-identical to the HF weights; the temperature stays in its clamp
    hf = _hf_vision_params(assets)
    _assert_bitwise(final.frozen["vision"], hf)
    _assert_bitwise(final.full_params()["vision"], hf)
    log_temp = float(final.params["log_temp"])
    assert two_tower.LOG_TEMP_MIN <= log_temp <= two_tower.LOG_TEMP_MAX
    assert log_temp != math.log(1 / 0.07)

    # stop at step 2 (as a preemption would), then rerun: the same final trainable params
    resumed_dir = str(tmp_path / "resumed")
    first = train_lib.train(cfg(assets, **one), resumed_dir, stop_at=2)
    assert first.stopped_early and first.step == 2
    at_step2 = jax.device_get(first.state.params)
    frozen_dir = os.path.join(resumed_dir, ckpt_lib.FROZEN_DIR)
    assert os.path.isdir(frozen_dir)
    fm = ocp.PyTreeCheckpointer().metadata(frozen_dir)       # StepMetadata: .item_metadata.tree
    fm = getattr(fm, "item_metadata", fm)
    assert set(getattr(fm, "tree", fm)) == {"vision"}
    frozen_mtime = os.path.getmtime(frozen_dir)
    # no step checkpoint carries the ViT weights (params, optimizer state or model state)
    mgr = ocp.CheckpointManager(os.path.join(resumed_dir, "checkpoints"),
                                options=ocp.CheckpointManagerOptions(read_only=True),
                                item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    assert sorted(mgr.all_steps()) == [2]
    tree = mgr.item_metadata(2)["state"]
    tree = getattr(tree, "tree", tree)
    mgr.close()
    assert "vision" not in tree["params"] and {"text", "text_proj", "image_proj", "log_temp"} <= set(tree["params"])
    paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape"))]
    assert paths and not any("vision" in p for p in paths)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm_jax"):
        second = train_lib.train(cfg(assets, **one), resumed_dir)
    assert not any("is missing" in rec.getMessage() for rec in caplog.records), "frozen_params/ was not used"
    assert second.step == 4 and not second.stopped_early
    assert os.path.getmtime(frozen_dir) == frozen_mtime            # written once, by the first run
    assert _max_diff(second.state.params, final.params) <= 1e-6
    assert _max_diff(second.state.opt_state, final.opt_state) <= 1e-6
    _assert_bitwise(second.state.frozen["vision"], hf)
    # between steps 2 and 4 the text tower and the heads moved; the ViT did not
    for name in ("text", "text_proj", "image_proj"):
        assert _max_diff(second.state.params[name], at_step2[name]) > 1e-5, name


# ----------------------------------------------------------------------------- 2. lr multiplier + constrain_params
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _step_config(assets, text_lr_mult):
    c = cfg(assets, text_lr_mult=text_lr_mult, num_steps=4, mesh_data=1)
    c.optim.warmup_steps, c.optim.weight_decay = 0, 0.0     # the first step has the full lr, no decay
    return c


def _first_step(config, batch, mesh):
    task, _ = train_lib.make_task_and_mesh(config, None)
    prog = train_lib.build_program(config, task, mesh)
    state = prog.init_state(jax.random.key(0), init_sources.sources_from_config(config))
    init = jax.device_get(state)
    after, metrics = prog.train_step(state, sharding.put_batch(batch, mesh, prog.batch_sharding), jax.random.key(1))
    return {"config": config, "task": task, "prog": prog, "init": init, "after": after,
            "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}}


@pytest.fixture(scope="module")
def reference(assets):
    """One train step on one device (text lr_mult 1) and the global batch it took."""
    config = _step_config(assets, 1.0)
    task, _ = train_lib.make_task_and_mesh(config, None)
    batch = next(task.train_iterator())
    mesh = sharding.create_mesh(ONE_DEVICE, jax.devices()[:1])
    return dict(_first_step(config, batch, mesh), batch=batch, mesh=mesh)


def test_text_lr_multiplier_scales_adams_first_update_exactly_and_temperature_is_clamped(assets, reference):
    """Adam's first update is -lr * g / (|g| + eps), the same in both runs up to the lr: with
    lr_mult=0.5 on 'text/.*' it is exactly half (x 0.5 is exact in floating point). Leaves that
    start at zero (biases, LayerNorm offsets) hold exactly the update after one step."""
    full = reference
    half = _first_step(_step_config(assets, 0.5), full["batch"], full["mesh"])
    assert half["prog"].groups["text"].lr_mult == 0.5 and full["prog"].groups["text"].lr_mult == 1.0
    assert _max_diff(half["init"].params, full["init"].params) == 0.0

    ih, ah, af = _leaves(half["init"].params), _leaves(half["after"].params), _leaves(full["after"].params)
    zero_text = [k for k in ih if k.startswith("text/") and not np.any(ih[k])]
    assert len(zero_text) >= 4, zero_text
    worst = 0.0
    for k in zero_text:
        du, df = ah[k], af[k]                  # = the updates (the leaves started at 0)
        moved = df != 0
        assert moved.any() and np.array_equal(du != 0, moved), k
        worst = max(worst, float(np.max(np.abs(du[moved] / df[moved] - 0.5)) / 0.5))
    assert worst <= 1e-6, worst
    # every other text leaf moves half as far too (up to the rounding of p + u)
    for k in ih:
        if k.startswith("text/"):
            np.testing.assert_allclose(ah[k] - ih[k], 0.5 * (af[k] - ih[k]),
                                       atol=4e-7 * max(1.0, float(np.abs(ih[k]).max())), err_msg=k)
    # the multiplier is the text group's only: the (default-group) projection biases move identically
    for k in ("text_proj/bias", "image_proj/bias"):
        assert np.any(af[k]) and np.array_equal(ah[k], af[k]), k

    # constrain_params runs inside the jitted step: an out-of-range temperature is clamped
    prog, mesh, after = half["prog"], full["mesh"], half["after"]
    sh = prog.state_sharding.params["log_temp"]
    batch = sharding.put_batch(full["batch"], mesh, prog.batch_sharding)
    for value, bound in ((10.0, two_tower.LOG_TEMP_MAX), (-10.0, two_tower.LOG_TEMP_MIN)):
        state = after.replace(params=dict(after.params, log_temp=jax.device_put(jnp.float32(value), sh)))
        after, _ = prog.train_step(state, batch, jax.random.key(2))
        assert float(after.params["log_temp"]) == pytest.approx(bound, abs=1e-6)
    assert float(full["task"].constrain_params({"log_temp": jnp.float32(0.5)})["log_temp"]) == 0.5


def test_contrastive_loss_matches_numpy_with_same_image_pairs_masked():
    """Symmetric InfoNCE with exp(t) scaling; off-diagonal pairs of the same image leave the softmax."""
    r = np.random.default_rng(0)
    img = r.normal(size=(6, 4))
    img[1] = img[0]                                  # rows 0 and 1: the same image (id 3), two captions
    txt = img + 0.3 * r.normal(size=(6, 4))
    txt[1] = txt[0] + 0.05 * r.normal(size=4)        # ... that say nearly the same thing
    img, txt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt))
    ids = np.array([3, 3, 5, 7, 5, 9])
    t = math.log(10.0)
    out = [float(v) for v in jax.jit(two_tower.contrastive_loss)(jnp.asarray(img, jnp.float32),
                                                                  jnp.asarray(txt, jnp.float32), t, ids)]
    logits = 10.0 * img @ txt.T
    keep = (ids[:, None] != ids[None, :]) | np.eye(6, dtype=bool)

    def xent(lg, keep):       # rows are queries, the diagonal is the target
        lse = [np.log(np.sum(np.exp(lg[i][keep[i]]))) for i in range(len(lg))]
        return float(np.mean(np.asarray(lse) - np.diagonal(lg)))

    i2t, t2i = xent(logits, keep), xent(logits.T, keep.T)
    acc = lambda lg, keep: float(np.mean(np.argmax(np.where(keep, lg, -np.inf), axis=1) == np.arange(6)))
    np.testing.assert_allclose(out, [(i2t + t2i) / 2, i2t, t2i, acc(logits, keep), acc(logits.T, keep.T)],
                               rtol=1e-5)
    assert xent(logits, np.ones_like(keep)) - i2t > 0.1      # unmasked, the twin caption is a hard negative


# ----------------------------------------------------------------------------- 3./4. data parallel, no host transfers
@pytest.fixture(scope="module")
def data_parallel(reference):
    """The reference config on mesh.data=8 (8 forced CPU devices): program and its first step."""
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    mesh = sharding.create_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices())
    return dict(_first_step(reference["config"], reference["batch"], mesh), mesh=mesh)


def test_data_parallel_step_equals_single_device(reference, data_parallel):
    ids = reference["batch"]["image_id"]
    print("image ids of the global batch:", ids.tolist())
    assert len(set(ids.tolist())) < len(ids), "the batch repeats an image (the same-image mask is exercised)"
    m1, m8 = reference["metrics"], data_parallel["metrics"]
    print("1 device:", m1, "\n8 devices:", m8)
    assert all(x.sharding.spec[0] is not None for x in jax.tree.leaves(
        sharding.put_batch(reference["batch"], data_parallel["mesh"], data_parallel["prog"].batch_sharding)))
    for k in ("loss", "loss_i2t", "loss_t2i"):
        assert abs(m1[k] - m8[k]) <= 1e-5, (k, m1[k], m8[k])
    for k in ("accuracy_i2t", "accuracy_t2i"):
        assert m1[k] == m8[k], k
    assert m8["temperature"] == pytest.approx(m1["temperature"], rel=1e-6)
    assert m8["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)


def test_train_step_has_no_hidden_host_transfers(reference, data_parallel):
    """The 8-device step (compiled by its first call in the fixture) runs under the guard."""
    prog, mesh = data_parallel["prog"], data_parallel["mesh"]
    state = data_parallel["after"]
    batch = sharding.put_batch(reference["batch"], mesh, prog.batch_sharding)
    rng = jax.random.key(1)
    jax.block_until_ready((state, batch, rng))
    with jax.transfer_guard("disallow"):
        state, metrics = prog.train_step(state, batch, rng)
        jax.block_until_ready((state, metrics))
    data_parallel["after"] = state
    assert np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------- 5. FSDP memory
def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device(assets):
    """BERT-base-width text tower (768, 12 heads, FFN 3072, 2 layers) on mesh.fsdp=8; the ViT is
    frozen here by the task's default group (no config group)."""
    config = cfg(assets, text_width=768, text_heads=12, text_mlp=3072, text_layers=2, embed_dim=256,
                 mesh_data=1, mesh_fsdp=8, config_freezes_vision=False)
    config.model.text.max_positions = 512
    task, mesh = train_lib.make_task_and_mesh(config, None)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    prog = train_lib.build_program(config, task, mesh)
    assert prog.groups["frozen_vision"].trainable is False and "vision" not in config.optim.groups
    state = prog.init_state(jax.random.key(0), init_sources.sources_from_config(config))
    assert "vision" in state.frozen and "vision" not in state.params
    dev0 = jax.devices()[0]
    per_device = total = 0
    for tree in (state.params, state.opt_state, state.frozen):
        for x in jax.tree.leaves(tree):
            shard = [s for s in x.addressable_shards if s.device == dev0][0]
            per_device += shard.data.nbytes
            total += x.nbytes
    n_params = sum(x.size for x in jax.tree.leaves(state.full_params()))
    ratio = per_device / total
    print(f"FSDP=8: {n_params:,} params; params+opt_state+frozen total {total:,} bytes, device 0 holds "
          f"{per_device:,} bytes, ratio {ratio:.5f} (1/8 = 0.125)")
    assert n_params > 14_000_000
    assert 0.125 <= ratio <= 0.125 * 1.1
