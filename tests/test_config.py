"""Config loading, overrides and validation: each error names the key and the fix."""
import json
import os
import subprocess
import sys

import pytest

from vlm_jax import config_lib
from vlm_jax.config_lib import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAT = os.path.join(ROOT, "configs", "sat.py")


def load(arg="tiny", **overrides):
    return config_lib.load_config(f"{SAT}:{arg}", {k.replace("__", "."): str(v) for k, v in overrides.items()})


def test_variants_load_and_are_locked():
    for v in ("tiny", "synthetic", "coco"):
        c = load(v)
        assert c.variant == v and c.task == "sat"
        with pytest.raises(AttributeError):
            c.new_key = 1
    coco = load("coco")
    assert coco.model.grid == 14 and coco.data.vocab_max_size == 10000 and coco.evals.caption.beam_size == 5
    assert coco.model.ds_lambda == 1.0


def test_override_typed_and_shortcuts():
    c = load("tiny,attention=hard,blind=1", train__num_steps=7, optim__lr=0.5, model__gate="false")
    assert c.model.attention == "hard" and c.data.blind is True
    assert c.train.num_steps == 7 and c.optim.lr == 0.5 and c.model.gate is False


def test_unknown_key_names_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.nope'.*num_steps"):
        load(train__nope=1)
    with pytest.raises(ConfigError, match=r"'nosection' is not a section"):
        load(nosection__x=1)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'train.num_steps'.*must be an integer"):
        load(train__num_steps="many")
    with pytest.raises(ConfigError, match=r"'model.gate'.*boolean"):
        load(model__gate="maybe")


def test_optimizer_groups_from_the_command_line():
    """--config.optim.groups.<name>.<field>=v creates the group with ParamGroup's defaults for the other
    fields; its fields keep their types; an unknown field or a group without a pattern is refused."""
    import dataclasses

    from vlm_jax import optim
    defaults = {f.name: f.default for f in dataclasses.fields(optim.ParamGroup) if f.name != "name"}
    assert config_lib.OPEN_SECTIONS["optim.groups"] == dict(defaults, pattern="")
    c = load(**{"optim__groups__slow__pattern": "encoder/.*", "optim__groups__slow__lr_mult": "0.1",
                "optim__groups__cold__pattern": "decoder/embed/.*", "optim__groups__cold__trainable": "false"})
    got = {g.name: g for g in optim.groups_from_config(c)}
    assert got["slow"] == optim.ParamGroup("slow", pattern="encoder/.*", lr_mult=0.1)
    assert got["cold"] == optim.ParamGroup("cold", pattern="decoder/embed/.*", trainable=False)
    with pytest.raises(ConfigError, match=r"optim.groups.slow.speed.*fields \['dtype', 'lr_mult'"):
        load(optim__groups__slow__speed=2)
    with pytest.raises(ConfigError, match=r"'optim.groups.slow.lr_mult'.*must be a number"):
        load(optim__groups__slow__pattern="x", optim__groups__slow__lr_mult="fast")
    with pytest.raises(ConfigError, match=r"optim.groups.slow.pattern is empty"):
        optim.groups_from_config(load(optim__groups__slow__lr_mult=0.5))


def test_unknown_variant():
    with pytest.raises(ConfigError, match=r"unknown config variant 'huge'.*tiny"):
        load("huge")


def test_batch_not_divisible_by_data_parallel():
    c = load(train__batch_size=6, mesh__data=4)
    with pytest.raises(ConfigError, match=r"batch_size=6 is not divisible by the data-parallel size 4.*multiple of 4"):
        config_lib.validate_common(c, num_devices=8)


def test_mesh_larger_than_devices():
    c = load(mesh__data=4, mesh__tensor=4)
    with pytest.raises(ConfigError, match=r"16 devices but only 8 are available"):
        config_lib.validate_common(c, num_devices=8)


def test_mesh_resolves_all_devices():
    c = load(mesh__tensor=2)
    assert config_lib.validate_common(c, num_devices=8) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_bad_choice_and_sat_validation():
    c = load(train__dtype="float16")
    with pytest.raises(ConfigError, match=r"train.dtype='float16'.*bfloat16"):
        config_lib.validate_common(c, num_devices=1)
    from vlm_jax.tasks import sat
    with pytest.raises(ConfigError, match=r"model.attention='spotlight'"):
        sat.validate(load(model__attention="spotlight"))
    with pytest.raises(ConfigError, match=r"model.encoder='vgg'"):
        sat.validate(load(model__encoder="vgg"))


def test_save_config_roundtrip(tmp_path):
    c = load()
    path = config_lib.save_config(c, str(tmp_path))
    saved = json.load(open(path))
    assert saved["train"]["num_steps"] == c.train.num_steps and saved["model"]["grid"] == c.model.grid


def test_cli_reports_config_errors_before_compiling(tmp_path):
    """train.py exits with a one-line message for a bad key, without touching jax compilation."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", f"{SAT}:tiny",
                        "--workdir", str(tmp_path), "--config.train.num_stepz=3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0
    assert "config error: unknown config key 'train.num_stepz'" in r.stderr
    assert not os.listdir(tmp_path)
