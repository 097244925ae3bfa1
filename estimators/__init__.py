"""The inner unroll engine and the meta-gradient estimators (DESIGN.md, "estimators/")."""

from estimators.base import Estimator
from estimators.unroll import MetaLoss, Unroller
from tasks.registry import Registry

REGISTRY: Registry[Estimator] = Registry("estimator")
register = REGISTRY.register


def get(name: str, **overrides) -> Estimator:
    """Build the estimator registered as ``name`` with ``overrides`` of its options."""
    return REGISTRY.get(name, **overrides)


def names() -> list[str]:
    return REGISTRY.names()


from estimators import schedules  # noqa: E402,F401
from estimators import tbptt as _tbptt  # noqa: E402,F401
from estimators import pes as _pes  # noqa: E402,F401
from estimators import es as _es  # noqa: E402,F401
from estimators import merged as _merged  # noqa: E402,F401
from estimators import full_es as _full_es  # noqa: E402,F401
from estimators import replay  # noqa: E402,F401  (ELO replay buffer, an Unroller option)
from estimators import imitation  # noqa: E402,F401  (imitation, self-improving, behaviour cloning)

__all__ = [
    "Estimator", "MetaLoss", "Unroller", "get", "imitation", "names", "register", "replay",
    "schedules",
]
