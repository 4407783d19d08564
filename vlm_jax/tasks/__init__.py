"""Task lookup: `config.task` names a module `vlm_jax.tasks.<name>` exposing `make_task(config)`."""
import importlib

from vlm_jax.tasks.base import Task


def task_module(name: str):
    """The module `vlm_jax.tasks.<name>`; a ConfigError naming `config.task` if there is none."""
    try:
        return importlib.import_module(f"vlm_jax.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"vlm_jax.tasks.{name}":
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"config.task={name!r}: there is no vlm_jax/tasks/{name}.py; "
                              "use a task that exists (e.g. 'sat').") from None
        raise


def make_task(config) -> Task:
    return task_module(config.task).make_task(config)
