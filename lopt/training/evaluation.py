"""Evaluate optimizers on fresh task instances and compare with tuned Adam (DESIGN.md, "lopt/").

Everything numeric is one compiled program: for a batch of PRNG keys, each key samples a task
instance (``spec = task.sample(k_spec)``), initialises it (``task.init(spec, k_init)``) and trains
it with an optax transformation for ``num_steps`` steps inside ``lax.scan``; the keys are
``vmap``-ed and the whole thing is one ``jax.jit``. :func:`tune_adam` additionally ``vmap``-s over
Adam's learning rate, so a grid of learning rates costs a single compilation.

    curves = train_curves(task, opt, keys, num_steps=200)
    best_lr, per_lr = tune_adam(task, keys, num_steps=200)
    print(format_table({"learned": curves, f"adam (lr={best_lr:.3g})": per_lr[best_lr]}))
    plot_curves({"learned": curves["train_loss"]}, "curves.png", "digits_mlp")

A data-backed task's dataset is passed into jit as an argument (``tasks.base.data_arrays`` /
``bind_data``), not baked into the program as a constant. Diverged runs (NaN/inf losses) do not
raise: their numbers come back as NaN/inf, and :func:`tune_adam` ranks them last.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tasks.base import bind_data, data_arrays

__all__ = [
    "DEFAULT_LRS",
    "FINAL_WINDOW",
    "NUM_TEST_BATCHES",
    "train_curves",
    "tune_adam",
    "format_table",
    "plot_curves",
]

#: Adam learning rates tried by default: 7 log-spaced values from 1e-4 to 1e-1.
DEFAULT_LRS: tuple[float, ...] = tuple(float(x) for x in np.logspace(-4, -1, 7))
#: ``final_train_loss`` is the mean training loss over this many last steps.
FINAL_WINDOW = 10
#: Test batches averaged for tasks without ``full_batch``.
NUM_TEST_BATCHES = 8

Results = dict[str, Any]


# --- the compiled core -------------------------------------------------------------------------


#: Points (besides the end) at which the test loss and accuracy are measured during training.
NUM_EVAL_POINTS = 10


def eval_steps(num_steps: int) -> list[int]:
    """The training steps after which ``train_curves`` measures the test loss and accuracy:
    ``NUM_EVAL_POINTS`` evenly spaced chunks ending at ``num_steps`` (fewer for short runs)."""
    points = min(NUM_EVAL_POINTS, num_steps)
    chunk = num_steps // points
    return [chunk * (i + 1) for i in range(points - 1)] + [num_steps]


def _test_metrics(task: Any, spec: Any, params: Any, key: jax.Array) -> tuple[jax.Array, Any]:
    """Test loss and aux of ``params``: the full test split when the task has one, else the
    mean over ``NUM_TEST_BATCHES`` batches."""
    full_batch = getattr(task, "full_batch", None)
    if full_batch is not None:
        return task.loss(spec, params, full_batch("test"))

    def test_eval(k):
        return task.loss(spec, params, task.batch(spec, k, "test"))

    test_losses, auxes = jax.vmap(test_eval)(jax.random.split(key, NUM_TEST_BATCHES))
    return jnp.mean(test_losses), jax.tree.map(jnp.mean, auxes)


def _run_one(
    task: Any,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    key: jax.Array,
) -> dict[str, jax.Array]:
    """Train one task instance drawn from ``key``; traced inside jit/vmap.

    ``task`` is already bound to the dataset arrays passed into jit (``tasks.base.bind_data``),
    so a data-backed family reads its batches, and its full test split, from jit arguments. The
    steps run as chunks ending at :func:`eval_steps`, with a test evaluation after each.
    """
    k_spec, k_init, k_train, k_test = jax.random.split(key, 4)
    spec = task.sample(k_spec)
    params = task.init(spec, k_init)
    opt_state = optimizer.init(params)
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)
    grad_fn = jax.value_and_grad(task.loss, argnums=1, has_aux=True)

    def step(carry, k):
        params, opt_state = carry
        batch = task.batch(spec, k, "train")
        (loss, _), grads = grad_fn(spec, params, batch)
        if extra_args:
            updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        else:
            updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), loss

    ends = eval_steps(num_steps)
    step_keys = jax.random.split(k_train, num_steps)
    test_keys = jax.random.split(k_test, len(ends))
    has_accuracy = []  # decided while tracing: does the task's aux report an accuracy?

    def run_chunk(carry, keys):
        carry, chunk_losses = jax.lax.scan(step, carry, keys[:-1])
        loss, aux = _test_metrics(task, spec, carry[0], keys[-1])
        has_accuracy.append(isinstance(aux, dict) and "accuracy" in aux)
        acc = aux["accuracy"] if has_accuracy[-1] else jnp.zeros([])
        return carry, (chunk_losses, loss, acc)

    # The first len(ends) - 1 chunks have equal length (one scan); the last takes the rest.
    chunk, n_even = ends[0], len(ends) - 1
    carry, parts, start = (params, opt_state), [], 0
    if n_even:
        xs = jnp.concatenate(
            [step_keys[: n_even * chunk].reshape(n_even, chunk, -1), test_keys[:n_even, None]], axis=1
        )
        carry, (l, t, a) = jax.lax.scan(run_chunk, carry, xs)
        parts.append((l.reshape(-1), t, a))
        start = n_even * chunk
    carry, (l, t, a) = run_chunk(carry, jnp.concatenate([step_keys[start:], test_keys[-1:]]))
    parts.append((l, t[None], jnp.asarray(a)[None]))
    losses, test_curve, acc_curve = (jnp.concatenate(x) for x in zip(*parts))

    window = min(FINAL_WINDOW, num_steps)
    out = {
        "train_loss": losses.astype(jnp.float32),
        "final_train_loss": jnp.mean(losses[num_steps - window :]).astype(jnp.float32),
        "test_loss": test_curve[-1].astype(jnp.float32),
        "test_loss_curve": test_curve.astype(jnp.float32),
    }
    if has_accuracy[-1]:
        out["test_accuracy"] = acc_curve[-1].astype(jnp.float32)
        out["test_accuracy_curve"] = acc_curve.astype(jnp.float32)
    return out


def _to_numpy(out: dict[str, jax.Array]) -> Results:
    res = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
    res.setdefault("test_accuracy", None)
    return res


def _check_args(keys: Any, num_steps: int) -> jax.Array:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    keys = jnp.asarray(keys)
    if keys.ndim < 1 or keys.shape[0] < 1:
        raise ValueError(
            f"keys must be a non-empty batch of PRNG keys [S, 2], got shape {keys.shape}"
        )
    return keys


# --- public API --------------------------------------------------------------------------------


def train_curves(
    task: Any,
    optimizer: optax.GradientTransformation,
    keys: jax.Array | np.ndarray,
    num_steps: int,
) -> Results:
    """Train one task instance per key with ``optimizer`` and record the curves.

    Args:
      task: a task family (``tasks.get(...)``).
      optimizer: an optax transformation; an ``optax.GradientTransformationExtraArgs`` (e.g. a
        learned optimizer) additionally receives ``loss=`` the training-batch loss.
      keys: ``[S, 2]`` uint32 PRNG keys (``jax.random.PRNGKey`` style), one per task instance.
      num_steps: training steps per instance.

    Returns:
      numpy arrays: ``train_loss`` ``[S, num_steps]`` (the training-batch loss before each
      update), ``final_train_loss`` ``[S]`` (mean of the last ``min(10, num_steps)`` of those),
      ``test_loss`` ``[S]`` and ``test_accuracy`` ``[S]`` (``None`` if the task's aux has no
      ``"accuracy"``) of the final parameters: on ``task.full_batch("test")`` when the task has
      it, else averaged over 8 test batches. Diverged runs give NaN/inf, never an exception.

    All instances train in one ``jax.jit`` (scan over steps, vmap over keys). The compiled
    program is cached on (task, optimizer object, num_steps, shapes): reuse the same optimizer
    object to avoid recompiling.
    """
    keys = _check_args(keys, num_steps)
    arrays = data_arrays(task)  # loads a dataset here, outside jit
    kwargs = dict(task=task, optimizer=optimizer, num_steps=int(num_steps))
    try:
        hash(optimizer)
    except TypeError:  # not usable as a static argument: compile without caching
        fn = jax.jit(functools.partial(_curves.__wrapped__, **kwargs))
        return _to_numpy(fn(keys, arrays))
    return _to_numpy(_curves(keys, arrays, **kwargs))


@functools.partial(jax.jit, static_argnames=("task", "optimizer", "num_steps"))
def _curves(
    keys: jax.Array,
    arrays: Any,
    *,
    task: Any,
    optimizer: optax.GradientTransformation,
    num_steps: int,
) -> dict[str, jax.Array]:
    """:func:`_run_one` vmapped over keys, the task reading its data from ``arrays``. Jitted
    with the task, the optimizer object and the step count static, so calling again with the
    same objects reuses the compiled program."""
    run = functools.partial(_run_one, bind_data(task, arrays), optimizer, num_steps)
    return jax.vmap(run)(keys)


def _adam(lr: jax.Array, weight_decay: float | None) -> optax.GradientTransformation:
    """Adam, or AdamW (Loshchilov & Hutter 2019, decoupled decay) when ``weight_decay`` is set."""
    return optax.adam(lr) if weight_decay is None else optax.adamw(lr, weight_decay=weight_decay)


@functools.partial(jax.jit, static_argnames=("task", "num_steps", "weight_decay"))
def _adam_grid(
    keys: jax.Array,
    lrs: jax.Array,
    arrays: Any,
    *,
    task: Any,
    num_steps: int,
    weight_decay: float | None = None,
) -> dict[str, jax.Array]:
    """:func:`_run_one` with Adam(W) at learning rate ``lr``, vmapped over keys and rates."""
    bound = bind_data(task, arrays)

    def per_lr(lr):
        opt = _adam(lr, weight_decay)
        return jax.vmap(functools.partial(_run_one, bound, opt, num_steps))(keys)

    return jax.vmap(per_lr)(lrs)


def _rank_value(final_train_loss: np.ndarray) -> float:
    """Mean final train loss with NaN counted as +inf (worst)."""
    with np.errstate(invalid="ignore", over="ignore"):
        m = float(np.mean(np.asarray(final_train_loss, np.float64)))
    return math.inf if math.isnan(m) else m


def tune_adam(
    task: Any,
    keys: jax.Array | np.ndarray,
    num_steps: int,
    learning_rates: tuple[float, ...] | list[float] = DEFAULT_LRS,
    weight_decay: float | None = None,
) -> tuple[float, dict[float, Results]]:
    """Tune Adam's learning rate on the task instances of ``keys``; with ``weight_decay``,
    AdamW's (``optax.adamw(lr, weight_decay=weight_decay)``, decoupled weight decay).

    Runs :func:`train_curves` with ``optax.adam(lr)`` for every learning rate (one compilation:
    the learning rate is a vmapped argument of a single jitted function) and picks the one with
    the lowest mean ``final_train_loss`` over the keys; NaN/inf (diverged) count as worst, ties
    go to the earlier learning rate in ``learning_rates``.

    Returns:
      ``(best_lr, {lr: train_curves-style results})``, keyed by the floats of ``learning_rates``.
    """
    keys = _check_args(keys, num_steps)
    lrs = [float(lr) for lr in learning_rates]
    if not lrs:
        raise ValueError("learning_rates must not be empty")
    if any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        raise ValueError(f"learning rates must be positive and finite, got {lrs}")
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be None or finite and >= 0, got {weight_decay}")
    out = _adam_grid(
        keys,
        jnp.asarray(lrs, jnp.float32),
        data_arrays(task),
        task=task,
        num_steps=int(num_steps),
        weight_decay=None if weight_decay is None else float(weight_decay),
    )
    out = jax.device_get(out)
    results: dict[float, Results] = {}
    for i, lr in enumerate(lrs):
        results[lr] = _to_numpy({k: v[i] for k, v in out.items()})
    best_lr = min(lrs, key=lambda lr: _rank_value(results[lr]["final_train_loss"]))
    return best_lr, results


# --- reporting ---------------------------------------------------------------------------------


def _mean_std(x: np.ndarray | None) -> str:
    if x is None:
        return "-"
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # diverged seeds: inf/nan
        mean, std = float(np.mean(x)), float(np.std(x))
    return f"{mean:.4g} ± {std:.2g}"


def format_table(rows: dict[str, Results]) -> str:
    """A plain-text table, one row per optimizer, of mean ± std across seeds of the final train
    loss, test loss and test accuracy (``-`` where a row has no accuracy)."""
    header = ["optimizer", "final train loss", "test loss", "test accuracy"]
    body = [
        [
            str(name),
            _mean_std(r.get("final_train_loss")),
            _mean_std(r.get("test_loss")),
            _mean_std(r.get("test_accuracy")),
        ]
        for name, r in rows.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _trailing_mean(c: np.ndarray, fraction: float) -> np.ndarray:
    """``c`` [S, T] with step t replaced by the mean of steps (t - w, t], w = max(1, fraction * t),
    NaNs left out of each mean."""
    t = np.arange(c.shape[1])
    w = np.maximum(1, (fraction * t).astype(int))
    ok = np.isfinite(c)
    sums = np.concatenate([np.zeros((c.shape[0], 1)), np.cumsum(np.where(ok, c, 0.0), 1)], 1)
    counts = np.concatenate([np.zeros((c.shape[0], 1)), np.cumsum(ok, 1)], 1)
    n = counts[:, t + 1] - counts[:, t + 1 - w]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[:, t + 1] - sums[:, t + 1 - w]) / n, np.nan)


def plot_curves(
    curves: dict[str, np.ndarray],
    path: str | os.PathLike,
    title: str,
    *,
    vlines: dict[str, float] | None = None,
    log_x: bool = False,
    smooth: float = 0.0,
) -> str:
    """Save a PNG of mean training loss vs step with a shaded ±1 std band (across seeds) per
    optimizer. ``curves`` maps a label to ``[S, T]`` losses. The y axis is logarithmic if no
    finite value is negative (zeros, e.g. an underflowed cross-entropy, are drawn at the
    smallest positive value). Non-finite values (diverged runs) are left out of the plot.
    ``vlines`` marks steps (label -> step, e.g. the meta-training horizon) with dashed lines;
    ``log_x`` puts the steps on a log axis (steps counted from 1); ``smooth`` = f > 0 averages
    each seed's curve at step t over its last max(1, f * t) steps (a window of constant width
    on a log axis; minibatch noise otherwise fills the late steps). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    arrays = {}
    for name, c in curves.items():
        c = np.asarray(c, np.float64)
        if c.ndim == 1:
            c = c[None]
        c = np.where(np.isfinite(c), c, np.nan)
        arrays[name] = _trailing_mean(c, smooth) if smooth > 0 else c
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()] or [np.zeros(0)])
    positive = finite[finite > 0]
    log_y = positive.size > 0 and bool(np.all(finite >= 0))
    floor = float(positive.min()) if log_y else 0.0
    if log_y:
        arrays = {name: np.where(a > 0, a, np.where(np.isnan(a), a, floor)) for name, a in arrays.items()}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, a in arrays.items():
        steps = np.arange(a.shape[1]) + (1 if log_x else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps of diverged runs
            mean = np.nanmean(a, axis=0)
            std = np.nanstd(a, axis=0)
        (ln,) = ax.plot(steps, mean, lw=1.5, label=name)
        lo, hi = mean - std, mean + std
        if log_y:
            lo = np.maximum(lo, floor)
        ax.fill_between(steps, lo, hi, color=ln.get_color(), alpha=0.2, lw=0)
    if log_y:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    for i, (label, x) in enumerate((vlines or {}).items()):
        ax.axvline(float(x), color="0.3", ls="--", lw=1, alpha=0.7 - 0.2 * (i % 2))
        ax.annotate(label, (float(x), 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="0.3")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean ± 1 std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if arrays:
        ax.legend()
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _median_band(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and 25/75% quantiles over seeds (axis 0), NaN (diverged) values left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps of diverged runs
        return tuple(np.nanquantile(a, q, axis=0) for q in (0.5, 0.25, 0.75))


def plot_evaluation(
    results: dict[str, Results],
    path: str | os.PathLike,
    title: str,
    *,
    horizon: int | None = None,
    smooth: float = 0.05,
) -> str:
    """A PNG people can read of :func:`train_curves` results (label -> results): the training
    loss, each seed's curve smoothed by a trailing mean over its last ``smooth`` fraction of
    steps, as the median over seeds with a 25-75% quantile band (quantiles do not dip below
    zero on a log axis the way mean - std does); the test loss (and test accuracy, when the
    task has one) at the regular points of :func:`eval_steps`, median and band likewise; the
    meta-training ``horizon`` marked. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    with_acc = any(r.get("test_accuracy_curve") is not None for r in results.values())
    fig, axes = plt.subplots(1, 3 if with_acc else 2, figsize=(15 if with_acc else 10.5, 4.2))
    for name, r in results.items():
        train = np.asarray(r["train_loss"], np.float64)
        train = _trailing_mean(np.where(np.isfinite(train), train, np.nan), smooth)
        steps = np.arange(1, train.shape[1] + 1)
        points = np.asarray(eval_steps(train.shape[1]))
        panels = [(axes[0], steps, train), (axes[1], points, np.asarray(r["test_loss_curve"], np.float64))]
        if with_acc and r.get("test_accuracy_curve") is not None:
            panels.append((axes[2], points, np.asarray(r["test_accuracy_curve"], np.float64)))
        color = None
        for ax, x, y in panels:
            med, lo, hi = _median_band(np.where(np.isfinite(y), y, np.nan))
            (line,) = ax.plot(x, med, lw=1.6, label=name, color=color, marker="o" if x is points else None,
                              ms=3)
            color = line.get_color()
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    labels = ["training loss (smoothed)", "test loss", "test accuracy"]
    for ax, label in zip(axes, labels):
        if horizon is not None:
            ax.axvline(horizon, color="0.3", ls="--", lw=1)
            ax.annotate("meta-training horizon", (horizon, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.3")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{label}\n(median, 25-75% over seeds)")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        values = np.concatenate([l.get_ydata() for l in ax.get_lines()] or [np.zeros(0)])
        if values.size and np.nanmin(values) > 0:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
