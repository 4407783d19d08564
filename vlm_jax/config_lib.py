"""Config helpers: variant parsing, validation before anything compiles, saving the resolved config.

Every check here raises `ConfigError` whose message names the offending key and the fix, so a
bad command line fails in milliseconds instead of deep inside XLA.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and how to fix it."""


def caption_data(**overrides) -> ml_collections.ConfigDict:
    """The ``config.data`` section every image-caption family shares (SAT, BLIP-2, ...):
    the dataset, its TFDS location, split sizes of the synthetic set, caption length,
    vocabulary bounds, the blind baseline switch and the image normalisation."""
    d = ml_collections.ConfigDict()
    d.name = "synthetic_shapes"        # 'synthetic_shapes' | 'karpathy_captions' | 'vqav2' (evaluation only)
    d.data_dir = ""                    # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    d.manual_dir = ""                  # karpathy: folder with dataset_*.json and the images
    d.builder_config = ""              # karpathy: coco | flickr8k | flickr30k
    d.image_size = 56                  # S (pixels, square)
    d.num_train = 6000                 # synthetic split sizes (images)
    d.num_val = 500
    d.num_test = 500
    d.max_caption_len = 24             # words / tokens; T = max_caption_len + 2 (the template's two specials)
    d.vocab_min_count = 1
    d.vocab_max_size = 10000
    d.blind = False                    # blind baseline: every caption paired with a random other image
    d.caption_pattern = ""             # regex: train only on the captions it finds ('' = all; a diagnostic)
    d.caption_pattern_repeat = 0       # with caption_pattern: 0 = only those; n >= 1 = every caption, those n times
    d.worker_count = 0
    d.mean = (0.5, 0.5, 0.5)
    d.std = (0.25, 0.25, 0.25)
    for k, v in overrides.items():
        if k not in d:
            raise ConfigError(f"caption_data({k}=...): no such data field; known: {sorted(d.keys())}.")
        d[k] = v
    return d


def validate_data_section(config) -> None:
    """Check ``config.data`` with the data package's own rules (a ConfigError naming the key);
    nothing to check on a node without the data stack (TFDS / grain not installed)."""
    try:
        from vlm_jax.data.pipeline import validate_data_config
    except ImportError:
        return
    try:
        validate_data_config(config.data)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_arg(arg: str | None, variants: Iterable[str], default: str) -> tuple[str, dict[str, str]]:
    """Parse a `get_config` argument: 'VARIANT' or 'VARIANT,key=value,...' or 'key=value,...'.

    Returns (variant, {key: raw value}). Raw values are typed later by `apply_overrides`.
    """
    variants = tuple(variants)
    variant, overrides = default, {}
    for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
        if "=" in part:
            key, value = part.split("=", 1)
            overrides[key.strip()] = value.strip()
        elif part in variants:
            variant = part
        else:
            raise ConfigError(f"unknown config variant {part!r}; choose one of {', '.join(variants)} "
                              f"(e.g. --config configs/<family>.py:{variants[0]}).")
    return variant, overrides


def _coerce(key: str, raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
    elif isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            pass
    elif isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            pass
    elif isinstance(current, str):
        return raw
    elif isinstance(current, tuple):
        try:
            items = [s for s in raw.strip("()[]").split(":" if ":" in raw else ";") if s]
            return tuple(type(current[0])(s) if current else int(s) for s in items)
        except ValueError:
            pass
    kind = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            tuple: "a tuple like 1:2:3"}.get(type(current), "a " + type(current).__name__)
    raise ConfigError(f"config key {key!r}: cannot use {raw!r}, it must be {kind} "
                      f"(current value {current!r}); e.g. --config.{key}={current!r}.")


# Sections whose entries the command line may create: 'optim.groups.<name>.<field>=value' adds the group <name> with
# these fields (vlm_jax/optim.py ParamGroup's defaults; its pattern must then be given).
OPEN_SECTIONS = {"optim.groups": dict(pattern="", trainable=True, lr_mult=1.0, weight_decay=True, dtype="")}


def _open_entry(config: ml_collections.ConfigDict, parts: list[str]) -> None:
    """Create the entry that 'section.<name>.<field>' names in an `OPEN_SECTIONS` section, if it is missing."""
    for section, fields in OPEN_SECTIONS.items():
        head = section.split(".")
        if len(parts) != len(head) + 2 or parts[:len(head)] != head:
            continue
        node = config
        for p in head:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                return
            node = node[p]
        name, field = parts[len(head)], parts[-1]
        if name in node:
            return
        if field not in fields:
            raise ConfigError(f"unknown config key {'.'.join(parts)!r}: an entry of {section} has the fields "
                              f"{sorted(fields)}.")
        node[name] = ml_collections.ConfigDict(dict(fields))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> None:
    """Apply 'a.b=value' overrides with the type of the existing field ('optim.groups.<name>.<field>' may name a
    new group: `OPEN_SECTIONS`)."""
    for key, raw in overrides.items():
        node, *_ = config, None
        parts = key.split(".")
        _open_entry(config, parts)
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {key!r}: {p!r} is not a section; "
                                  f"sections are {sorted(k for k in node.keys())}.")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node.keys())}.")
        node[parts[-1]] = _coerce(key, raw, node[parts[-1]])


def check_choice(config, key: str, choices: Iterable[Any]) -> None:
    value = get_path(config, key)
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not valid; choose one of {choices} "
                          f"(--config.{key}=...).")


def check_positive(config, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = get_path(config, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"config.{key}={value!r} must be a number {bound} (--config.{key}=...).")


def get_path(config, key: str) -> Any:
    node = config
    for p in key.split("."):
        if p not in node:
            raise ConfigError(f"config is missing the key {key!r}; add it to the config file.")
        node = node[p]
    return node


def mesh_shape(config, num_devices: int) -> dict[str, int]:
    """Resolve config.mesh (data may be -1 = all remaining devices) against `num_devices`."""
    m = config.mesh
    for axis in ("data", "fsdp", "tensor"):
        v = m[axis]
        if not isinstance(v, int) or v == 0 or v < -1 or (v == -1 and axis != "data"):
            raise ConfigError(f"config.mesh.{axis}={v!r}: use a positive int"
                              + (" or -1 (all remaining devices)" if axis == "data" else "") + ".")
    fixed = m.fsdp * m.tensor
    data = m.data if m.data != -1 else max(num_devices // fixed, 1)
    total = data * fixed
    if total > num_devices:
        raise ConfigError(
            f"config.mesh asks for data={data} x fsdp={m.fsdp} x tensor={m.tensor} = {total} devices but only "
            f"{num_devices} are available; lower --config.mesh.data/fsdp/tensor (data=-1 uses all devices).")
    if num_devices % total:
        raise ConfigError(f"config.mesh ({data}x{m.fsdp}x{m.tensor}={total}) does not divide the {num_devices} "
                          "available devices; choose sizes whose product divides the device count.")
    return {"data": data, "fsdp": m.fsdp, "tensor": m.tensor}


def validate_common(config, num_devices: int, process_count: int = 1) -> dict[str, int]:
    """Checks shared by every family. Returns the resolved mesh shape."""
    for key in ("task", "seed", "data", "model", "optim", "train", "mesh"):
        get_path(config, key)
    check_choice(config, "train.dtype", ("float32", "bfloat16"))
    check_choice(config, "train.param_dtype", ("float32", "bfloat16"))
    check_positive(config, "train.batch_size", "train.num_steps", "train.log_every", "train.checkpoint_every",
                   "train.max_to_keep", "optim.lr")
    check_positive(config, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", allow_zero=True)
    if "grad_accum_steps" in config.optim:
        check_positive(config, "optim.grad_accum_steps")
    if "peak_tflops" in config.train:
        check_positive(config, "train.peak_tflops", allow_zero=True)
    for key in ("max_param_norm", "max_update_norm"):
        if key in config.train:
            check_positive(config, f"train.{key}", allow_zero=True)
    if "on_divergence" in config.train:
        check_choice(config, "train.on_divergence", ("stop", "skip"))
    shape = mesh_shape(config, num_devices)
    dp = shape["data"] * shape["fsdp"]
    bs = config.train.batch_size
    if bs % dp:
        raise ConfigError(f"config.train.batch_size={bs} is not divisible by the data-parallel size "
                          f"{dp} (mesh.data={shape['data']} x mesh.fsdp={shape['fsdp']}); use a multiple of {dp}, "
                          f"e.g. --config.train.batch_size={max(dp, bs - bs % dp)}.")
    if bs % process_count:
        raise ConfigError(f"config.train.batch_size={bs} is not divisible by the {process_count} processes.")
    accum = config.optim.get("grad_accum_steps", 1) if "grad_accum_steps" in config.optim else 1
    if bs % (dp * accum):
        raise ConfigError(f"config.train.batch_size={bs} must split into optim.grad_accum_steps={accum} microbatches "
                          f"that each divide over the data-parallel size {dp}; use a multiple of {dp * accum}.")
    for name in (config.evals.keys() if "evals" in config else ()):
        ev = config.evals[name]
        if "batch_size" in ev and (not isinstance(ev.batch_size, int) or ev.batch_size <= 0 or ev.batch_size % dp):
            raise ConfigError(f"config.evals.{name}.batch_size={ev.batch_size} must be a positive multiple of the "
                              f"data-parallel size {dp}.")
        if "every" in ev and (not isinstance(ev.every, int) or ev.every < 0):
            raise ConfigError(f"config.evals.{name}.every={ev.every!r} must be an int >= 0 (0 = only at the end).")
    if config.optim.warmup_steps > config.train.num_steps:
        raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} exceeds "
                          f"config.train.num_steps={config.train.num_steps}; lower it.")
    return shape


def save_config(config, workdir: str) -> str:
    """Write the resolved config as JSON (and readable repr) into the workdir."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=list)
    os.replace(path + ".tmp", path)
    return path


def run_config_section(workdir: str, key: str, *, what: str) -> dict:
    """Section ``key`` ('model.lm') of the config an earlier run saved in ``workdir/config.json``:
    how a later stage builds a module of that run's shape (BLIP-2 stage 2 over a stage-0 LM)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            value = json.load(f)
        for part in key.split("."):
            value = value[part]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{what}: cannot read {key} from {path} ({type(e).__name__}: {e}); point it at the workdir "
                          "of the earlier run (it writes config.json when it starts).") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: {key} in {path} is {value!r}, not a section.")
    return value


def load_config(spec: str, overrides: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
    """'configs/sat.py:tiny' + {'train.num_steps': '10'} -> locked ConfigDict.

    The file must define `get_config(arg)`. Overrides take the type of the existing field;
    unknown keys and wrong types raise ConfigError naming the key.
    """
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec!r}: no config file at {path!r}; use e.g. configs/sat.py:synthetic.")
    module_name = "_vlm_config_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg).")
    config = module.get_config(arg or None)
    config.unlock()
    apply_overrides(config, overrides or {})
    config.lock()
    return config


def split_config_argv(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--config.a.b=value` (or `--config.a.b value`) pairs out of argv."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value: {a}=VALUE.")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(a)
        i += 1
    return rest, overrides
