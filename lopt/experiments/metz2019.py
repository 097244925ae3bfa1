"""Metz et al. 2019 (ICML), Sec. 4-5: the MLP optimizer meta-trained with the merged
reparameterization + ES gradient on the validation meta-objective beats learning-rate-tuned Adam
in held-out test loss at the meta-training horizon; and Sec. 3.1 / Fig. 3: the
reparameterization gradient's variance explodes on long unrolls, so the merged estimator's ES
share (``es_share``, the mean inverse-variance weight of the ES gradient) rises with the
truncation length."""

from __future__ import annotations

import copy
import dataclasses
import math
import os

from lopt.experiments.harness import (
    COST_COLUMNS,
    LRS,
    TINY_MLP,
    Report,
    UsageError,
    adam_label,
    cost_cells,
    metric_cells,
    metric_values,
    pm,
    stacked,
    stats,
    table,
    trailing,
    train_seeds,
    tuned_adam,
    verdict,
    without_curves,
)

#: The quickstart's meta-training recipe (PES, 8 particles, 20-step truncations of 200-step
#: trajectories, meta-Adam 3e-3 clipped at 3, terms normalised by the initial loss and clipped
#: at 2) on configs/metz2019.py's optimizer, task and L_valid: the cpu budget's headline arm,
#: since the merged estimator cannot reach a meta-loss that stopped falling in 45 minutes on 2
#: cores (500 outer steps: 245 s a seed, still falling; docs/results/metz2019.md).
PES_ARM = {"estimator.name": "pes", "estimator.std": 0.01, "unroll.trunc_schedule": None,
           "unroll.num_particles": 8, "unroll.trunc_length": 20, "unroll.horizon.length": 200,
           "meta_optimizer.learning_rate": 3e-3, "meta_optimizer.b1": 0.9,
           "meta_optimizer.clip_grad_norm": 3.0, "unroll.meta_loss.normalize": "initial",
           "unroll.meta_loss.clip": 2.0, "checkpoint_every": 500}

#: The probe's name for each arm's meta-params, by the arm's run subdirectory.
ESTIMATOR_LABELS = {"pes": "PES", "merged": "merged"}

#: Each budget: ``arms`` (label -> (run subdirectory, config overrides)), the first arm the
#: headline; the es_share / variance probe runs the merged arm's config.
BUDGETS: dict[str, dict] = {
    "smoke": dict(meta_seeds=1, instances=2, lrs=(1e-3, 1e-2), probe_lengths=(2, 4), probe_reps=1,
                  probe_step_scales=(10,),
                  arms={"PES (cpu-budget estimator), L_valid": (
                            "pes", {**PES_ARM, **TINY_MLP, "num_outer_steps": 2,
                                    "unroll.trunc_length": 4, "unroll.horizon.length": 8}),
                        "merged, L_valid": (
                            "merged", {**TINY_MLP, "unroll.num_particles": 4, "num_outer_steps": 2,
                                       # one length bucket: the smoke run is all compilation
                                       "unroll.trunc_length": 4, "unroll.trunc_schedule.start": 4,
                                       "unroll.trunc_schedule.end": 4, "unroll.trunc_schedule.steps": 2,
                                       "unroll.horizon.length": 8})}),
    # CPU scale. PES: 5,000 outer steps (1M inner steps), about 100 s a seed. merged: 16
    # particles (8 antithetic pairs), truncations growing 10 -> 40 (+-20%) over 1,000 outer
    # steps, 200-step trajectories (the paper: 128 workers, 50 -> 10k over 5k outer steps,
    # 10k-step trajectories), about 500 s a seed: the largest of three seeds that fits.
    "cpu": dict(meta_seeds=3, instances=16, lrs=LRS, probe_lengths=(5, 10, 20, 40, 80, 160),
                probe_reps=4, probe_step_scales=(10,),
                arms={"PES (cpu-budget estimator), L_valid": ("pes", {**PES_ARM, "num_outer_steps": 5000}),
                      "merged, L_valid": (
                          "merged", {"num_outer_steps": 1000, "unroll.num_particles": 16,
                                     "unroll.trunc_length": 48, "unroll.trunc_schedule.start": 10,
                                     "unroll.trunc_schedule.end": 40, "unroll.trunc_schedule.steps": 1000,
                                     "unroll.horizon.length": 200})}),
    # One H100: merged at the config's own scale (32 particles, 10 -> 100, 400-step
    # trajectories) for 5,000 outer steps; PES beside it. Not run yet (no GPU lent so far).
    "gpu": dict(meta_seeds=3, instances=64, lrs=LRS, probe_lengths=(5, 10, 20, 40, 80, 160, 320, 640),
                probe_reps=8, probe_step_scales=(10, 100),
                arms={"merged, L_valid": ("merged", {"num_outer_steps": 5000,
                                                     "unroll.trunc_schedule.steps": 5000}),
                      "PES, L_valid": ("pes", {**PES_ARM, "num_outer_steps": 10000,
                                               "unroll.horizon.length": 400})}),
}


def plateau(rows: list[dict], key: str = "meta_loss", fraction: float = 0.1) -> dict | None:
    """Whether ``key`` had stopped falling: its mean over the last ``fraction`` of the logged
    rows against the ``fraction`` before them, and the relative change. None when there are too
    few rows."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    k = max(1, int(len(vals) * fraction))
    if len(vals) < 2 * k or len(vals) < 4:
        return None
    last, before = sum(vals[-k:]) / k, sum(vals[-2 * k:-k]) / k
    return dict(last=last, before=before, change=(last - before) / abs(before) if before else 0.0)


#: The growth of the variance ratio rp / es from the shortest to the longest T that counts as the
#: reparameterization variance exploding (Metz et al. 2019 Fig. 4: about 25 orders of magnitude).
EXPLODES = 1e3

#: What the probe records of each meta-gradient (estimators/merged.py's metrics).
PROBED = ("es_share", "rp_nonfinite_share", "rp_variance", "es_variance")


def es_share_probe(config, meta_params: dict, lengths, reps: int, key_seed: int = 0) -> dict:
    """The merged estimator's ``es_share``, the share of non-finite reparameterization
    gradients and the two estimators' variances (``PROBED``) at each truncation length T, for
    each set of meta-params: trajectories of exactly
    T steps from initialisation (horizon T, no stagger, no truncation schedule), ``reps`` outer
    steps with a meta-optimizer that changes nothing (``optax.set_to_zero``), so every step
    measures the same meta-params."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from ml_collections import ConfigDict

    from lopt.training import config as config_lib

    out = {label: {} for label in meta_params}
    for T in lengths:
        c = copy.deepcopy(config)
        unroll = c.unroll.to_dict()
        unroll.pop("trunc_schedule", None)
        unroll.update(trunc_length=int(T), stagger=False,
                      horizon=dict(name="constant", length=int(T)))
        c.unroll = ConfigDict(unroll)
        trainer = dataclasses.replace(config_lib.build(c), meta_optimizer=optax.set_to_zero())
        for label, params in meta_params.items():
            state = trainer.init(jax.random.PRNGKey(key_seed))
            # A copy: the step donates its state, and these meta-params serve every T.
            state = state._replace(meta_params=jax.tree.map(lambda x: jnp.array(x, copy=True), params))
            got = {k: [] for k in PROBED}
            for _ in range(reps):
                state, m = trainer.step(state)
                for k in PROBED:
                    got[k].append(float(m.get(k, 0.0 if k == "rp_nonfinite_share" else np.nan)))
            out[label][int(T)] = got
            print(f"    T={T:4d} {label}: es_share {np.mean(got['es_share']):.3f}, variance rp "
                  f"{np.nanmedian(got['rp_variance']):.3g} es {np.nanmedian(got['es_variance']):.3g}",
                  flush=True)
    return out


def scale_steps(learned_opt, meta_params, factor: float):
    """``mlp`` meta-params whose every step is ``factor`` times larger: the bias of the output
    that sets the step's log-magnitude (dw = -o_0 exp(o_1 exp_mult) step_mult) shifted by
    ln(factor) / exp_mult. The learned optimizer's counterpart of Metz et al. 2019's learning-
    rate sweeps (Sec. 3, Fig. 2): larger steps make the inner dynamics chaotic, which is where
    the reparameterization gradient's variance explodes."""
    import copy as copy_lib

    import numpy as np

    if getattr(learned_opt, "name", None) != "mlp":
        raise UsageError("the step-scale probe needs the mlp learned optimizer")
    out = copy_lib.deepcopy(jax_to_numpy(meta_params))
    last = out["mlp"][-1]
    last["b"] = np.asarray(last["b"]).copy()
    last["b"][1] += math.log(factor) / learned_opt.exp_mult
    return out


def jax_to_numpy(tree):
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, tree)


def plot_es_share(probe: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_t in probe.items():
        ts = sorted(by_t)
        v = [np.asarray(by_t[t]["es_share"]) for t in ts]
        ax.errorbar(ts, [x.mean() for x in v], yerr=[x.std() for x in v], marker="o", capsize=3,
                    label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("truncation length T (inner steps)")
    ax.set_ylabel("es_share (mean ES weight in eq. 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_variances(probe: dict, path: str, title: str) -> str:
    """Metz et al. 2019 Fig. 4's two variances against the truncation length (log-log): per set
    of meta-params, the reparameterization estimate's (solid) and the ES estimate's (dashed),
    the median over the probe's meta-gradients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, by_t) in enumerate(probe.items()):
        ts = sorted(by_t)
        color = f"C{i}"
        for key, style, name in (("rp_variance", "-", "reparam."), ("es_variance", "--", "ES")):
            v = [np.nanmedian(by_t[t][key]) if np.isfinite(by_t[t][key]).any() else np.nan for t in ts]
            ax.plot(ts, v, style, marker="o", color=color, label=f"{name}, {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("truncation length T (inner steps)")
    ax.set_ylabel("variance of one pair's estimate (mean per element)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_meta_loss(arm_rows: dict, path: str) -> str:
    """Each arm's meta-loss over outer steps (every meta-seed, a trailing mean of 5% of the
    run), one panel per arm: where it stopped falling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arm_rows), figsize=(5 * len(arm_rows), 3.5), squeeze=False)
    for ax, (label, runs) in zip(axes[0], arm_rows.items()):
        for seed, rows in enumerate(runs):
            pts = [(r["step"], r["meta_loss"]) for r in rows if r.get("meta_loss") is not None]
            if not pts:
                continue
            ax.plot(*trailing(*zip(*pts)), label=f"seed {seed}")
        ax.set_xlabel("outer step")
        ax.set_ylabel("meta-loss (trailing mean)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(b: dict, runs: str, out: str, progress: bool = True) -> Report:
    import jax
    import numpy as np

    from lopt import export
    from lopt.training import evaluation, loop

    arms, rows, task, H, n = {}, {}, None, None, None
    for label, (subdir, overrides) in b["arms"].items():
        config, arm_task, arm_H, n, records, curves = train_seeds(
            "metz2019", dict(b, set=overrides), runs, subdir, progress)
        if task is not None and (arm_task.name, arm_H) != (task.name, H):
            raise UsageError(f"metz2019 arms must share the task and horizon: {label} has "
                             f"{arm_task.name} at {arm_H}, the first {task.name} at {H}")
        task, H = arm_task, arm_H
        arms[label] = dict(config=config, records=records, curves=curves, overrides=overrides,
                           subdir=subdir)
        rows[label] = [loop.read_metrics(os.path.join(r["workdir"], "metrics.jsonl")) for r in records]
    print("[metz2019] tuning Adam", flush=True)
    adam = tuned_adam(task, H, b["lrs"], n, "test_loss")
    label = adam_label(adam)
    metrics = [("test_loss", f"test loss @ H={H}", ".4f"), ("test_accuracy", "test accuracy", ".3f"),
               ("final_train_loss", "final train loss", ".4f")]
    plateau_column = "meta-loss, last 10% vs the 10% before"
    header = ["method", *(column for _, column, _ in metrics), *COST_COLUMNS, plateau_column]
    cells, outcome, plateaus = {}, [], {}
    for arm, a in arms.items():
        plateaus[arm] = [plateau(r) for r in rows[arm]]
        change = [p["change"] for p in plateaus[arm] if p]
        cells[f"learned optimizer ({arm})"] = {
            **metric_cells(a["curves"], metrics), **cost_cells(a["records"]),
            plateau_column: ", ".join(f"{c:+.1%}" for c in change) or "-"}
        outcome.append(f"{arm}, test loss at H: " + verdict(
            metric_values(a["curves"], "test_loss"), metric_values([adam["curves"]], "test_loss")[0],
            "the learned optimizer", "tuned Adam"))
    cells[label] = metric_cells([adam["curves"]], metrics)
    results = table(header, cells)
    fig = "metz2019.png"
    evaluation.plot_curves({**{f"LO, {arm}": stacked(a["curves"], "train_loss") for arm, a in arms.items()},
                            label: adam["curves"]["train_loss"]},
                           os.path.join(out, fig), f"{task.name}: training loss, held-out instances",
                           smooth=0.1)
    fig_meta = "metz2019_meta_loss.png"
    plot_meta_loss(rows, os.path.join(out, fig_meta))

    print("[metz2019] es_share and the two variances against truncation length", flush=True)
    merged = next(a for a in arms.values() if a["config"].estimator.name == "merged")
    learned_opt, trained = export.load(merged["records"][0]["export"])
    sets = {"meta-params at init": learned_opt.init(jax.random.PRNGKey(0))}
    for a in arms.values():
        sets[f"{ESTIMATOR_LABELS[a['subdir']]}-trained (seed 0)"] = (
            trained if a is merged else export.load(a["records"][0]["export"])[1])
    for k in b.get("probe_step_scales", ()):
        sets[f"merged-trained, steps x{k:g}"] = scale_steps(learned_opt, trained, k)
    probe = es_share_probe(merged["config"], sets, b["probe_lengths"], b["probe_reps"])
    fig2, fig3 = "metz2019_es_share.png", "metz2019_variance.png"
    plot_es_share(probe, os.path.join(out, fig2), "merged estimator: ES weight vs truncation length")
    plot_variances(probe, os.path.join(out, fig3), "reparameterization vs ES variance")
    ts = sorted(next(iter(probe.values())))

    def med(xs):
        xs = np.asarray(xs, np.float64)
        return f"{np.median(xs[np.isfinite(xs)]):.3g}" if np.isfinite(xs).any() else "non-finite"

    probe_table = table(["T", *(f"es_share, {k}" for k in probe)],
                        {str(t): {f"es_share, {k}": pm(stats(probe[k][t]["es_share"]), ".3f") for k in probe}
                         for t in ts})
    variance_table = table(["T", *(f"rp / es, {k}" for k in probe)],
                           {str(t): {f"rp / es, {k}": f"{med(probe[k][t]['rp_variance'])} / "
                                                       f"{med(probe[k][t]['es_variance'])}" for k in probe}
                            for t in ts})
    explodes = {}
    for k in probe:
        first, last = np.mean(probe[k][ts[0]]["es_share"]), np.mean(probe[k][ts[-1]]["es_share"])
        rises = all(np.mean(probe[k][a]["es_share"]) <= np.mean(probe[k][c]["es_share"]) + 0.02
                    for a, c in zip(ts, ts[1:]))
        rp = [float(np.nanmedian(probe[k][t]["rp_variance"])) for t in (ts[0], ts[-1])]
        es = [float(np.nanmedian(probe[k][t]["es_variance"])) for t in (ts[0], ts[-1])]
        bad = float(np.mean(probe[k][ts[-1]]["rp_nonfinite_share"]))
        ratio = [r / e if e > 0 else math.inf for r, e in zip(rp, es)]
        # Figs. 3-4's mechanism: the reparameterization variance outgrows ES's by orders of
        # magnitude (or overflows) as T grows.
        explodes[k] = bad > 0.5 or not math.isfinite(ratio[1]) or ratio[1] > EXPLODES * ratio[0]
        outcome.append(f"{k}: es_share {first:.3f} at T={ts[0]} -> {last:.3f} at T={ts[-1]} "
                       f"({'rises' if last > first + 0.05 else 'does not rise'}"
                       f"{' monotonically' if rises and last > first + 0.05 else ''}); variance "
                       f"reparameterization {rp[0]:.3g} -> {rp[1]:.3g}, ES {es[0]:.3g} -> {es[1]:.3g}; "
                       f"rp / es {ratio[0]:.3g} -> {ratio[1]:.3g} "
                       f"({'explodes' if explodes[k] else 'does not explode'}).")
    yes = [k for k in probe if explodes[k]]
    no = [k for k in probe if not explodes[k]]
    head = ("**reproduced**" if yes and not no else "**not reproduced**" if no and not yes else
            "**reproduced** for some meta-params only")
    outcome.append(f"Figs. 3-4, the reparameterization variance outgrows ES's (x{EXPLODES:g} or more "
                   f"in rp / es from T={ts[0]} to T={ts[-1]}): {head}: explodes with "
                   f"{', '.join(yes) or 'none'}; not with {', '.join(no) or 'none'}.")
    arm_settings = "; ".join(f"{arm}: `{sub}` runs with {o}" for arm, (sub, o) in b["arms"].items())
    return Report(
        name="metz2019",
        title="Metz et al. 2019: learned optimizer on L_valid vs tuned Adam; the estimators' variance vs truncation",
        claim=("Metz et al. 2019 (Sec. 4-5): the per-parameter MLP optimizer meta-trained with the "
               "merged reparameterization + antithetic ES gradient (eq. 1, weights by inverse "
               "variance) on the validation meta-objective outperforms learning-rate-tuned Adam "
               "in held-out test loss at the meta-training horizon. Sec. 3.1 / Figs. 3-4: the "
               "reparameterization gradient's variance explodes as unrolls grow (ES's does not), "
               "so eq. 1 leans on ES: es_share rises with the truncation length."),
        setting=(f"configs/metz2019.py with each arm's overrides ({arm_settings}; the config's "
                 f"docstring lists each CPU-scale departure). The headline arm is the first: "
                 f"PES stands in for merged where merged cannot reach a meta-loss that stopped "
                 f"falling within the budget. Task {task.name}; {b['meta_seeds']} meta-seeds per "
                 f"arm; evaluation on {n} held-out instances for H={H} steps; Adam's rate tuned "
                 f"for test loss at H over {len(b['lrs'])} rates on {n} separate instances. "
                 f"Probe (the merged arm's config): trajectories of exactly T steps from init, "
                 f"{b['probe_reps']} meta-gradients per T, meta-params at init, after each arm's "
                 "meta-training (seed 0), and merged-trained with every step scaled up (x"
                 + ", x".join(f"{k:g}" for k in b.get("probe_step_scales", ()))
                 + "; the learned optimizer's counterpart of the paper's learning-rate sweeps)."),
        outcome=outcome,
        tables=[(f"Held-out instances at H={H}, mean ± std over {n} instances x meta-seeds; the "
                 "last column is each meta-seed's relative change of the meta-loss (a plateau "
                 "is near 0).", results),
                ("es_share (mean ± std over meta-gradients) against truncation length T.", probe_table),
                ("Variance of one pair's reparameterization / ES estimate (mean per element; "
                 "median over meta-gradients) against T.", variance_table)],
        figures=[("Training loss on the held-out instances", fig),
                 ("Meta-loss over meta-training, each arm and meta-seed", fig_meta),
                 ("es_share against truncation length", fig2),
                 ("The two estimators' variances against truncation length", fig3)],
        notes=["Adam's sweep (mean test loss at H on the tuning instances): "
               + ", ".join(f"{lr:.3g}: {v:.4f}" for lr, v in adam["sweep"].items())],
        record=dict(arms={arm: dict(config=a["config"].to_dict(), runs=a["records"],
                                    lo=[without_curves(c) for c in a["curves"]],
                                    meta_loss_plateau=plateaus[arm]) for arm, a in arms.items()},
                    horizon=H, adam_best_lr=adam["best_lr"], adam_sweep=adam["sweep"],
                    adam=without_curves(adam["curves"]), probe=probe),
    )
