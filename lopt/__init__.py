"""Learned optimizers, hand-designed teachers, the outer loop, checkpoints and export."""

from lopt.base import LearnedOptimizer, MetaParams
from tasks.registry import Registry

REGISTRY: Registry[LearnedOptimizer] = Registry("learned optimizer")
register = REGISTRY.register


def get(name: str, **overrides) -> LearnedOptimizer:
    """Build the learned optimizer registered as ``name`` with ``overrides`` of its options."""
    return REGISTRY.get(name, **overrides)


def names() -> list[str]:
    return REGISTRY.names()


from lopt import mlp as _mlp  # noqa: E402,F401
from lopt import adafac as _adafac  # noqa: E402,F401
from lopt import rnn as _rnn  # noqa: E402,F401
from lopt import hyper as _hyper  # noqa: E402,F401
from lopt import velo as _velo  # noqa: E402,F401

__all__ = ["LearnedOptimizer", "MetaParams", "get", "names", "register"]
