"""Per-process sharding arithmetic and grain worker setup shared by the input pipelines.

Legend: B global batch (all processes), b per-process batch = B / P, P process count.
"""
from __future__ import annotations


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """-> (index, count); None defaults to jax.process_index() / jax.process_count()."""
    if process_index is None or process_count is None:
        import jax  # only for the defaults
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count={process_count!r} must be a positive int.")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must be in [0, {process_count}).")
    return process_index, process_count


def local_batch_size(global_batch: int, process_count: int, what: str) -> int:
    """b = B / P; `what` names the setting in the error (e.g. 'config.train.batch_size')."""
    if not isinstance(global_batch, int) or global_batch < 1 or global_batch % process_count:
        raise ValueError(f"{what}={global_batch!r} must be a positive multiple of the number of "
                         f"processes ({process_count}); change {what}.")
    return global_batch // process_count


def absl_flags_ready() -> None:
    """grain's worker processes read absl flags (e.g. --grain_enable_multiprocess_worker_profiling);
    this project parses its own flags with argparse, so absl's are marked parsed at their
    defaults (a caller that parsed absl flags itself keeps its values)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
