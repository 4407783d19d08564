"""The one checkpoint path: Orbax CheckpointManager over (train state, data-iterator state, metadata).

Layout under `<workdir>/checkpoints/<step>/`: `state/` (Orbax PyTree of the train state
without its frozen parameters: step, trainable params, optimizer state, model state), `data/`
(JSON of the input iterator's state — every process's, since each reads its own shard) and
`meta/` (JSON: task, step, versions, task-specific keys).

Frozen parameters (optimizer groups with ``trainable=False``: pretrained towers) never change,
so they are written once, to `<workdir>/frozen_params/` (Orbax PyTree, atomic), not into every
step; restore reads them back with the current mesh's shardings.

- Saves are asynchronous; `max_to_keep` old steps are kept.
- Restore always goes through an abstract target carrying the shardings of the *current* mesh,
  so a checkpoint written on one mesh restores onto another.
- A corrupted latest step (Orbax keeps listing it) is walked back past with a logged warning.
- A workdir holding a checkpoint of another model family or shape gives a clear error.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from vlm_jax import errors

log = logging.getLogger(__name__)

#: Orbax's replica-parallel save (its default off GPU) has each replica of a replicated array write a
#: slice of it. Each slice is a small jitted program per array shape and device, compiled at a run's
#: first save: ~160 compiles, ~6 s for a tiny BLIP-2 on 8 CPU devices, for arrays whose writes take
#: microseconds. Arrays whose slices would be under this size are written whole by one replica;
#: large replicated arrays (e.g. a 7B LM's embedding table) keep the parallel write. Registered for
#: jax.Array in Orbax's global handler registry when this module is imported.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store
    except ImportError:   # another Orbax layout: keep its default handler
        log.debug("orbax array_metadata_store not found; Orbax's default jax.Array handler is kept.")
        return
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                  min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)


_register_array_handler()


class CheckpointError(RuntimeError):
    """A workdir's checkpoints cannot be used as asked (the base of the checkpoint errors)."""


class CheckpointMismatchError(CheckpointError):
    """The workdir's checkpoint belongs to another model (family or shapes)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or not the asked-for step) in the workdir."""


# ----------------------------------------------------------------------------- quiet walk-back
def short_reason(e: BaseException, limit: int = 200) -> str:
    """'Type: first part of the message' on one line, at most ``limit`` characters (TensorStore
    errors append a multi-line spec dump after 'See full TensorStore details')."""
    import re
    text = str(e) or repr(e)
    text, _, details = text.partition("See full TensorStore details")
    text = " ".join(text.split()).rstrip(" .")
    arrays = [p for p in re.findall(r"'path': '([^']+)'", details) if not p.startswith("/")]
    suffix = f" (array {arrays[-1].rstrip('/')})" if arrays else ""   # e.g. params.init_h.kernel
    head = f"{type(e).__name__}: {text}" if text else type(e).__name__
    room = max(limit - len(suffix), 20)
    if len(head) > room:
        head = head[:room - 3] + "..."
    return (head + suffix)[:limit]


def encode_data_state(state: Any) -> dict:
    """Iterator state (bytes / str / JSON-able dict) -> JSON-able dict."""
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": base64.b64encode(state).decode("ascii")}
    return {"kind": "json", "value": state}


def gather_data_states(state: Any) -> dict:
    """Every process's iterator state in one JSON-able dict (collective: all processes call it).

    Each process reads its own shard of the data, so each has its own iterator position; Orbax
    writes JSON items from the primary process only. With one process this is
    `encode_data_state`; with P processes ``{'kind': 'per_process', 'value': [blob_0 .. blob_P-1]}``."""
    blob = encode_data_state(state)
    if jax.process_count() == 1:
        return blob
    import numpy as np
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(blob).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(raw), np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(raw)] = raw
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return {"kind": "per_process", "value": [json.loads(every[i, :n].tobytes()) for i, n in enumerate(lengths)]}


def decode_data_state(blob: dict) -> Any:
    """This process's iterator state from a saved blob (see `gather_data_states`)."""
    n = jax.process_count()
    if blob["kind"] == "per_process":
        if len(blob["value"]) != n:
            raise CheckpointMismatchError(
                f"the checkpoint's input-pipeline state was written by {len(blob['value'])} processes but this "
                f"run has {n}; each process resumes its own data shard, so resume with {len(blob['value'])} "
                "processes (or start a fresh --workdir).")
        blob = blob["value"][jax.process_index()]
    elif n > 1:
        raise CheckpointMismatchError(
            f"the checkpoint holds one process's input-pipeline state but this run has {n} processes; "
            "resume it with one process (or start a fresh --workdir).")
    if blob["kind"] == "bytes":
        return base64.b64decode(blob["value"])
    return blob["value"]


FROZEN_DIR = "frozen_params"


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.frozen_directory = os.path.join(self.workdir, FROZEN_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------ query
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, *, data_state: Any, meta: dict, force: bool = False) -> bool:
        """Async save (collective: every process calls it); returns whether a save was started.
        ``data_state``: this process's input-iterator state (all processes' are stored)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(gather_data_states(data_state)),
                                  meta=ocp.args.JsonSave(dict(meta, step=int(step))))
        return self.manager.save(int(step), args=args, force=force)

    # ------------------------------------------------------------------ frozen parameters
    def has_frozen(self) -> bool:
        return os.path.isdir(self.frozen_directory)

    def save_frozen(self, frozen) -> None:
        """Write the frozen parameter tree once (collective; a no-op when already written or empty)."""
        if not jax.tree.leaves(frozen) or self.has_frozen():
            return
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(self.frozen_directory, frozen)
        ckptr.wait_until_finished()
        ckptr.close()
        log.info("frozen parameters written once to %s", self.frozen_directory)

    def set_aside_frozen(self) -> None:
        """A fresh run found frozen_params/ from an earlier run that saved no step: keep it aside
        (`frozen_params.stale<N>`, never deleted) so this run writes its own."""
        dst, n = self.frozen_directory + ".stale", 0
        while os.path.exists(dst):
            n += 1
            dst = f"{self.frozen_directory}.stale{n}"
        if jax.process_index() == 0:
            os.rename(self.frozen_directory, dst)
            log.warning("%s belongs to an earlier run that saved no checkpoint step; moved it to %s.",
                        self.frozen_directory, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vlm_jax_frozen_set_aside")

    def restore_frozen(self, abstract_frozen):
        """The frozen tree restored onto the shardings of ``abstract_frozen``; None if not written."""
        if not jax.tree.leaves(abstract_frozen):
            return abstract_frozen
        if not self.has_frozen():
            return None
        ckptr = ocp.StandardCheckpointer()
        try:
            return ckptr.restore(self.frozen_directory, abstract_frozen)
        except Exception as e:
            raise CheckpointMismatchError(
                f"{self.frozen_directory} (the frozen parameters of this workdir) does not match this run's frozen "
                f"parameters ({type(e).__name__}: {str(e)[:300]}); it was written with another config. Use a fresh "
                "--workdir, or the config that wrote it.") from e
        finally:
            ckptr.close()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ restore
    def _discard(self, steps: list[int]) -> None:
        """Move unreadable steps aside (never deleted: `<step>.corrupt`), so that training can save
        those step numbers again (Orbax refuses to save a step <= the latest listed one)."""
        for s in steps:
            src = os.path.join(self.directory, str(s))
            dst = f"{src}.corrupt"
            n = 0
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.corrupt{n}"
            if jax.process_index() == 0 and os.path.isdir(src):
                os.rename(src, dst)
                log.info("moved unreadable checkpoint step %d to %s (kept, not deleted).", s, dst)
        if steps:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("vlm_jax_checkpoint_discard")
            self.manager.reload()

    def _check_params_match(self, step: int, abstract_state) -> bool:
        """Compare the saved tree (parameter names/shapes, model state, optimizer-state leaf shapes)
        with this run's before touching array data: a difference is another config
        (CheckpointMismatchError). Returns False when the step's tree metadata is unreadable
        (a corrupted step: the caller walks back past it), True when it matches."""
        try:
            tree = self.manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)
            saved = {f"params/{k}": v for k, v in _params_shapes(tree["params"]).items()}
            saved.update({f"model_state/{k}": v for k, v in _params_shapes(tree["model_state"] or {}).items()})
            saved_opt = sorted(_params_shapes(tree.get("opt_state") or {}).values())
        except Exception:  # metadata missing / truncated: a corrupted step
            return False
        want = {f"params/{k}": v for k, v in _params_shapes(abstract_state["params"]).items()}
        want.update({f"model_state/{k}": v for k, v in _params_shapes(abstract_state["model_state"]).items()})
        if saved != want:
            missing, extra, shape = shape_diff(want, saved, limit=3)
            raise CheckpointMismatchError(
                f"the checkpoint at {self.directory} (step {step}) was written by a different model: "
                f"parameters missing from it {missing}, unexpected in it {extra}, shape differences "
                f"(name, saved, expected) {shape}. Use a fresh --workdir, or the config that wrote it.")
        want_opt = sorted(_params_shapes(abstract_state.get("opt_state") or {}).values())
        if saved_opt != want_opt:
            raise CheckpointMismatchError(
                f"the checkpoint at {self.directory} (step {step}) has a different optimizer state than this run "
                f"({len(saved_opt)} saved leaves vs {len(want_opt)}): it was written with other optimizer groups "
                "(config.optim.groups, frozen parameters). Use a fresh --workdir, or the config that wrote it.")
        return True

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, abstract_state, *, step: int | None = None, expect_meta: dict | None = None,
                data_state: bool = True, set_aside_unreadable: bool = True):
        """-> (step, state, data_state, meta) or None if there is nothing to restore.

        `data_state`: decode this process's input-iterator state (training resumes it; it must
        have been written by as many processes as this run has). False (evaluation) skips it
        and returns None in its place, so any process count can evaluate a checkpoint.

        `abstract_state`: the checkpoint item (a dict with 'params' and 'model_state' among its
        keys) as jax.ShapeDtypeStructs with `.sharding` for the current mesh.
        `expect_meta`: keys that must match the saved metadata (e.g. {'task': 'sat'}); a mismatch
        raises CheckpointMismatchError naming the key. With `step=None` the latest readable step
        is used, walking back past corrupted ones with a warning. `set_aside_unreadable`: move the
        steps walked past to ``<step>.corrupt`` (training, which must save those step numbers again);
        False (evaluation) leaves every file where it is.
        """
        steps = self.all_steps()
        if not steps:
            return None
        candidates = [step] if step is not None else list(reversed(steps))
        if step is not None and step not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {steps}.")
        errors.quiet_async_noise()   # a failed read's asyncio / TensorStore leftovers
        last_error = None
        unreadable: list[int] = []
        for s in candidates:
            try:
                meta = self.read_meta(s)
            except Exception as e:  # unreadable metadata: corrupted step
                last_error = e
                unreadable.append(s)
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an earlier step.",
                            s, self.directory, short_reason(e))
                continue
            for key, want in (expect_meta or {}).items():
                have = meta.get(key)
                if have != want:
                    raise CheckpointMismatchError(
                        f"the checkpoint at {self.directory} (step {s}) was written with {key}={have!r} but this "
                        f"run has {key}={want!r}. Use a fresh --workdir, or the config that wrote it.")
            if not self._check_params_match(s, abstract_state):
                last_error = RuntimeError("the step's tree metadata is missing or unreadable")
                unreadable.append(s)
                log.warning("checkpoint step %d in %s has unreadable tree metadata; trying an earlier step.",
                            s, self.directory)
                continue
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # truncated / missing files (the tree matched): a corrupted step
                last_error = e
                unreadable.append(s)
                log.warning("checkpoint step %d in %s could not be restored (%s); trying an earlier step.",
                            s, self.directory, short_reason(e))
                continue
            if set_aside_unreadable:
                self._discard(unreadable)
            elif unreadable:
                log.warning("evaluating step %d; unreadable steps %s were left in place (training sets them aside "
                            "when it resumes).", s, unreadable)
            return s, out["state"], (decode_data_state(out["data"]) if data_state else None), meta
        raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps}); last error: "
                              f"{short_reason(last_error)}. Move the directory away to start fresh.")


def shape_diff(want: dict, have: dict, limit: int = 5) -> tuple[list, list, list]:
    """Between two {path: shape} dicts: (paths missing from ``have``, paths only in ``have``,
    [(path, have shape, want shape)] where they differ), each cut to ``limit`` entries."""
    missing = sorted(set(want) - set(have))[:limit]
    extra = sorted(set(have) - set(want))[:limit]
    shape = [(k, have[k], want[k]) for k in sorted(set(want) & set(have)) if want[k] != have[k]][:limit]
    return missing, extra, shape


def _params_shapes(tree) -> dict[str, tuple]:
    """{'a/b/kernel': shape} for a params pytree of arrays / ShapeDtypeStructs / Orbax ArrayMetadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape")):
        if hasattr(leaf, "shape"):
            out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = tuple(leaf.shape)
    return out


def read_subtrees(path: str, *, step: int, subtree: str, want: dict, describe: str) -> dict:
    """Partial restore from another run: ``want`` maps 'params' and model-state collection names
    to abstract (or concrete) subtrees of *this* model; returns host numpy arrays of the same
    subtrees read from run ``path`` (its workdir or its checkpoints/ dir) at ``step`` (-1 =
    latest), at ``subtree`` of the source. Trainable params and model state come from the step,
    frozen params from the run's frozen_params/. Raises ValueError naming what is missing."""
    from vlm_jax.init_sources import InitSourceError, _get
    root = os.path.abspath(path)
    if os.path.basename(root) == "checkpoints":
        root = os.path.dirname(root)
    ckpt_dir = os.path.join(root, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise InitSourceError(f"{describe}: {path!r} holds no checkpoints/; give the workdir of the earlier run.")
    mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
                                item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise InitSourceError(f"{describe}: {ckpt_dir} has no checkpoint steps.")
        s = steps[-1] if step < 0 else step
        if s not in steps:
            raise InitSourceError(f"{describe}: no step {s} in {ckpt_dir}; available: {steps}.")
        meta = mgr.item_metadata(s)["state"]
        meta = getattr(meta, "tree", meta)
        frozen_meta = None
        frozen_dir = os.path.join(root, FROZEN_DIR)
        out = {}
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        for coll, ref in want.items():
            saved_tree = meta["params"] if coll == "params" else (meta.get("model_state") or {}).get(coll, {})
            in_step = _get(saved_tree, subtree)
            in_frozen = None
            if coll == "params" and os.path.isdir(frozen_dir):
                if frozen_meta is None:
                    fm = ocp.PyTreeCheckpointer().metadata(frozen_dir)     # StepMetadata (orbax 0.12)
                    fm = getattr(fm, "item_metadata", fm)
                    frozen_meta = getattr(fm, "tree", fm)
                in_frozen = _get(frozen_meta, subtree)
            if in_step is None and in_frozen is None:
                raise InitSourceError(f"{describe}: the run at {root} (step {s}) has no {coll!r} subtree {subtree!r}.")
            parts = []
            for name, tree, directory in (("step", in_step, None), ("frozen", in_frozen, frozen_dir)):
                if tree is None:
                    continue
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), tree)
                keys = [k for k in subtree.split("/") if k]
                item = abstract
                for k in reversed(keys):
                    item = {k: item}
                if name == "step":
                    item = {"params": item} if coll == "params" else {"model_state": {coll: item}}
                restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=cpu), item)
                if name == "step":
                    res = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True)))["state"]
                    res = res["params"] if coll == "params" else res["model_state"][coll]
                else:
                    res = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True))
                parts.append(jax.device_get(_get(res, subtree)))
            from vlm_jax.optim import merge
            got = parts[0] if len(parts) == 1 else merge(parts[0], parts[1])
            out[coll] = got
        return out
    finally:
        mgr.close()
