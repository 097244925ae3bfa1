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
    train_seeds,
    tuned_adam,
    verdict,
    without_curves,
)

BUDGETS: dict[str, dict] = {
    "smoke": dict(meta_seeds=1, instances=2, lrs=(1e-3, 1e-2), probe_lengths=(2, 4), probe_reps=1,
                  probe_step_scales=(10,),
                  set={**TINY_MLP, "unroll.num_particles": 4, "num_outer_steps": 2,
                       # one length bucket: the smoke run is all compilation
                       "unroll.trunc_length": 4, "unroll.trunc_schedule.start": 4, "unroll.trunc_schedule.end": 4,
                       "unroll.trunc_schedule.steps": 2, "unroll.horizon.length": 8}),
    # CPU scale: 16 particles (8 antithetic pairs), truncations growing 10 -> 40 (+-20%)
    # over 500 outer steps, 200-step trajectories (the paper: 128 workers, 50 -> 10k, 10k);
    # shorter settings tried: docs/results/metz2019.md, "What was tried before".
    "cpu": dict(meta_seeds=3, instances=16, lrs=LRS, probe_lengths=(5, 10, 20, 40, 80, 160),
                probe_reps=4, probe_step_scales=(10, 100),
                set={"num_outer_steps": 500, "unroll.num_particles": 16, "unroll.trunc_length": 48,
                     "unroll.trunc_schedule.start": 10, "unroll.trunc_schedule.end": 40,
                     "unroll.trunc_schedule.steps": 500, "unroll.horizon.length": 200}),
    "gpu": dict(meta_seeds=3, instances=64, lrs=LRS, probe_lengths=(5, 10, 20, 40, 80, 160, 320, 640),
                probe_reps=8, probe_step_scales=(10, 100), set={}),
}


def es_share_probe(config, meta_params: dict, lengths, reps: int, key_seed: int = 0) -> dict:
    """The merged estimator's ``es_share`` (and the share of non-finite reparameterization
    gradients) at each truncation length T, for each set of meta-params: trajectories of exactly
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
            shares, bad = [], []
            for _ in range(reps):
                state, m = trainer.step(state)
                shares.append(float(m["es_share"]))
                bad.append(float(m.get("rp_nonfinite_share", 0.0)))
            out[label][int(T)] = dict(es_share=shares, rp_nonfinite_share=bad)
            print(f"    T={T:4d} {label}: es_share {np.mean(shares):.3f}", flush=True)
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


def run(b: dict, runs: str, out: str, progress: bool = True) -> Report:
    import numpy as np

    from lopt import export
    from lopt.training import evaluation

    config, task, H, n, records, curves = train_seeds("metz2019", b, runs, "merged", progress)
    print("[metz2019] tuning Adam", flush=True)
    adam = tuned_adam(task, H, b["lrs"], n, "test_loss")
    label = adam_label(adam)
    metrics = [("test_loss", f"test loss @ H={H}", ".4f"), ("test_accuracy", "test accuracy", ".3f"),
               ("final_train_loss", "final train loss", ".4f")]
    header = ["method", *(column for _, column, _ in metrics), *COST_COLUMNS]
    results = table(header, {"learned optimizer (merged, L_valid)": {**metric_cells(curves, metrics),
                                                                      **cost_cells(records)},
                             label: metric_cells([adam["curves"]], metrics)})
    outcome = ["test loss at H: " + verdict(metric_values(curves, "test_loss"),
                                            metric_values([adam["curves"]], "test_loss")[0],
                                            "the learned optimizer", "tuned Adam")]
    fig = "metz2019.png"
    evaluation.plot_curves({"learned optimizer": stacked(curves, "train_loss"),
                            label: adam["curves"]["train_loss"]},
                           os.path.join(out, fig), f"{task.name}: training loss, held-out instances",
                           smooth=0.1)

    print("[metz2019] es_share against truncation length", flush=True)
    learned_opt, trained = export.load(records[0]["export"])
    import jax

    init = learned_opt.init(jax.random.PRNGKey(0))
    sets = {"meta-params at init": init, "meta-trained (seed 0)": trained}
    for k in b.get("probe_step_scales", ()):
        sets[f"meta-trained, steps x{k:g}"] = scale_steps(learned_opt, trained, k)
    probe = es_share_probe(config, sets, b["probe_lengths"], b["probe_reps"])
    fig2 = "metz2019_es_share.png"
    plot_es_share(probe, os.path.join(out, fig2), "merged estimator: ES weight vs truncation length")
    ts = sorted(next(iter(probe.values())))
    probe_table = table(["T", *(f"es_share, {k}" for k in probe)],
                        {str(t): {f"es_share, {k}": pm(stats(probe[k][t]["es_share"]), ".3f") for k in probe}
                         for t in ts})
    for k in probe:
        first, last = np.mean(probe[k][ts[0]]["es_share"]), np.mean(probe[k][ts[-1]]["es_share"])
        rises = all(np.mean(probe[k][a]["es_share"]) <= np.mean(probe[k][c]["es_share"]) + 0.02
                    for a, c in zip(ts, ts[1:]))
        outcome.append(f"es_share with {k}: {first:.3f} at T={ts[0]} -> {last:.3f} at T={ts[-1]} "
                       f"({'rises' if last > first + 0.05 else 'does not rise'}"
                       f"{' monotonically' if rises and last > first + 0.05 else ''}).")
    return Report(
        name="metz2019",
        title="Metz et al. 2019: merged-gradient learned optimizer vs tuned Adam; ES share vs truncation",
        claim=("Metz et al. 2019 (Sec. 4-5): the per-parameter MLP optimizer meta-trained with the "
               "merged reparameterization + antithetic ES gradient (eq. 1, weights by inverse "
               "variance) on the validation meta-objective outperforms learning-rate-tuned Adam "
               "in held-out test loss at the meta-training horizon. Sec. 3.1 / Fig. 3: the "
               "reparameterization gradient's variance explodes as unrolls grow, so eq. 1 leans "
               "on ES: es_share rises with the truncation length."),
        setting=(f"configs/metz2019.py with {b['set'] or 'no overrides'} (the config's docstring "
                 f"lists each CPU-scale departure); task {task.name}; {b['meta_seeds']} "
                 f"meta-seeds; evaluation on {n} held-out instances for H={H} steps; Adam's rate "
                 f"tuned for test loss at H over {len(b['lrs'])} rates on {n} separate instances. "
                 f"es_share probe: trajectories of exactly T steps from init, {b['probe_reps']} "
                 "meta-gradients per T, meta-params at init, after meta-training, and after "
                 "meta-training with every step scaled up (x"
                 + ", x".join(f"{k:g}" for k in b.get("probe_step_scales", ()))
                 + "; the learned optimizer's counterpart of the paper's learning-rate sweeps)."),
        outcome=outcome,
        tables=[(f"Held-out instances at H={H}, mean ± std over {n} instances x meta-seeds.", results),
                ("es_share (mean ± std over meta-gradients) against truncation length T.", probe_table)],
        figures=[("Training loss on the held-out instances", fig),
                 ("es_share against truncation length", fig2)],
        notes=["Adam's sweep (mean test loss at H on the tuning instances): "
               + ", ".join(f"{lr:.3g}: {v:.4f}" for lr, v in adam["sweep"].items())],
        record=dict(config=config.to_dict(), runs=records, horizon=H, adam_best_lr=adam["best_lr"],
                    adam_sweep=adam["sweep"], lo=[without_curves(c) for c in curves],
                    adam=without_curves(adam["curves"]), es_share_probe=probe),
    )
