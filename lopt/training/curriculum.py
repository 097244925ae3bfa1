"""Validation-gated unroll-length curriculum (Chen et al. 2020, Algorithm 1), run on the host.

T. Chen, W. Zhang, J. Zhou, S. Chang, S. Liu, L. Amini, Z. Wang, "Training Stronger Baselines
for Learning to Optimize", NeurIPS 2020, Sec. 3.2 and Algorithm 1:

    while True do
      n = 1, stop = True
      while n <= N_period or L_val == L_min do
        n = n + 1
        for t = 1, 2, ..., T_period do  Update phi0 a epoch with N_train^i
        L_val = val. loss with phi0 and N_valid^i
        if L_min > L_val then  L_min = L_val, phi = phi0, stop = False
      if stop == True then break
      i = i + 1, phi0 = phi
      L_min = val. loss with phi and N_valid^i

Meta-training goes through stages of training unroll length ``N_train`` (``stages``, default
100, 200, 500, 1000). A *period* is ``T_period`` epochs (``period``), "where a single epoch
indicates an optimization trajectory of N_train steps": here every particle runs one
trajectory of N_train steps in ceil(N_train / trunc_length) outer steps, so a period is
``period * ceil(N_train / trunc_length)`` outer steps (:meth:`Curriculum.period_steps`) and
later stages get longer periods in outer steps, the same number of trajectories. With
imitation (Alg. 2, ``estimators/imitation.py``) an epoch is either kind, a meta-loss trajectory
or an imitation episode of the same length, and a period counts both, as Chen et al.'s code
does (``train_dm.py`` validates every ``evaluation_period`` epochs of either kind). After each
period the meta-params are validated at ``N_valid``, the *next* stage's length ("N_valid^i =
N_train^(i+1)"; the last stage validates at its own), and the best are kept (phi). A stage runs
at least ``N_period`` periods (``min_periods``) and then continues while its latest validation
is its best so far: we read "L_val == L_min" as "the last period's validation loss is the lowest
during the i-th training stage" (the paper's sentence), i.e. the latest validation set a new
minimum strictly below every earlier one of the stage and the stage's baseline. When the loop
ends: a stage that never beat its baseline (``stop``) ends training, and the best meta-params
of the earlier stages are exported; otherwise the next stage starts from the best (phi0 = phi,
``restart_from_best``) and its baseline L_min is the best re-validated at the new N_valid. The
paper's list of stages is open-ended ("[100, 200, 500, 1000, ...]"); ours is finite, and the
last stage's loop ending completes the curriculum.

Our additions, each off unless set: ``max_periods`` caps a stage's periods (the paper has no
cap; when reached the stage ends as if its loop had, advancing if it improved); stage 0's
baseline is the initial meta-params validated before the first outer step (the paper's L_min
input).

Two pieces, both host-side and deterministic:

* :class:`Curriculum` (static options) with the pure transition
  ``Curriculum.update(state, valid_loss, outer_step) -> (state, Decision)`` over Python floats and
  a JSON-able :class:`CurriculumState`; the training loop (``lopt.training.loop.CurriculumHook``)
  saves the state in each checkpoint's ``host`` dict, so a resumed run makes the same decisions.
* :class:`Validator`: the validation loss of meta-params at a length, on held-out task instances,
  one compiled program per length (the lengths are few; ``lopt.training.held_out``).

Validation loss (``valid_metric``): by default ``"final_train_loss"``, the optimizee's training
loss at the *end* of the ``N_valid``-step run (mean of its last ``lopt.evaluation.FINAL_WINDOW``
= 10 training-batch losses, for less batch noise), averaged over ``valid_seeds`` held-out task
instances: Chen et al. evaluate learned optimizers by "the training loss of testing optimizees"
(Sec. 5). ``"mean_train_loss"`` (the mean over all ``N_valid`` steps, the meta-training
objective's shape) and ``"test_loss"`` (test-split loss of the final parameters) are the
alternatives. A diverged validation (NaN/inf) counts as +inf: never a new best.

Where the best meta-params live: host-side numpy copies, saved in the orbax checkpoint beside
the train state (``{"state": MetaTrainState, "best_meta_params": ...}``), bit-exact, while the
controller state goes into the checkpoint's JSON ``host`` dict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from estimators import schedules
from lopt.base import LearnedOptimizer, MetaParams
from lopt.training import held_out
from tasks.base import TaskFamily, data_arrays

__all__ = [
    "ACTIONS",
    "DEFAULT_STAGES",
    "VALID_METRICS",
    "VALID_SEED_OFFSET",
    "Curriculum",
    "CurriculumState",
    "Decision",
    "Validator",
    "constant_horizon",
]


def constant_horizon(length: int) -> schedules.Schedule:
    """The horizon of a stage: every trajectory N_train steps long."""
    return schedules.constant(int(length))

#: Chen et al. 2020's training unroll lengths N_train.
DEFAULT_STAGES: tuple[int, ...] = (100, 200, 500, 1000)
#: What a validation can decide.
ACTIONS = ("continue", "advance", "stop")
VALID_METRICS = ("final_train_loss", "mean_train_loss", "test_loss")
#: Held-out validation instance i is drawn from ``jax.random.PRNGKey(VALID_SEED_OFFSET + i)``,
#: far from the keys meta-training derives from ``config.seed`` (and from the evaluation
#: offset 1,000,000 of configs/ablate_estimators.py).
VALID_SEED_OFFSET = 2_000_000


def _as_loss(x: float) -> float:
    """A validation loss for comparisons: NaN and +-inf (diverged) count as +inf."""
    x = float(x)
    return x if math.isfinite(x) else math.inf


def _enc(x: float) -> float | str:
    """JSON-safe float (non-finite values as strings)."""
    return x if math.isfinite(x) else str(x)


def _dec(x: float | str) -> float:
    return float(x)


@dataclasses.dataclass(frozen=True)
class CurriculumState:
    """Where the curriculum stands (host-side, JSON-able via ``to_dict``/``from_dict``).

    ``period`` counts the validated periods of the current stage (Algorithm 1's n - 1); -1
    means the stage's baseline (the best meta-params validated at this stage's validation
    length) is still to be measured. ``best_loss`` is L_min, the best validation loss *at the
    current validation length*; ``improved`` is Algorithm 1's ``not stop``. ``stage_start`` is
    the outer step at which the stage's baseline was validated: its periods end at
    ``stage_start + k * period_steps``.
    """

    stage: int = 0
    period: int = -1
    baseline: float = math.inf
    best_loss: float = math.inf
    improved: bool = False  # this stage has beaten its baseline
    best_stage: int = -1  # stage and outer step the best meta-params come from
    best_step: int = -1
    last_step: int = -1  # outer step of the last validation (the host loop never repeats one)
    stage_start: int = 0
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["baseline"], d["best_loss"] = _enc(self.baseline), _enc(self.best_loss)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CurriculumState":
        d = dict(d)
        d["baseline"], d["best_loss"] = _dec(d["baseline"]), _dec(d["best_loss"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one validation decided.

    ``action``: ``"continue"`` (keep training this stage), ``"advance"`` (start the next stage,
    whose baseline is measured next) or ``"stop"`` (end meta-training, export the best).
    ``is_best``: the meta-params just validated are the new best; the caller keeps a copy.
    ``kind``: ``"baseline"`` (a stage's first validation, of its starting/best meta-params) or
    ``"period"`` (after ``period`` outer steps of training).
    """

    action: str
    kind: str
    stage: int
    outer_step: int
    valid_loss: float
    valid_length: int
    train_length: int
    is_best: bool
    best_loss: float
    reason: str

    def to_row(self) -> dict[str, Any]:
        """A ``metrics.jsonl`` row (non-finite losses as None)."""
        fin = lambda x: x if math.isfinite(x) else None  # noqa: E731
        return {
            "step": self.outer_step,
            "curriculum_stage": self.stage,
            "train_length": self.train_length,
            "valid_length": self.valid_length,
            "validation": self.kind,
            "valid_loss": fin(self.valid_loss),
            "best_valid_loss": fin(self.best_loss),
            "is_best": self.is_best,
            "decision": self.action,
            "reason": self.reason,
        }


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """Chen et al. 2020, Algorithm 1 (see the module docstring).

    Attributes:
      stages: training unroll lengths N_train, strictly increasing.
      period: T_period, *epochs* between validations; an epoch is one trajectory of N_train
        steps per particle, ceil(N_train / trunc_length) outer steps (:meth:`period_steps`).
      min_periods: N_period: a stage lasts at least this many periods, then continues while
        its latest validation is its best so far.
      max_periods: our extension (not in the paper): None (default) or the most periods a
        stage may take; a stage that reaches it ends as if its loop had ended.
      valid_seeds: held-out task instances per validation.
      valid_metric: one of ``VALID_METRICS`` (module docstring).
      valid_seed_offset: instance i is drawn from ``PRNGKey(valid_seed_offset + i)``.
      restart_from_best: a new stage starts from the best meta-params (Algorithm 1's
        "phi0 = phi"); False continues from the last ones. The meta-optimizer state is kept.
    """

    stages: tuple[int, ...] = DEFAULT_STAGES
    period: int = 100
    min_periods: int = 2
    max_periods: int | None = None
    valid_seeds: int = 8
    valid_metric: str = "final_train_loss"
    valid_seed_offset: int = VALID_SEED_OFFSET
    restart_from_best: bool = True

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        s = self.stages
        if not s or min(s) < 1 or any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"curriculum: stages must be positive and strictly increasing, got {s}")
        for name in ("period", "min_periods", "valid_seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"curriculum: {name} must be an int >= 1, got {v!r}")
        if self.max_periods is not None and (
            isinstance(self.max_periods, bool) or not isinstance(self.max_periods, int)
            or self.max_periods < self.min_periods
        ):
            raise ValueError(
                f"curriculum: max_periods must be None or an int >= min_periods "
                f"({self.min_periods}), got {self.max_periods!r}"
            )
        if self.valid_metric not in VALID_METRICS:
            raise ValueError(
                f"curriculum: valid_metric must be one of {VALID_METRICS}, got {self.valid_metric!r}"
            )

    def period_steps(self, stage: int, trunc_length: int) -> int:
        """Outer steps of one period of ``stage``: T_period epochs of one N_train-step
        trajectory per particle, each epoch ceil(N_train / trunc_length) outer steps."""
        return self.period * -(-self.stages[stage] // int(trunc_length))

    # -- lengths --------------------------------------------------------------------------------

    def train_length(self, state: CurriculumState) -> int:
        """N_train of the current stage."""
        return self.stages[state.stage]

    def valid_length(self, state: CurriculumState) -> int:
        """N_valid: the next stage's N_train; the last stage validates at its own."""
        return self.stages[min(state.stage + 1, len(self.stages) - 1)]

    # -- the transition -------------------------------------------------------------------------

    def init(self) -> CurriculumState:
        return CurriculumState()

    def update(
        self, state: CurriculumState, valid_loss: float, outer_step: int
    ) -> tuple[CurriculumState, Decision]:
        """Record one validation loss (measured at ``valid_length(state)``) and decide.

        If ``state.period == -1`` this is the stage's baseline (the meta-params the stage starts
        from); otherwise the validation after a period of training. Pure: ``state`` is unchanged.
        """
        if state.done:
            raise ValueError("curriculum: update() after the curriculum stopped")
        loss = _as_loss(valid_loss)
        step = int(outer_step)
        info = dict(
            stage=state.stage,
            outer_step=step,
            valid_loss=float(valid_loss),
            valid_length=self.valid_length(state),
            train_length=self.train_length(state),
        )
        if state.period < 0:  # the stage's baseline
            first = state.best_step < 0  # stage 0: the initial meta-params become the best
            new = dataclasses.replace(
                state,
                period=0,
                baseline=loss,
                best_loss=loss,
                improved=False,
                best_stage=state.stage if first else state.best_stage,
                best_step=step if first else state.best_step,
                last_step=step,
                stage_start=step,
            )
            reason = "baseline: " + ("initial meta-params" if first else
                                     f"best meta-params (stage {state.best_stage}, step "
                                     f"{state.best_step}) re-validated at the new length")
            return new, Decision("continue", "baseline", is_best=first, best_loss=loss,
                                 reason=reason, **info)

        period = state.period + 1
        is_best = loss < state.best_loss  # "if L_min > L_val": strictly better than all so far
        improved = state.improved or is_best
        new = dataclasses.replace(
            state,
            period=period,
            best_loss=loss if is_best else state.best_loss,
            improved=improved,
            best_stage=state.stage if is_best else state.best_stage,
            best_step=step if is_best else state.best_step,
            last_step=step,
        )
        name = f"stage {state.stage} (N_train={self.train_length(state)})"
        capped = self.max_periods is not None and period >= self.max_periods
        if period < self.min_periods and not capped:  # "while n <= N_period ..."
            action = "continue"
            reason = f"period {period} of at least {self.min_periods}" + ("; new best" if is_best else "")
        elif is_best and not capped:  # "... or L_val == L_min"
            action = "continue"
            reason = f"period {period}: the latest validation is the stage's best; keep training"
        elif not improved:  # "if stop == True then break"
            action = "stop"
            reason = f"{name} never beat its baseline {state.baseline:.6g} in {period} periods"
            new = dataclasses.replace(new, done=True)
        elif state.stage + 1 < len(self.stages):  # "i = i + 1, phi0 = phi"
            action = "advance"
            why = f"reached max_periods={self.max_periods}" if capped and is_best else \
                "its latest validation is not its best"
            reason = (f"{name} improved {state.baseline:.6g} -> {new.best_loss:.6g} and {why}; "
                      f"next N_train={self.stages[state.stage + 1]}")
            new = dataclasses.replace(new, stage=state.stage + 1, period=-1, improved=False)
        else:
            action = "stop"
            reason = (f"last {name} improved {state.baseline:.6g} -> {new.best_loss:.6g}; "
                      "curriculum complete")
            new = dataclasses.replace(new, done=True)
        return new, Decision(action, "period", is_best=is_best, best_loss=new.best_loss,
                             reason=reason, **info)


# --- validation ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Validator:
    """Validation loss of meta-params: ``valid_seeds`` held-out instances of ``task_family``
    trained ``length`` steps by the learned optimizer (as ``lopt.evaluation.train_curves``), the
    ``valid_metric`` averaged over instances; non-finite -> +inf."""

    task_family: TaskFamily
    learned_opt: LearnedOptimizer
    curriculum: Curriculum

    @functools.cached_property
    def keys(self) -> jax.Array:
        return held_out.instance_keys(self.curriculum.valid_seed_offset, self.curriculum.valid_seeds)

    def __call__(self, meta_params: MetaParams, length: int) -> float:
        fn = held_out.program(self.task_family, self.learned_opt, int(length))
        out = fn(meta_params, self.keys, data_arrays(self.task_family))
        values = np.asarray(jax.device_get(out[self.curriculum.valid_metric]), np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            return _as_loss(np.mean(values))
