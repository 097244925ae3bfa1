"""``lopt.torch``: the ``mlp`` and ``adafac_mlp`` learned optimizers as ``torch.optim.Optimizer``s.

A learned optimizer meta-trained in JAX and exported with :func:`lopt.export.save` trains a
PyTorch model with the usual loop (``pip install 'lopt[torch]'``):

    import lopt.torch
    opt = lopt.torch.load("optimizer.safetensors", model.parameters())
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

:func:`load` returns an :class:`MLPLOptTorch` (``mlp``: Metz et al. 2019, "Understanding and
correcting pathologies in the training of learned optimizers", App. D.1) or an
:class:`AdafacMLPLOptTorch` (``adafac_mlp``: Metz et al. 2022, "Practical tradeoffs between
memory, compute, and performance in learned optimizers", the small_fc_lopt architecture of
learned_optimization), or a :class:`VeloTorch` (``velo``: ``lopt/torch/velo.py``; it needs
``num_steps`` and the loss at every step). Other architectures (``lstm_dm``, ``rnnprop``,
``hyper_adam``) raise :class:`UnsupportedArchitectureError`.

Same numbers as JAX. Each class computes, per parameter tensor and in float32, exactly the
update of its JAX module (``lopt/mlp.py``, ``lopt/adafac.py``, whose docstrings list the
features): the same accumulators and decays, the features normalised by
``x / sqrt(mean(x^2) + norm_eps)`` over the tensor's own elements, the time features
``tanh(t / x - 1)`` of the number of steps taken before this one, adafac's reciprocal-sqrt
epsilons (1e-6 for the second moment, 1e-8 for the factored accumulators), the ReLU MLP
``x @ w + b`` with the exported weights, and the update ``p <- p - d * exp(m * exp_mult) * lr``
with ``lr`` the export's ``step_mult``; also the options an import from learned_optimization
sets (``lopt.importer``: ``norm_eps``, adafac's ``factored_order``, ``preconditioner``,
``factored_grad_eps``, ``decay_param``). Only float rounding differs (reduction order, library
``exp``/``tanh``/``rsqrt``); ``tests/lopt/test_torch.py`` trains one model with both for 100
steps on the CPU and bounds the difference, ``tests/lopt/test_import.py`` compares an imported
optimizer with learned_optimization's own steps.

Speed: the MLP runs over chunks of rows with its first layer folded with the normalisation and
time features, adafac's features are written feature-major a slab at a time (``base.py``,
``adafac.py``); what that bought and why: docs/performance.md, "One lopt.torch update".

Layouts. The optimizer sees each parameter tensor with the shape it has; nothing is transposed.
The ``mlp`` optimizer is elementwise apart from the per-tensor normalisation, so a tensor's
layout does not matter to it. ``adafac_mlp`` factors its second moments over the two largest
axes of the tensor, in axis order (:func:`lopt.adafac.factored_axes`), so a torch ``Linear``
weight (out, in) is factored over its two axes just as a flax kernel (in, out) is; its "row"
accumulator then averages over the input axis and belongs to an output unit, where a flax
kernel's belongs to an input unit. The features are the same set; their order in the MLP's input
(rows before columns) follows the tensor's axis order. A torch ``Conv2d`` weight (out, in, kh, kw)
is factored over (out, in) when those are its two largest axes.

Param groups carry one option, ``lr`` (default: the export's ``step_mult``), which scales the
step exactly as ``step_mult`` does, so torch learning-rate schedulers apply. Parameters whose
``.grad`` is None are skipped (their accumulators and step count do not advance; the JAX
optimizer has one step count for all parameters, which agrees while every parameter gets a
gradient every step). Gradients and parameters of any float dtype are read as float32, the
update is cast to the parameter's dtype, and the state is kept in float32.

``state_dict()`` holds the per-parameter state (``step`` and the accumulators) and the groups'
``lr``, not the meta-params: load it into an optimizer built from the same export.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

try:
    import torch  # noqa: F401  (the submodules import it; this says how to install it)
except ImportError as e:  # torch is an optional extra
    raise ImportError(
        "lopt.torch needs PyTorch, an optional extra of lopt: pip install 'lopt[torch]' "
        f"(importing torch failed: {e})"
    ) from e

from lopt import export as export_lib
from lopt.torch.adafac import AdafacMLPLOptTorch
from lopt.torch.base import UnsupportedArchitectureError, _LearnedOptimizerTorch
from lopt.torch.mlp import MLPLOptTorch
from lopt.torch.velo import VeloTorch

__all__ = [
    "AdafacMLPLOptTorch",
    "MLPLOptTorch",
    "UnsupportedArchitectureError",
    "VeloTorch",
    "load",
]


_CLASSES: dict[str, type[_LearnedOptimizerTorch]] = {
    "mlp": MLPLOptTorch,
    "adafac_mlp": AdafacMLPLOptTorch,
}


def load(
    path: str | os.PathLike, params: Iterable, *, lr: float | None = None,
    num_steps: int | None = None,
) -> MLPLOptTorch | AdafacMLPLOptTorch | VeloTorch:
    """The torch optimizer an export defines, over ``params`` (tensors or param-group dicts).

    ``path`` is any export :func:`lopt.export.load` reads, with all its checks and errors. ``lr`` (default: the export's ``step_mult``) becomes the
    param groups' default (``mlp``, ``adafac_mlp``). ``num_steps``: the training's horizon,
    which ``velo`` needs (:class:`VeloTorch`; its ``step`` takes the loss). Raises
    :class:`UnsupportedArchitectureError` for an architecture other than ``mlp``,
    ``adafac_mlp`` and ``velo``.
    """
    path = os.fspath(path)
    name = export_lib.read_metadata(path)["architecture"]["name"]
    if name not in _CLASSES and name != "velo":
        raise UnsupportedArchitectureError(
            f"export {path} holds a '{name}' learned optimizer, which lopt.torch does not "
            f"implement (it has {', '.join(repr(k) for k in [*_CLASSES, 'velo'])}); use it from "
            "JAX with lopt.export.load_optimizer"
        )
    learned_opt, meta_params = export_lib.load(path)
    if name == "velo":
        if lr is not None:
            raise ValueError("velo takes no lr: its step size is learned (lopt.torch.load(path, "
                             "params, num_steps=N))")
        return VeloTorch(params, learned_opt, meta_params, num_steps)
    return _CLASSES[name](params, learned_opt, meta_params, lr=lr)
