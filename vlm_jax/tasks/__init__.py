"""Task lookup: ``config.task`` names a module exposing ``make_task(config, *, workdir, mesh)``:
a short name 'sat' means `vlm_jax.tasks.sat`; a dotted name ('mypkg.my_task') is imported as is,
so a task can live outside the package (the tests define one)."""
import importlib

from vlm_jax.tasks.base import Task


def task_module(name: str):
    """The task's module; a ConfigError naming `config.task` if there is none."""
    module = name if "." in name else f"vlm_jax.tasks.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(f"{e.name}."):
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"config.task={name!r}: there is no module {module}; use a task that exists "
                              "(e.g. 'sat') or an importable module path.") from None
        raise
    if not hasattr(mod, "make_task"):
        from vlm_jax.config_lib import ConfigError
        raise ConfigError(f"config.task={name!r}: module {module} defines no make_task(config, *, workdir, mesh).")
    return mod


def make_task(config, *, workdir=None, mesh=None) -> Task:
    return task_module(config.task).make_task(config, workdir=workdir, mesh=mesh)
