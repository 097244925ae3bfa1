"""The inner unroll engine, reset policies and the meta-gradient estimators (DESIGN.md,
"estimators/").

Modules, bottom up (each imports only those above it in this list, plus ``lopt``'s optimizer
library and ``tasks``): ``threefry`` (a faster CPU lowering of JAX's random-number hash, which
the training layer installs; importing this package changes nothing in JAX), ``keys`` (random
keys and salts), ``meta_loss`` (the meta-loss definition), ``schedules`` (length schedules),
``resets`` (fresh resets, ELO's replay buffer), ``unroll`` (the Unroller and the meta-loss),
``base`` (the estimator contract, ES helpers), the estimators ``tbptt``, ``es``, ``pes``,
``merged``, ``full_es``, and ``imitation`` (Chen et al. 2020's imitation episodes, a wrapper of
any of them).
"""

from estimators.base import Estimator
from estimators.meta_loss import MetaLoss
from estimators.unroll import Unroller
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

__all__ = ["Estimator", "MetaLoss", "Unroller", "get", "names", "register", "schedules"]
