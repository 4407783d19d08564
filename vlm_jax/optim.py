"""Parameter groups and the optimizer, from config.

A parameter's *path* is its key path joined by '/', e.g. ``encoder/stage_0_block_0/conv_0/kernel``
or ``lm/layers_3/attn/query/kernel``. A `ParamGroup` claims the parameters whose path matches its
regular expression (`re.fullmatch`) and says what happens to them:

  trainable     False: no gradient is taken, no optimizer slots, and the values live in the
                train state's ``frozen`` tree, which is saved once per workdir instead of in
                every checkpoint (vlm_jax/checkpoint.py).
  lr_mult       the group's learning rate is ``lr_mult * schedule(step)``.
  weight_decay  False: no decoupled weight decay for the group (otherwise
                ``optim.weight_decay`` on matrices/kernels, never on biases, norms, scalars).
  dtype         storage dtype of the group's parameters ('' = ``train.param_dtype``), e.g.
                a frozen tower in 'bfloat16' on accelerators.

Groups come from two places: ``config.optim.groups`` (a ConfigDict of named entries with
the fields above) and the task's defaults (`Task.param_groups`, e.g. SAT freezes its encoder
with ``model.freeze_encoder``). Config groups win over task defaults; two config groups that
claim the same parameter are an error (ConfigDict keys are unordered, so there is no "first
match"). Parameters no group claims train with the defaults.

The optimizer is ``clip_by_global_norm(optim.grad_clip)`` over all trainable gradients, then
one AdamW per group (`optax.multi_transform`) with the warmup + cosine schedule scaled by the
group's ``lr_mult``. It only ever sees the trainable tree.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax

from vlm_jax.config_lib import ConfigError

PyTree = Any
DEFAULT_GROUP = "default"
GROUP_FIELDS = ("pattern", "trainable", "lr_mult", "weight_decay", "dtype")
DTYPES = ("", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Parameters whose '/'-joined path fullmatches ``pattern`` (see the module docstring)."""
    name: str
    pattern: str
    trainable: bool = True
    lr_mult: float = 1.0
    weight_decay: bool = True
    dtype: str = ""

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"config.optim.groups.{self.name}.pattern={self.pattern!r} is not a regular "
                              f"expression ({e}); e.g. 'encoder/.*'.") from None
        if self.dtype not in DTYPES:
            raise ConfigError(f"config.optim.groups.{self.name}.dtype={self.dtype!r}: use one of {DTYPES}.")
        if not self.lr_mult >= 0:
            raise ConfigError(f"config.optim.groups.{self.name}.lr_mult={self.lr_mult!r} must be >= 0.")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


def path_str(path) -> str:
    """Key path -> 'a/b/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def groups_from_config(config) -> list[ParamGroup]:
    """`ParamGroup`s of ``config.optim.groups`` (each entry: pattern, trainable, lr_mult,
    weight_decay, dtype; missing fields take the dataclass defaults)."""
    groups = config.optim.get("groups") if "groups" in config.optim else None
    out = []
    for name in (groups or {}).keys():
        entry = groups[name]
        unknown = sorted(set(entry.keys()) - set(GROUP_FIELDS))
        if unknown:
            raise ConfigError(f"config.optim.groups.{name} has unknown fields {unknown}; a group has "
                              f"{GROUP_FIELDS}.")
        if not entry.get("pattern"):
            raise ConfigError(f"config.optim.groups.{name}.pattern is empty; give a regular expression over "
                              "parameter paths, e.g. 'encoder/.*'.")
        out.append(ParamGroup(name=name, **{k: entry[k] for k in GROUP_FIELDS if k in entry}))
    return out


def assign_groups(params: PyTree, config_groups: Sequence[ParamGroup],
                  task_groups: Sequence[ParamGroup] = ()) -> PyTree:
    """Pytree (structure of ``params``) of group names; see the module docstring for precedence."""
    names = [g.name for g in list(config_groups) + list(task_groups)]
    if DEFAULT_GROUP in names:
        raise ConfigError(f"config.optim.groups: the name {DEFAULT_GROUP!r} is reserved for unclaimed parameters.")

    def one(path, _):
        p = path_str(path)
        hits = [g.name for g in config_groups if g.matches(p)]
        if len(hits) > 1:
            raise ConfigError(f"parameter {p!r} matches config.optim.groups {hits}; make the patterns disjoint.")
        if hits:
            return hits[0]
        for g in task_groups:
            if g.matches(p):
                return g.name
        return DEFAULT_GROUP

    return jax.tree_util.tree_map_with_path(one, params)


def group_table(config_groups: Sequence[ParamGroup], task_groups: Sequence[ParamGroup] = ()) -> dict:
    """name -> ParamGroup (config groups shadow task groups of the same name; plus 'default')."""
    table = {DEFAULT_GROUP: ParamGroup(DEFAULT_GROUP, ".*")}
    for g in list(task_groups) + list(config_groups):
        table[g.name] = g
    return table


def check_groups_claim(labels: PyTree, groups: Iterable[ParamGroup]) -> None:
    """A config group that claims no parameter is a typo: say so, naming the group."""
    used = set(jax.tree.leaves(labels))
    for g in groups:
        if g.name not in used:
            raise ConfigError(f"config.optim.groups.{g.name}.pattern={g.pattern!r} matches no parameter; "
                              "parameter paths look like 'encoder/stage_0_block_0/conv_0/kernel'.")


# ----------------------------------------------------------------------------- split / merge
def _flatten(tree) -> dict[tuple, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)] = leaf
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def split(params: PyTree, trainable_mask: PyTree) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the leaves where the mask is True / False.

    Both keep the original nesting (absent branches dropped); `merge` inverts it."""
    flat, mask = _flatten(params), _flatten(trainable_mask)
    return (_unflatten({k: v for k, v in flat.items() if mask[k]}),
            _unflatten({k: v for k, v in flat.items() if not mask[k]}))


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split`: one nested dict with the leaves of both (disjoint paths)."""
    if not frozen:
        return trainable
    if not trainable:
        return frozen
    flat = _flatten(trainable)
    flat.update(_flatten(frozen))
    return _unflatten(flat)


def subtree(tree: dict, path: str):
    """``tree['a']['b']`` for path 'a/b' ('' = the whole tree); KeyError naming the missing key."""
    node = tree
    for k in [p for p in path.split("/") if p]:
        if not isinstance(node, dict) or k not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"{path!r}: no {k!r} (keys there: {have})")
        node = node[k]
    return node


def cast_groups(params: PyTree, labels: PyTree, table: dict) -> PyTree:
    """Each leaf in its group's storage dtype (float leaves only; '' keeps the leaf's dtype)."""
    def one(p, label):
        d = table[label].dtype
        if not d or not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return p.astype(jnp.dtype(d))
    return jax.tree.map(one, params, labels)


# ----------------------------------------------------------------------------- optimizer
def make_schedule(config) -> optax.Schedule:
    o, steps = config.optim, config.train.num_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(steps, o.warmup_steps + 1), end_value=o.lr * o.end_lr_fraction)


def _decay_mask(params):
    """Weight decay on matrices/kernels only (not biases, norms, gates, scalars)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, labels: PyTree, table: dict) -> optax.GradientTransformation:
    """AdamW per group over the *trainable* tree; ``labels`` are its group names."""
    o = config.optim
    schedule = make_schedule(config)
    used = sorted(set(jax.tree.leaves(labels)))
    per_group = {}
    for name in used:
        g = table[name]
        lr = schedule if g.lr_mult == 1.0 else (lambda step, m=g.lr_mult: m * schedule(step))
        per_group[name] = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                      weight_decay=o.weight_decay if g.weight_decay else 0.0, mask=_decay_mask)
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    if not per_group:     # nothing trains (e.g. an evaluation-only config)
        return optax.chain(clip, optax.identity())
    return optax.chain(clip, optax.multi_transform(per_group, labels))
