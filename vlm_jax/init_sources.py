"""Pretrained and previous-stage initialisation of parameter subtrees, from config.

``config.init`` is a ConfigDict of named entries; each seeds one subtree of the model's
variables after the random init and before training starts (never on resume: a resumed run
restores its own checkpoint):

  target   path of the subtree in this model, '/'-separated ('encoder', 'qformer', 'lm').
  source   'hf'         a Hugging Face checkpoint directory (config.json + safetensors), read
                        with `vlm_jax.convert.load_hf`; its variables must have exactly the
                        target's tree (names and shapes).
           'checkpoint' an earlier run of this project: its workdir (or its checkpoints/ dir);
                        the subtree ``source_target`` (default: ``target``) of that run's
                        parameters (trainable ones from the step, frozen ones from its
                        frozen_params/) and model state is restored, nothing else (partial
                        Orbax restore): stage-1 Q-Former -> stage 2.
           ''           the entry is off (random init).
  path     the directory.
  step     checkpoint source: the step to read (-1 = latest).
  source_target  checkpoint source: subtree path in the source run ('' = target).

Variables are ``{'params': ..., 'model_state': {collection: ...}}`` (the trainer's layout). For
an HF source, the converter's 'params' go to ``params/<target>`` and every other collection
(e.g. ResNet 'batch_stats') to ``model_state/<collection>/<target>``. A missing target, a
missing or extra leaf, or a shape mismatch raises `InitSourceError` naming the path.

BLIP-2 stage 2 seeds 'qformer' from the stage-1 workdir and 'vision'/'lm' from HF directories;
Flamingo seeds 'vision' and 'lm' from HF directories; SAT's `coco` config seeds its ResNet.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from vlm_jax.config_lib import ConfigError

log = logging.getLogger("vlm_jax")
KINDS = ("", "hf", "checkpoint")
FIELDS = ("target", "source", "path", "step", "source_target")


class InitSourceError(ValueError):
    """An init source cannot seed its target; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    name: str
    target: str
    source: str
    path: str
    step: int = -1
    source_target: str = ""

    def describe(self) -> str:
        where = f"{self.path}" + (f"@{self.step}" if self.source == "checkpoint" and self.step >= 0 else "")
        return f"{self.source}:{where}" + (f" [{self.source_target}]" if self.source_target else "")


def placeholder(init_fn, *args):
    """Zeros with the shapes, dtypes and logical-axis boxes of ``init_fn(*args)`` (traced with
    `jax.eval_shape`, so nothing is computed): the init value of a subtree that an init source
    always overwrites (a pretrained tower), so its random init is never traced or run."""
    import jax.numpy as jnp
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init_fn, *args))


def sources_from_config(config) -> list[InitSource]:
    """The active entries of ``config.init`` (source != ''), validated."""
    if "init" not in config:
        return []
    out = []
    for name in config.init.keys():
        e = config.init[name]
        unknown = sorted(set(e.keys()) - set(FIELDS))
        if unknown:
            raise ConfigError(f"config.init.{name} has unknown fields {unknown}; an entry has {FIELDS}.")
        source = e.get("source", "")
        if source not in KINDS:
            raise ConfigError(f"config.init.{name}.source={source!r}: use 'hf', 'checkpoint' or '' (off).")
        if not source:
            continue
        if not e.get("target"):
            raise ConfigError(f"config.init.{name}.target is empty; name the parameter subtree to seed, e.g. 'encoder'.")
        path = e.get("path", "")
        if not path:
            raise ConfigError(f"config.init.{name}.source={source!r} needs a directory: "
                              f"--config.init.{name}.path=/path/to/{'hf_dir' if source == 'hf' else 'workdir'}.")
        if not os.path.isdir(path):
            raise ConfigError(f"config.init.{name}.path={path!r} is not a directory; give the "
                              f"{'Hugging Face checkpoint directory' if source == 'hf' else 'earlier run workdir'}.")
        out.append(InitSource(name=name, target=e.target, source=source, path=path,
                              step=int(e.get("step", -1)), source_target=e.get("source_target", "")))
    targets = [s.target for s in out]
    for s in out:
        clash = [t for t in targets if t != s.target and (t.startswith(s.target + "/") or s.target.startswith(t + "/"))]
        if targets.count(s.target) > 1 or clash:
            raise ConfigError(f"config.init: target {s.target!r} overlaps another entry's target; each subtree "
                              "is seeded by one entry.")
    return out


# ----------------------------------------------------------------------------- tree helpers
def _get(tree, path: str):
    node = tree
    for k in [p for p in path.split("/") if p]:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _set(tree: dict, path: str, value) -> dict:
    keys = [p for p in path.split("/") if p]
    if not keys:
        return value
    out = dict(tree)
    node = out
    for k in keys[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[keys[-1]] = value
    return out


def _shapes(tree) -> dict[str, tuple]:
    from vlm_jax.optim import path_str
    return {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_tree(want, got, *, where: str, source: InitSource) -> None:
    """Raise InitSourceError listing missing / unexpected / mis-shaped leaves of ``got`` vs ``want``."""
    w, g = _shapes(want), _shapes(got)
    if w == g:
        return
    from vlm_jax.checkpoint import shape_diff
    missing, extra, shape = shape_diff(w, g)
    raise InitSourceError(
        f"config.init.{source.name} ({source.describe()}) cannot seed {where}: leaves missing from the source "
        f"{missing}, not in this model {extra}, shape differences (path, source, model) {shape}. Check that the "
        "source has the architecture of the config (widths, depths, vocabulary) and that target/source_target "
        "name the same module.")


def _collections(variables: dict):
    """(key path, tree) of 'params' and of each model-state collection of ``variables``."""
    yield ("params",), variables["params"]
    for coll, tree in (variables.get("model_state") or {}).items():
        if isinstance(tree, dict):
            yield ("model_state", coll), tree


def _with(variables: dict, keys: tuple, tree) -> dict:
    out = dict(variables)
    if keys == ("params",):
        out["params"] = tree
    else:
        out["model_state"] = dict(out["model_state"], **{keys[1]: tree})
    return out


def prune(variables: dict, targets: tuple) -> dict:
    """``variables`` ({'params', 'model_state'}) with the subtree at each target path replaced by None,
    in 'params' and in every model-state collection that has it (a target absent from the model is
    left for `apply_sources` to report). Used on the variables, and on their shardings."""
    for keys, tree in list(_collections(variables)):
        for t in targets:
            if _get(tree, t) is not None:
                tree = _set(tree, t, None)
        variables = _with(variables, keys, tree)
    return variables


def unprune(variables: dict, abstract: dict, targets: tuple) -> dict:
    """The inverse of `prune` on shapes: each pruned subtree becomes its ShapeDtypeStructs from
    ``abstract`` (the full variables' shapes), which `apply_sources` then replaces with values."""
    for (keys, tree), (_, full) in zip(list(_collections(variables)), list(_collections(abstract))):
        for t in targets:
            if _get(full, t) is not None:
                tree = _set(tree, t, _get(full, t))
        variables = _with(variables, keys, tree)
    return variables


def check_all_seeded(variables: dict, targets: tuple) -> None:
    """After `apply_sources` on `unprune`'s output every leaf must be an array (never a shape)."""
    from vlm_jax.optim import path_str
    left = [path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(variables)
            if isinstance(x, jax.ShapeDtypeStruct)]
    if left:
        raise InitSourceError(f"config.init seeded targets {list(targets)} but left {left[:5]} "
                              f"({len(left)} leaves) without values; each target's source must hold them all.")


# ----------------------------------------------------------------------------- readers
def _read_hf(src: InitSource) -> dict[str, Any]:
    from vlm_jax.convert import load_hf
    _, variables, _ = load_hf(src.path)
    return {k: jax.device_get(v) for k, v in variables.items()}


def _read_checkpoint(src: InitSource, want: dict[str, Any]) -> dict[str, Any]:
    """Partial restore of ``want`` ({'params': subtree, collection: subtree}) from a run's checkpoint."""
    from vlm_jax import checkpoint as ckpt_lib
    subtree_path = src.source_target or src.target
    return ckpt_lib.read_subtrees(src.path, step=src.step, subtree=subtree_path, want=want,
                                  describe=f"config.init.{src.name}")


def apply_sources(variables: dict, sources: list[InitSource], shardings: dict) -> dict:
    """Seed ``variables`` ({'params', 'model_state'}, device arrays) from ``sources``.

    ``shardings`` has the structure of ``variables`` (NamedShardings): seeded leaves are placed
    straight onto the mesh with the sharding of the leaf they replace."""
    for src in sources:
        target_params = _get(variables["params"], src.target)
        if target_params is None:
            top = sorted(variables["params"]) if isinstance(variables["params"], dict) else []
            raise InitSourceError(f"config.init.{src.name}.target={src.target!r} is not a parameter subtree of this "
                                  f"model; top-level subtrees are {top}.")
        want = {"params": target_params}
        for coll, tree in (variables.get("model_state") or {}).items():
            sub = _get(tree, src.target) if isinstance(tree, dict) else None
            if sub is not None:
                want[coll] = sub
        got = _read_hf(src) if src.source == "hf" else _read_checkpoint(src, want)
        for coll in sorted(set(want) | set(got)):
            if coll not in want:
                raise InitSourceError(f"config.init.{src.name} ({src.describe()}) holds collection {coll!r} that this "
                                      f"model does not have under {src.target!r}.")
            if coll not in got:
                raise InitSourceError(f"config.init.{src.name} ({src.describe()}) has no {coll!r} values for "
                                      f"{src.target!r}; the model needs them.")
            where = f"{'params' if coll == 'params' else 'model_state/' + coll}/{src.target}"
            check_same_tree(want[coll], got[coll], where=where, source=src)
            if coll == "params":
                sh = _get(shardings["params"], src.target)
                placed = jax.tree.map(lambda x, ref, s: jax.device_put(np.asarray(x, ref.dtype), s),
                                      got[coll], want[coll], sh)
                variables = dict(variables, params=_set(variables["params"], src.target, placed))
            else:
                sh = _get(shardings["model_state"][coll], src.target)
                placed = jax.tree.map(lambda x, ref, s: jax.device_put(np.asarray(x, ref.dtype), s),
                                      got[coll], want[coll], sh)
                ms = dict(variables["model_state"])
                ms[coll] = _set(ms[coll], src.target, placed)
                variables = dict(variables, model_state=ms)
        log.info("initialised %s from %s (config.init.%s)", src.target, src.describe(), src.name)
    return variables
