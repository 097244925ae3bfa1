"""``velo``: VeLO, the hypernetwork learned optimizer of Metz et al. 2022.

L. Metz, J. Harrison, C. D. Freeman, A. Merchant, L. Beyer, J. Bradbury, N. Agrawal, B. Poole,
I. Mordatch, A. Roberts, J. Sohl-Dickstein, "VeLO: Training Versatile Learned Optimizers by
Scaling Up", arXiv:2211.09760 (2022): Sec. 3 (the hierarchical hypernetwork: a per-tensor LSTM
that writes the weights of a small per-parameter MLP) and Appendix B (its inputs, the mixing
across tensors, B.3, and the step). The numbers here are those of Google's own implementation,
``learned_optimization/research/general_lopt/hyper_v2.py`` class ``HyperV2``, in the
configuration of the published checkpoint (``lstm_hidden_size=512, param_inits=256,
use_bugged_loss_features=False``, every other argument at its default): 33 arrays, 2,320,385
values (:func:`num_meta_params`). This module was written from reading that code and is
checked against it step by step (``tests/lopt/test_velo.py``, fixture made by
``scripts/peer/make_velo_fixture.py``). The paper text was not available offline when this
was written; the paper's B.3 is quoted from learned_optimization issue #313.

One update, for a parameter tree with T tensors, gradient g, loss L and horizon N (``num_steps``):

1. **Loss buffer.** Ten running means of the loss with half-lives ``logspace(1, log10 N, 10)``;
   before entering, the loss is capped at twice the largest bias-corrected mean (the first
   loss enters as it is). The running minimum of each corrected mean is kept. Features: for
   i < 9, clip((mean_i - min_i) / max(1e-8, mean_{i+1} - min_i) - 1, -1, 1), zero for the
   first two updates. ``num_steps`` sets the half-lives, so it is needed when the state is
   built.
2. **Gradient clip** to [-1000, 1000], elementwise; everything below sees the clipped gradient.
3. **Per-tensor LSTM** (``lstm_hidden_size`` units, one row per tensor), fed 30 features of each
   tensor, read from the accumulators *before* this step's update: tanh(10 (t/N - s)) at 9
   points s (fraction of training), the 9 loss features, log-magnitudes of the tensor's mean
   second moment and of the variances of its 3 momenta and of its second moment (all scaled by
   1 / rms(p)), and a one-hot of its rank (dims > 1). Before the LSTM the rows are mixed across
   tensors: x <- F0(x) + max_tensors(relu(F1(x))) (B.3). The LSTM (haiku's: gates i, g, f, o;
   forget bias +1) outputs per tensor ``param_inits`` mixing weights c and a step multiplier.
4. **Accumulators** (after the LSTM read them): momenta at 0.9, 0.99, 0.999; second moment at
   0.999; Adafactor row and column second moments at 0.9, 0.99, 0.999 over a tensor's two
   largest axes (the full second moment for tensors of rank < 2).
5. **Per-parameter MLP** (30 -> ``ff_hidden_size`` x ``ff_hidden_layers`` -> 3, ReLU) whose
   weights for a tensor are 100 mean_k(c_k W_k) over a bank of ``param_inits`` MLPs. Its 30 input
   channels in 14 groups (``FEATURE_GROUPS``; meta-param ``mlp_bank/w0/<i>`` is group i's slice
   of the first layer, Google's ``w0__<i>``), each normalised by its second moment over the
   tensor (eps 1e-5), computed from the accumulators *after* this step's update.
6. **Step**: p <- p - lr_mult * d * rms(p) * exp(1e-3 m) * 1e-3, with (d, m) the MLP's first two
   outputs (the third is unused) and rms(p) = sqrt(mean(p^2) + 1e-9) over the tensor.

Where Google's code and the paper differ, and what this module does:

* **Mixing (B.3).** The paper mixes with F0(x) + max(relu(F1(relu(F2(x))))). Google's code
  computes relu(F2(x)), then *discards it* and applies F1 to x (issue #313), so F2's weights
  receive no gradient and the published weights were trained without it. Default
  ``paper_mixing=False``: the code's behaviour (F2's weights are kept in the meta-params, as
  in the checkpoint, and not computed with since the result is discarded). ``paper_mixing=True``
  is the paper's two-layer mixing (F1 then takes ``lstm_hidden_size`` inputs).
* **var_rms.** The code's variance of the second moment subtracts the *momenta's* mean
  (broadcast over the 3 momentum decays: 3 features), where a variance of the second moment
  subtracts its own mean (1 feature, 28 LSTM inputs). Default ``var_rms_of_momentum_mean=True``,
  the code's (trained) behaviour; ``False`` is the variance as its name says.
* The following code behaviours are kept as they are (no option): the LSTM features scale the
  second moment by 1 / rms(p) (not its square); the interpolated MLP weights are multiplied by
  100; the loss buffer (``use_bugged_loss_features=False`` in the published configuration, so
  its half-lives follow N).

The other differences to Google's code are of form, not arithmetic: the loss arrives as optax's
``value=``, the horizon as ``optimizer(meta_params, num_steps=N)`` (a Python int or a traced
array: the meta-training unroll passes each trajectory's horizon), the step is returned as an
update instead of new parameters, and the meta-params are a plain tree
(``lopt/velo_compat.py`` maps Google's checkpoint keys onto it; ``lopt-import`` reads them).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt
from lopt.velo_compat import accumulate, from_google, google_key, with_weight_decay  # noqa: F401

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
FACTORED_DECAYS = (0.9, 0.99, 0.999)
#: tanh(10 (t / N - s)) at these fractions of training s (the code's ``_fractional_tanh_embed``).
FRACTION_POINTS = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
NUM_LOSS_DECAYS = 10
GRAD_CLIP = 1000.0
#: The per-parameter MLP's input groups in the order of ``w0__0 .. w0__13`` and their widths.
FEATURE_GROUPS = (
    ("g", 1), ("clipped_g", 1), ("p", 1), ("m", 3), ("rms", 1), ("m_rsqrt_rms", 3),
    ("rsqrt_rms", 1), ("factored_g", 3), ("g_rsqrt_rms", 1), ("fac_row", 3), ("fac_col", 3),
    ("rsqrt_fac_row", 3), ("rsqrt_fac_col", 3), ("m_factored", 3),
)


class LossBuffer(NamedTuple):
    means: jax.Array  # [10] running means of the loss
    running_min: jax.Array  # [10] running minima of the bias-corrected means
    decays: jax.Array  # [10] exp(-1 / half-life), set by num_steps


class VeloState(NamedTuple):
    iteration: jax.Array  # int32: updates taken
    num_steps: jax.Array  # float32: the horizon N
    mom: tuple  # per leaf: leaf.shape + (3,)
    rms: tuple  # per leaf: leaf.shape + (1,)
    fac_row: tuple  # per leaf: the Adafactor row accumulator, or a (1,) placeholder when unfactored
    fac_col: tuple  # per leaf: the column accumulator, or (1,)
    fac_full: tuple  # per leaf: leaf.shape + (3,) when unfactored, else (1,)
    lstm_hidden: jax.Array  # [T, H]
    lstm_cell: jax.Array  # [T, H]
    loss: LossBuffer


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(second largest axis, largest axis) of a tensor of rank >= 2, ties broken as numpy's
    default argsort breaks them (as the code does), else None."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    return int(order[-2]), int(order[-1])


def _clip_log_abs(v: jax.Array, scale: float = 10.0) -> jax.Array:
    return jnp.clip(jnp.log(1e-8 + jnp.abs(v * scale)), -5.0, 5.0) * 0.5


def _safe_rsqrt(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(x, 1e-9))


def _truncated_normal(key, shape, stddev):
    # haiku's TruncatedNormal: a standard normal truncated to [-2, 2], rescaled to unit std.
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * (stddev / 0.87962566)


def num_meta_params(meta_params) -> tuple[int, int]:
    """(arrays, values) of a meta-param tree."""
    leaves = jax.tree.leaves(meta_params)
    return len(leaves), int(sum(np.size(x) for x in leaves))


@lopt.register("velo")
@dataclasses.dataclass(frozen=True)
class Velo:
    """VeLO (see module docstring). Defaults: the published configuration.

    lstm_hidden_size: units of the per-tensor LSTM (512 published).
    param_inits: MLPs in the bank that the LSTM mixes (256 published).
    ff_hidden_size, ff_hidden_layers: the per-parameter MLP (4, 2).
    step_mult, exp_mult: the step's 1e-3 factors.
    paper_mixing: the paper's two-layer mixing instead of the code's (see docstring).
    var_rms_of_momentum_mean: the code's variance of the second moment about the momenta's mean.
    """

    lstm_hidden_size: int = 512
    param_inits: int = 256
    ff_hidden_size: int = 4
    ff_hidden_layers: int = 2
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    paper_mixing: bool = False
    var_rms_of_momentum_mean: bool = True
    name: ClassVar[str] = "velo"

    def __post_init__(self):
        for f in ("lstm_hidden_size", "param_inits", "ff_hidden_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"velo: {f} must be a positive int, got {v!r}")
        v = self.ff_hidden_layers
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"velo: ff_hidden_layers must be an int >= 0, got {v!r}")
        for f in ("paper_mixing", "var_rms_of_momentum_mean"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                raise ValueError(f"velo: {f} must be True or False, got {getattr(self, f)!r}")

    # -- sizes and meta-params -------------------------------------------------------------

    @property
    def num_lstm_inputs(self) -> int:
        """9 fraction + 9 loss + 1 mean_rms + 5 rank + 3 var_m + var_rms (3, or 1)."""
        return 27 + (3 if self.var_rms_of_momentum_mean else 1)

    @property
    def num_mlp_inputs(self) -> int:
        return sum(w for _, w in FEATURE_GROUPS)

    def init(self, key: jax.Array) -> dict:
        """Fresh meta-params, initialised as the code initialises them (truncated normal with
        std 1/sqrt(fan-in), zero biases, zero initial LSTM state) except the controls layer
        (see below)."""
        h, k_inits, f_in = self.lstm_hidden_size, self.param_inits, self.num_lstm_inputs
        keys = iter(jax.random.split(key, 32))

        def dense(n_in, n_out):
            return {"w": _truncated_normal(next(keys), (n_in, n_out), 1 / np.sqrt(n_in)),
                    "b": jnp.zeros((n_out,), jnp.float32)}

        sizes = [self.ff_hidden_size] * self.ff_hidden_layers + [3]
        bank = {"w0": [_truncated_normal(next(keys), (k_inits, w, sizes[0]),
                                          1 / np.sqrt(self.num_mlp_inputs))
                       for _, w in FEATURE_GROUPS],
                "b0": jnp.zeros((k_inits, sizes[0]), jnp.float32)}
        for i in range(1, len(sizes)):
            bank[f"w{i}"] = _truncated_normal(next(keys), (k_inits, sizes[i - 1], sizes[i]),
                                              1 / np.sqrt(sizes[i - 1]))
            bank[f"b{i}"] = jnp.zeros((k_inits, sizes[i]), jnp.float32)
        return {
            "lstm_init": {"hidden": jnp.zeros((1, h), jnp.float32), "cell": jnp.zeros((1, h), jnp.float32)},
            # F2 (the code computes and discards it unless paper_mixing), F1, F0 of B.3.
            "mix": {"first": dense(f_in, h), "second": dense(h if self.paper_mixing else f_in, h),
                    "input": dense(f_in, h)},
            "lstm": dense(2 * h, 4 * h),
            # Not the code's init (truncated normal like every layer): there the mixed MLP
            # starts ~sqrt(K) x larger than LeCun scale and a fresh optimizer diverges within a
            # few hundred steps (57% non-finite inner losses on the quickstart). Zero weights
            # and a bias of sqrt(K)/100 start every tensor's MLP at 100 mean_k(c W_k), LeCun
            # scale, so the first steps are about 1e-3 rms(p) and meta-training starts stable.
            "controls": {"w": jnp.zeros((h, k_inits), jnp.float32),
                         "b": jnp.full((k_inits,), np.sqrt(k_inits) / 100.0, jnp.float32)},
            "step_size": dense(h, 1),
            "mlp_bank": bank,
        }

    # -- the pieces of one update ----------------------------------------------------------

    @staticmethod
    def loss_buffer_init(num_steps) -> LossBuffer:
        return LossBuffer(jnp.zeros((NUM_LOSS_DECAYS,), jnp.float32),
                          jnp.full((NUM_LOSS_DECAYS,), 999999999999.0, jnp.float32),
                          _loss_decays(jnp.asarray(num_steps, jnp.float32)))

    @staticmethod
    def loss_buffer_update(buf: LossBuffer, iteration, loss) -> tuple[LossBuffer, jax.Array]:
        """(the buffer with ``loss`` entered, its 9 features); ``iteration``: updates before."""
        d = buf.decays
        corrected = buf.means / (1 - d ** (iteration + 1))
        cap = jnp.where(iteration == 0, loss, jnp.max(corrected))
        loss = jnp.minimum(jnp.abs(cap) * 2, loss)
        means = buf.means * d + loss * (1.0 - d)
        running_min = jnp.minimum(buf.running_min, means / (1 - d ** (iteration + 1)))
        new = LossBuffer(means, running_min, d)
        corrected = means / (1 - d ** (iteration + 1))
        den = jnp.maximum(1e-8, corrected[1:] - running_min[:-1])
        feats = jnp.clip((corrected[:-1] - running_min[:-1]) / den - 1.0, -1.0, 1.0)
        return new, jnp.where(iteration + 1 <= 2, feats * 0, feats)

    def tensor_features(self, p, m, rms) -> jax.Array:
        """The LSTM's per-tensor statistics (mean_rms, rank, var_m, var_rms), in the code's
        order after the fraction and loss features (keys sorted by name)."""
        norm = jax.lax.rsqrt(jnp.maximum(1e-9, jnp.mean(p * p)))
        m, rms = m * norm, rms * norm
        axes = tuple(range(p.ndim))
        mean_m = jnp.mean(m, axis=axes, keepdims=True)
        var_m = jnp.mean(jnp.square(m - mean_m), axis=axes)
        mean_rms = jnp.mean(rms, axis=axes, keepdims=True)
        centre = mean_m if self.var_rms_of_momentum_mean else mean_rms
        var_rms = jnp.mean(jnp.square(rms - centre), axis=axes)
        rank = jax.nn.one_hot(int(np.sum(np.asarray(p.shape) > 1)), 5, dtype=jnp.float32)
        return jnp.concatenate([_clip_log_abs(mean_rms.reshape(-1)), rank,
                                _clip_log_abs(var_m), _clip_log_abs(var_rms)])

    def lstm_step(self, mp: dict, x: jax.Array, hidden, cell):
        """Mixing (B.3) and one LSTM step for every tensor's row: (controls [T, K], lr_mult [T],
        hidden, cell)."""
        mix = mp["mix"]
        lin = lambda layer, v: v @ layer["w"] + layer["b"]
        if self.paper_mixing:
            mixed = jax.nn.relu(lin(mix["second"], jax.nn.relu(lin(mix["first"], x))))
        else:  # the code: relu(first(x)) is computed and overwritten by relu(second(x))
            mixed = jax.nn.relu(lin(mix["second"], x))
        x = lin(mix["input"], x) + jnp.max(mixed, axis=0, keepdims=True)
        gates = lin(mp["lstm"], jnp.concatenate([x, hidden], axis=-1))
        i, g, f, o = jnp.split(gates, 4, axis=-1)
        cell = jax.nn.sigmoid(f + 1.0) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
        hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
        controls = lin(mp["controls"], hidden)
        lr_mult = lin(mp["step_size"], hidden)[:, 0]
        return controls, lr_mult, hidden, cell

    @staticmethod
    def accumulate(g, m, rms, row, col, full):
        """The accumulators after gradient ``g`` and the Adafactor-preconditioned gradient."""
        m = m * jnp.asarray(MOMENTUM_DECAYS) + (1 - jnp.asarray(MOMENTUM_DECAYS)) * g[..., None]
        rms = rms * jnp.asarray(RMS_DECAYS) + (1 - jnp.asarray(RMS_DECAYS)) * (g * g)[..., None]
        d = jnp.asarray(FACTORED_DECAYS, jnp.float32)
        sq = (g * g + 1e-30)[..., None]
        dims = factored_dims(g.shape)
        if dims is None:
            full = d * full + (1 - d) * sq
            return m, rms, row, col, full, g[..., None] * _safe_rsqrt(full + 1e-9)
        d1, d0 = dims
        row = d * row + (1 - d) * jnp.mean(sq, axis=d0)
        col = d * col + (1 - d) * jnp.mean(sq, axis=d1)
        row_f, col_f = _factors(row, col, d1, d0)
        return m, rms, row, col, full, g[..., None] * row_f * col_f

    def mlp_inputs(self, p, g, m, rms, row, col, full, fac_g) -> list[jax.Array]:
        """The 14 groups of ``FEATURE_GROUPS``, each leaf.shape + (width,)."""
        g1 = g[..., None]
        rsqrt = jax.lax.rsqrt(rms + 1e-6)
        dims = factored_dims(p.shape)
        if dims is None:
            row_feat = col_feat = full
            m_fac = m * full ** -0.5
        else:
            d1, d0 = dims
            row_feat = jnp.broadcast_to(jnp.expand_dims(row, d0), m.shape)
            col_feat = jnp.broadcast_to(jnp.expand_dims(col, d1), m.shape)
            row_f, col_f = _factors(row, col, d1, d0)
            m_fac = m * row_f * col_f
        return [g1, jnp.clip(g1, -0.1, 0.1), p[..., None], m, rms, m * rsqrt, rsqrt, fac_g,
                g1 * rsqrt, row_feat, col_feat, jax.lax.rsqrt(row_feat + 1e-8),
                jax.lax.rsqrt(col_feat + 1e-8), m_fac]

    def tensor_mlp(self, mp: dict, control, inputs: list[jax.Array]):
        """The per-parameter MLP of one tensor: weights 100 mean_k(c_k W_k) mixed by
        ``control`` [K], each input channel normalised by its second moment over the tensor;
        returns the [..., 2] outputs the step uses (direction, log-magnitude).

        Computed for speed, not in the code's order: the normalisation is folded into the first
        layer's weights (x s @ W = x @ (s W), s per channel) and the network is written feature-
        major (each of the 30 channels a leaf-shaped array, each unit a sum of their products
        with scalars), so XLA fuses features, layers and step into elementwise loops over
        contiguous coordinates, where the code's 14 small matmuls each write [N, 4] to memory
        (1e6 parameters, 2-core CPU: 316 ms as the code orders it, 162 ms with the layers as
        multiply-and-sum over a trailing axis, 52 ms feature-major). Same arithmetic up to float
        rounding (parity test)."""
        bank = mp["mlp_bank"]
        # 100 mean_k(c_k W_k), written as the code writes it.
        mixw = lambda w: 100.0 * jnp.mean(w * control.reshape((-1,) + (1,) * (w.ndim - 1)), axis=0)
        # Feature-major: every channel a leaf-shaped array, every unit a sum of products of
        # them, so the whole network is elementwise over contiguous coordinates.
        chans = [x[..., k] for x in inputs for k in range(x.shape[-1])]
        w0 = jnp.concatenate([mixw(w) for w in bank["w0"]], axis=0)
        w0 = w0 * jax.lax.rsqrt(1e-5 + jnp.stack([jnp.mean(c * c) for c in chans]))[:, None]
        b0 = mixw(bank["b0"])
        h = [sum(c * w0[i, j] for i, c in enumerate(chans)) + b0[j] for j in range(w0.shape[1])]
        n_layers = self.ff_hidden_layers + 1
        for i in range(1, n_layers):
            w, b = mixw(bank[f"w{i}"]), mixw(bank[f"b{i}"])
            outs = 2 if i == n_layers - 1 else w.shape[1]  # direction, magnitude: the step's
            h = [jax.nn.relu(x) for x in h]
            h = [sum(x * w[a, j] for a, x in enumerate(h)) + b[j] for j in range(outs)]
        return jnp.stack(h[:2], axis=-1)

    # -- the optax transformation ------------------------------------------------------------

    def optimizer(self, meta_params: dict, num_steps=None, *, weight_decay: float = 0.0,
                  max_training_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
        """VeLO with these meta-params for a training of ``num_steps`` updates (the horizon:
        its loss-buffer half-lives and the fraction-of-training feature). ``update`` needs the
        params and the loss as ``value=``.

        What Google's prefab (``research/general_lopt/prefab.py``) adds, off by default here:
        ``weight_decay`` adds ``weight_decay * p`` to the gradients and ``weight_decay *
        sum(p^2)`` to the loss VeLO sees (prefab suggests 1e-6 for stability);
        ``max_training_steps`` (prefab: 150_000) caps the horizon VeLO sees: a longer
        training (an int ``num_steps``) averages the gradients and losses of k = ceil(num_steps
        / max_training_steps) steps into one VeLO update on a horizon of num_steps // k (the
        other k - 1 updates are zero)."""
        if max_training_steps is not None and num_steps is not None and num_steps > max_training_steps:
            k = int(np.ceil(int(num_steps) / int(max_training_steps)))
            inner = accumulate(self.optimizer(meta_params, int(num_steps) // k), k)
        else:
            inner = self._optimizer(meta_params, num_steps)
        return with_weight_decay(inner, weight_decay) if weight_decay else inner

    def _optimizer(self, meta_params: dict, num_steps) -> optax.GradientTransformationExtraArgs:

        def init_fn(params):
            if num_steps is None:
                raise ValueError(
                    "velo needs the training horizon: build it with "
                    "optimizer(meta_params, num_steps=N) (lopt.export.load_optimizer(path, num_steps=N))")
            leaves = [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)]
            zeros = lambda s: jnp.zeros(s, jnp.float32)
            rows, cols, fulls = [], [], []
            for p in leaves:
                dims = factored_dims(p.shape)
                k = len(FACTORED_DECAYS)
                if dims is None:  # (1,) placeholders: checkpoints refuse zero-size arrays
                    rows.append(zeros((1,))), cols.append(zeros((1,)))
                    fulls.append(zeros(p.shape + (k,)))
                else:
                    d1, d0 = dims
                    rows.append(zeros(tuple(np.delete(p.shape, d0)) + (k,)))
                    cols.append(zeros(tuple(np.delete(p.shape, d1)) + (k,)))
                    fulls.append(zeros((1,)))
            t = len(leaves)
            init = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), meta_params["lstm_init"])
            return VeloState(
                iteration=jnp.zeros([], jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.float32),
                mom=tuple(zeros(p.shape + (len(MOMENTUM_DECAYS),)) for p in leaves),
                rms=tuple(zeros(p.shape + (len(RMS_DECAYS),)) for p in leaves),
                fac_row=tuple(rows), fac_col=tuple(cols), fac_full=tuple(fulls),
                lstm_hidden=jnp.tile(init["hidden"], (t, 1)),
                lstm_cell=jnp.tile(init["cell"], (t, 1)),
                loss=self.loss_buffer_init(num_steps),
            )

        def update_fn(updates, state, params=None, value=None, **extra_args):
            del extra_args
            if params is None or value is None:
                raise ValueError("velo's update needs the params and the loss: "
                                 "opt.update(grads, state, params, value=loss)")
            return self.apply(meta_params, updates, state, params, value)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def apply(self, meta_params, grads, state: VeloState, params, loss):
        mp = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), meta_params)
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = [jnp.asarray(p, jnp.float32) for p in treedef.flatten_up_to(params)]
        gs = [jnp.clip(jnp.asarray(g, jnp.float32), -GRAD_CLIP, GRAD_CLIP) for g in g_leaves]
        loss = jnp.asarray(loss, jnp.float32).reshape(())
        buf, loss_feats = self.loss_buffer_update(state.loss, state.iteration, loss)
        if not gs:
            return grads, state._replace(iteration=state.iteration + 1, loss=buf)
        frac = state.iteration / state.num_steps
        frac_feats = jnp.tanh((frac - jnp.asarray(FRACTION_POINTS, jnp.float32)) * 10.0)
        rows = [jnp.concatenate([frac_feats, loss_feats, self.tensor_features(p, m, r)])
                for p, m, r in zip(p_leaves, state.mom, state.rms)]
        controls, lr_mult, hidden, cell = self.lstm_step(
            mp, jnp.stack(rows), state.lstm_hidden, state.lstm_cell)
        new = {k: [] for k in ("mom", "rms", "fac_row", "fac_col", "fac_full")}
        steps = []
        for i, (p, g) in enumerate(zip(p_leaves, gs)):
            m, r, row, col, full, fac_g = self.accumulate(
                g, state.mom[i], state.rms[i], state.fac_row[i], state.fac_col[i], state.fac_full[i])
            for k, v in zip(new, (m, r, row, col, full)):
                new[k].append(v)
            inputs = self.mlp_inputs(p, g, m, r, row, col, full, fac_g)
            if p.ndim == 0:  # the code runs a scalar as shape (1,)
                inputs = [x[None] for x in inputs]
            o = self.tensor_mlp(mp, controls[i], inputs)
            scale = jnp.sqrt(jnp.mean(p * p) + 1e-9)
            step = o[..., 0] * (scale * jnp.exp(o[..., 1] * self.exp_mult)) * self.step_mult
            step = (lr_mult[i] * step).reshape(p.shape)
            steps.append((-step).astype(jnp.result_type(g_leaves[i])))
        new_state = VeloState(state.iteration + 1, state.num_steps,
                              *(tuple(new[k]) for k in new), hidden, cell, buf)
        return treedef.unflatten(steps), new_state


@jax.jit
def _loss_decays(num_steps: jax.Array) -> jax.Array:
    """exp(-1 / half-life), half-lives ``logspace(1, log10 N, 10)``. Always compiled: eager
    ``logspace`` rounds one of them an ulp away from the compiled one (the code's, inside its
    jitted ``init``), and the loss features divide differences of nearly equal means, so an ulp
    there moved the parity trajectory by 5e-5 of a step."""
    half_life = jnp.logspace(1.0, jnp.log10(num_steps), NUM_LOSS_DECAYS)
    return jnp.exp(-1.0 / half_life).astype(jnp.float32)


def _factors(row, col, d1, d0):
    """Adafactor's row and column preconditioners from the row and column accumulators (decay
    axis last), each with the reduced axis restored (size 1); multiplied in the code's order,
    (x * row) * col."""
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_mean = jnp.mean(row, axis=reduced_d1, keepdims=True)
    row_factor = _safe_rsqrt(row / (row_mean + 1e-9))
    col_factor = _safe_rsqrt(col)
    return jnp.expand_dims(row_factor, d0), jnp.expand_dims(col_factor, d1)
