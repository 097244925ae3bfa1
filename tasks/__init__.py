"""Inner problems: task families, models and data (DESIGN.md, "tasks/")."""

from tasks.base import SPLITS, TaskFamily
from tasks.registry import ConfigError, Registry

REGISTRY: Registry[TaskFamily] = Registry("task family")
register = REGISTRY.register


def get(name: str, **overrides) -> TaskFamily:
    """Build the task family registered as ``name`` with ``overrides`` of its options."""
    return REGISTRY.get(name, **overrides)


def names() -> list[str]:
    return REGISTRY.names()


# Importing the modules registers their families.
from tasks import quadratic as _quadratic  # noqa: E402,F401
from tasks import digits as _digits  # noqa: E402,F401
from tasks import image as _image  # noqa: E402,F401
from tasks import conv as _conv  # noqa: E402,F401
from tasks import text as _text  # noqa: E402,F401

__all__ = ["ConfigError", "SPLITS", "TaskFamily", "get", "names", "register"]
