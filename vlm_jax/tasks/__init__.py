"""Task lookup: `config.task` names a module `vlm_jax.tasks.<name>` exposing `make_task(config)`."""
import importlib

from vlm_jax.tasks.base import Task


def make_task(config) -> Task:
    try:
        module = importlib.import_module(f"vlm_jax.tasks.{config.task}")
    except ModuleNotFoundError as e:
        if e.name == f"vlm_jax.tasks.{config.task}":
            raise ValueError(f"config.task={config.task!r}: no module vlm_jax/tasks/{config.task}.py; "
                             "set --config.task to one of 'sat', 'blip2', 'flamingo'.") from None
        raise
    return module.make_task(config)
