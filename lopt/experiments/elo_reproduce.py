"""The ELO reproduction (``scripts/reproduce.py --experiment=elo``, :func:`run`): the horizon
search behind Table 1, the ablation (``lopt.experiments.elo``) at the H it finds, and Figure 2.

ELO, "Sampling Efficiency & Meta-Training Stability", Figure 2:

* left, "Buffer initialization achieves longer effective unrolls without extra cost": the
  positions the meta-training segments reach (``position_mean`` / ``position_max`` of
  ``metrics.jsonl``, the inner step a particle is at when its segment ends) against the inner
  steps meta-training has spent (``inner_steps_total``), for the naive, curriculum and ELO runs
  of the ablation: every method spends N inner steps per particle per outer step, so a method
  whose positions run ahead of the others' reaches later optimizee states at the same cost.
* right, "Buffer alone causes collapse; adding behavior cloning ensures stable meta-training":
  the ELO config with behaviour cloning switched off (``buffer alone``) beside the ELO runs
  (``buffer + BC``), per outer step: the task meta-loss and the shares of meta-loss terms at
  the clip (``clipped_share``) and of non-finite training losses (``nonfinite_share``: a
  diverged inner run), every meta-seed; and each run's export on held-out instances at H.

The horizon search (:func:`horizon_search`) finds an H at which the naive learned optimizer
does degrade at 10 H, which ELO's claim needs: the naive config meta-trained at each H of a
grid (one meta-seed), evaluated at H and 10 H on the held-out instances against AdamW tuned
per length. "Degrades" (:func:`degradation`) is read two ways, both printed: *absolute*, its
held-out training loss ends 10 H more than 10% above the lowest it reached on the way (it turns
back up), or its test accuracy at 10 H is below that at H by more than 2 standard errors
(paired over the instances); *relative*, its final training loss
over tuned AdamW's grows from H to 10 H by more than half. The table uses the largest H that
degrades absolutely, else the largest that degrades relatively, else the budget's own H.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil

from lopt.experiments.elo import (
    BUDGETS,
    ablate,
    budget_flags,
    budget_options,
    evaluate_adamw,
    evaluate_export,
    settings,
)
from lopt.experiments.harness import (
    Report,
    fmt,
    meta_train,
    pm,
    stats,
    table,
    task_of,
    trailing,
    verdict,
)

#: What scripts/reproduce.py reads of an experiment's module (the budgets are the ablation's).
__all__ = ["BUDGETS", "run", "horizon_search", "degradation", "position_summary", "stability"]

#: "Degrades" thresholds (:func:`degradation`): the training loss's rise at 10 H above its best
#: on the way, and the growth of the ratio to AdamW from H to 10 H.
RISE = 0.10
RATIO_GROWTH = 1.5


def mean_curve(curves) -> "object":
    """Mean over instances of [instances, steps] training-loss curves, non-finite left out."""
    import numpy as np

    c = np.asarray(curves, np.float64)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(c), c, np.nan), 0)


def degradation(lo: dict, adamw: dict, H: int, long: int) -> dict:
    """How the learned optimizer's held-out run at ``long`` = 10 H compares with its run at H and
    with tuned AdamW (``lo`` / ``adamw``: ``elo.evaluate_export`` / ``evaluate_adamw`` results).
    ``rise``: the mean training loss over the last 10% of the long run against the lowest
    10%-window mean on the way, minus 1; ``ratio_h`` / ``ratio_long``: final training loss over
    AdamW's at each length."""
    import numpy as np

    _, windows = trailing(np.arange(long + 1), mean_curve(lo[long]["train_loss"]), 0.1)
    rise = float(windows[-1] / np.nanmin(windows) - 1.0)
    acc_h, acc_l = (lo[n].get("test_accuracy") for n in (H, long))
    acc_drop = acc_se = None
    if acc_h is not None:  # paired over the same instances
        d = np.asarray(acc_h, np.float64) - np.asarray(acc_l, np.float64)
        acc_drop, acc_se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    ratio = {n: float(np.mean(lo[n]["final_train_loss"]) / np.mean(adamw[n]["final_train_loss"]))
             for n in (H, long)}
    absolute = rise > RISE or (acc_drop is not None and acc_drop > 2 * acc_se)
    relative = ratio[long] > RATIO_GROWTH * ratio[H]
    return dict(rise=rise, accuracy_drop=acc_drop, accuracy_drop_se=acc_se, ratio_h=ratio[H], ratio_long=ratio[long],
                absolute=bool(absolute), relative=bool(relative))


def horizon_search(base_settings, horizons, factor: int, runs: str, progress: bool = True) -> dict:
    """The naive config at each H of ``horizons`` (``base_settings(H)``: ``elo.settings`` at that
    N), one meta-seed, evaluated at H and ``factor`` H; returns every H's degradation and the H
    chosen (see the module docstring)."""

    found = {}
    for H in horizons:
        s = base_settings(H)
        config = copy.deepcopy(s["configs"]["naive"])
        config.seed = 0
        task = task_of(config)
        keys, tune_keys = (_keys(s[k]) for k in ("seeds", "tune_seeds"))
        lengths = (H, factor * H)
        print(f"[elo] horizon search: naive at H={H}", flush=True)
        record = meta_train(config, os.path.join(runs, f"H{H}", "seed0"), progress)
        lo = evaluate_export(record["export"], task, keys, lengths)
        adamw = evaluate_adamw(task, tune_keys, keys, lengths, list(s["options"].lrs),
                                   s["options"].weight_decay)
        d = degradation(lo, adamw, H, factor * H)
        d["final_train_loss"] = {n: float(lo[n]["final_train_loss"].mean()) for n in lengths}
        d["adamw_final_train_loss"] = {n: float(adamw[n]["final_train_loss"].mean()) for n in lengths}
        d["test_accuracy"] = {n: None if lo[n].get("test_accuracy") is None
                              else float(lo[n]["test_accuracy"].mean()) for n in lengths}
        found[H] = d
        print(f"    rise {d['rise']:+.1%}, accuracy drop {fmt(d['accuracy_drop'], '+.4f')}, "
              f"LO/AdamW {d['ratio_h']:.2f} at H -> {d['ratio_long']:.2f} at {factor}H", flush=True)
    absolute = [H for H in horizons if found[H]["absolute"]]
    relative = [H for H in horizons if found[H]["relative"]]
    chosen, why = ((max(absolute), "absolute") if absolute else
                   (max(relative), "relative") if relative else (None, "none"))
    return dict(horizons=found, chosen=chosen, criterion=why)


def _keys(seeds):
    import jax
    import jax.numpy as jnp

    return jnp.stack([jax.random.PRNGKey(x) for x in seeds])


def search_table(search: dict, factor: int) -> str:
    header = ["H", f"LO train loss @ H / @ {factor}H", f"AdamW @ H / @ {factor}H",
              f"LO / AdamW @ H -> @ {factor}H", f"rise @ {factor}H", "test acc drop",
              "degrades (abs. / rel.)"]
    rows = {}
    for H, d in search["horizons"].items():
        n = (H, factor * H)
        rows[str(H)] = {
            header[1]: f"{d['final_train_loss'][n[0]]:.4f} / {d['final_train_loss'][n[1]]:.4f}",
            header[2]: f"{d['adamw_final_train_loss'][n[0]]:.4f} / {d['adamw_final_train_loss'][n[1]]:.4f}",
            header[3]: f"{d['ratio_h']:.2f} -> {d['ratio_long']:.2f}",
            header[4]: f"{d['rise']:+.1%}", header[5]: fmt(d["accuracy_drop"], "+.4f"),
            header[6]: f"{'yes' if d['absolute'] else 'no'} / {'yes' if d['relative'] else 'no'}"}
    return table(header, rows)


# --- Figure 2 left: positions against inner steps spent ------------------------------------------


def positions(rows: list[dict]) -> dict:
    """A run's (inner steps spent, mean position, max position) per logged row."""
    import numpy as np

    rows = [r for r in rows if "position_mean" in r and "inner_steps_total" in r]
    return {k: np.asarray([r[src] for r in rows], np.float64)
            for k, src in (("inner", "inner_steps_total"), ("mean", "position_mean"),
                           ("max", "position_max"))}


def position_summary(runs: dict[str, list[list[dict]]]) -> dict:
    """Per method, over its meta-seeds: the mean position over the run, the largest position
    reached, and the inner steps spent (all from metrics.jsonl)."""
    import numpy as np

    out = {}
    for method, seeds in runs.items():
        p = [positions(rows) for rows in seeds]
        out[method] = dict(mean_position=stats([x["mean"].mean() for x in p]),
                           max_position=stats([x["max"].max() for x in p]),
                           inner_steps=float(np.mean([x["inner"][-1] for x in p])))
    return out


def plot_positions(runs: dict[str, list[list[dict]]], path: str, H: int) -> str:
    """Fig. 2 left: mean (solid) and max (dotted) segment-end position against inner steps
    spent, each method's meta-seeds averaged (trailing mean over 5% of the rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (method, seeds) in enumerate(runs.items()):
        p = [positions(rows) for rows in seeds]
        n = min(len(x["inner"]) for x in p)
        if n == 0:
            continue
        inner = np.mean([x["inner"][:n] for x in p], 0)
        for key, style in (("mean", "-"), ("max", ":")):
            ax.plot(*trailing(inner, np.mean([x[key][:n] for x in p], 0)), style, color=f"C{i}",
                    label=f"{method}, {key} position")
    ax.axhline(H, color="grey", lw=0.8, ls="--", label=f"H = N = {H}")
    ax.set_yscale("log")
    ax.set_xlabel("inner steps spent by meta-training")
    ax.set_ylabel("inner step reached at a segment's end")
    ax.set_title("ELO Fig. 2 left: effective unroll length at equal cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- Figure 2 right: buffer alone against buffer + behaviour cloning ----------------------------


def buffer_alone(elo_config, meta_seeds, runs: str, progress: bool = True) -> list[dict]:
    """The ELO config with behaviour cloning off, one run per meta-seed in ``runs/seed<k>``."""
    records = []
    for seed in meta_seeds:
        c = copy.deepcopy(elo_config)
        c.unroll.behaviour_cloning.enabled = False
        c.seed = seed
        print(f"[elo] buffer alone (no behaviour cloning), meta-seed {seed}", flush=True)
        records.append(meta_train(c, os.path.join(runs, f"seed{seed}"), progress))
    return records


def stability(rows: list[dict], ramp_end: int) -> dict:
    """A run's stability figures after ``ramp_end`` outer steps (behaviour cloning's ramp over:
    from there both arms' meta-loss is the task term alone): the mean meta-loss of its first and
    last 10% of rows, the mean clipped and non-finite shares, and the largest meta-loss."""
    import numpy as np

    after = [r for r in rows if r.get("step", 0) > ramp_end and r.get("meta_loss") is not None]
    if not after:
        return {}
    k = max(1, len(after) // 10)
    ml = np.asarray([r["meta_loss"] for r in after], np.float64)
    return dict(meta_loss_first=float(ml[:k].mean()), meta_loss_last=float(ml[-k:].mean()),
                meta_loss_max=float(ml.max()),
                clipped_share=float(np.mean([r.get("clipped_share", 0.0) for r in after])),
                nonfinite_share=float(np.mean([r.get("nonfinite_share", 0.0) for r in after])))


def plot_stability(arms: dict[str, list[list[dict]]], path: str, ramp_end: int) -> str:
    """Fig. 2 right: per outer step, the meta-loss and the at-clip / non-finite shares, every
    meta-seed of each arm (thin lines, trailing mean over 5% of the rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("meta_loss", "meta-loss"), ("clipped_share", "share of terms at the clip"),
            ("nonfinite_share", "share of non-finite training losses"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, (arm, seeds) in enumerate(arms.items()):
        for j, rows in enumerate(seeds):
            for ax, (key, _) in zip(axes, keys):
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "inner_steps_total" in r]
                if not pts:
                    continue
                ax.plot(*trailing(*zip(*pts)), color=f"C{i}", lw=1, label=arm if j == 0 else None)
    for ax, (_, label) in zip(axes, keys):
        ax.axvline(ramp_end, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("outer step (dashed: behaviour cloning's ramp ends)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ELO Fig. 2 right: buffer alone vs buffer + behaviour cloning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stability_verdict(alone: list, with_bc: list, k: int) -> str:
    """"Buffer alone is worse than buffer + BC" from paired held-out final training losses at H
    ([meta-seeds x instances] each)."""
    import numpy as np

    a = np.asarray(alone, np.float64).reshape(k, -1)
    b = np.asarray(with_bc, np.float64).reshape(k, -1)
    return verdict(b, a, "buffer + BC", "buffer alone")


# --- the reproduction ---------------------------------------------------------------------------


def run(b: dict, runs: str, out: str, progress: bool = True) -> Report:
    """The reproduction at budget ``b``: the horizon search (``search_horizons``, py)
    picks H; the ablation at that H in ``runs/ablate`` (its own table, results and plot); Fig. 2
    left from the ablation's runs; Fig. 2 right from ELO's runs and the buffer-alone runs
    (``runs/buffer_alone``); the report: ELO-LO against LO naive at 10 H, each learned
    optimizer from H to 10 H, the positions, the stability."""
    import numpy as np

    from lopt.training import loop

    outcome, tables, figures, extra = [], [], [], {}
    o = budget_options(b)
    if b.get("search_horizons"):
        def at(H):
            return settings(dataclasses.replace(o, overrides=(*o.overrides, ("unroll.trunc_length", H))))

        search = horizon_search(at, b["search_horizons"], o.factor,
                                         os.path.join(runs, "search"), progress)
        extra["horizon_search"] = search
        tables.append((f"Horizon search: the naive learned optimizer (one meta-seed) meta-trained at "
                       f"each H, evaluated at H and {o.factor}H; 'rise': its training loss at the end "
                       f"of {o.factor}H over the lowest it reached (10%-window means); degrades "
                       f"absolutely when rise > {RISE:.0%} or its test accuracy drops "
                       f"by > 2 s.e., relatively when LO / AdamW grows more than {RATIO_GROWTH}x.",
                       search_table(search, o.factor)))
        if search["chosen"] is not None:
            b = dict(b, overrides={**b.get("overrides", {}), "unroll.trunc_length": search["chosen"]})
            outcome.append(f"horizon search: the naive learned optimizer degrades at {o.factor}H "
                           f"({search['criterion']}ly) at H in "
                           f"{[H for H, d in search['horizons'].items() if d[search['criterion']]]}; "
                           f"the table and Fig. 2 use H={search['chosen']}.")
        else:
            outcome.append(f"horizon search: the naive learned optimizer degrades at no H of "
                           f"{list(b['search_horizons'])}; the table keeps the budget's H.")
    s = settings(budget_options(b))
    workdir = os.path.join(runs, "ablate")
    command = ["scripts/ablate.py", f"--out={workdir}", *budget_flags(b)]
    print(f"[elo] {' '.join(command)}", flush=True)
    res, failed = ablate(s, workdir, command, progress)
    if failed:
        raise RuntimeError(f"the ablation's {', '.join(failed)} failed (see {workdir}/results.json)")
    shutil.copyfile(os.path.join(workdir, "curves.png"), os.path.join(out, "elo.png"))
    H, long = res["horizon"], res["long_horizon"]
    methods = res["methods"]
    k = len(res["meta_seeds"])
    metric = "test_accuracy" if methods["adamw"]["eval"][str(H)].get("test_accuracy") else "test_loss"
    for m in ("naive", "curriculum", "elo"):
        e = methods.get(m, {}).get("eval")
        if not e:
            continue
        h, l = e[str(H)][metric]["mean"], e[str(long)][metric]["mean"]
        outcome.append(f"{m}: {metric} {fmt(h)} at H -> {fmt(l)} at {long // H}H ({l - h:+.4f}); "
                       f"final train loss {fmt(e[str(H)]['final_train_loss']['mean'])} -> "
                       f"{fmt(e[str(long)]['final_train_loss']['mean'])}")
    if "elo" in methods and "naive" in methods:
        ours, theirs = (np.asarray(methods[m]["eval"][str(long)][metric]["per_seed"], np.float64)
                        for m in ("elo", "naive"))
        outcome.insert(len(outcome) - 3, f"at {long // H}H, {metric}: " + verdict(
            ours.reshape(k, -1), theirs.reshape(k, -1), "ELO-LO", "LO naive",
            lower_is_better=metric != "test_accuracy"))
    tables.append(("ELO Table 1's shape at the chosen H. Mean ± std over instances x meta-seeds.", res["table"]))
    figures.append((f"Training loss over {long} steps on held-out instances, H marked", "elo.png"))

    # Fig. 2 left: the three learned optimizers' positions against inner steps spent.
    rows = {m: [loop.read_metrics(os.path.join(r["workdir"], "metrics.jsonl")) for r in methods[m]["runs"]]
            for m in ("naive", "curriculum", "elo") if methods.get(m, {}).get("runs")}
    pos = position_summary(rows)
    plot_positions(rows, os.path.join(out, "elo_positions.png"), H)
    figures.append(("Fig. 2 left: positions reached against inner steps spent", "elo_positions.png"))
    tables.append(("Fig. 2 left: the inner step a segment ends at (mean over the run; the largest "
                   "reached), mean ± std over meta-seeds, at the inner steps each spent.",
                   table(["method", "mean position", "max position", "inner steps spent"],
                         {m: {"mean position": pm(p["mean_position"], ".1f"),
                              "max position": pm(p["max_position"], ".0f"),
                              "inner steps spent": f"{p['inner_steps']:,.0f}"} for m, p in pos.items()})))
    if "elo" in pos and "naive" in pos:
        per_seed = [np.asarray(pos[m]["mean_position"]["per_seed"]) for m in ("elo", "naive")]
        same_cost = pos["elo"]["inner_steps"] <= 1.01 * pos["naive"]["inner_steps"]
        longer = bool(np.all(per_seed[0] > per_seed[1])) and same_cost
        outcome.append(f"Fig. 2 left, longer effective unrolls at the same cost: "
                       f"{'**reproduced**' if longer else '**not reproduced**'}: ELO's mean position "
                       f"{pm(pos['elo']['mean_position'], '.1f')} (max "
                       f"{pm(pos['elo']['max_position'], '.0f')}) against naive's "
                       f"{pm(pos['naive']['mean_position'], '.1f')} for "
                       f"{pos['elo']['inner_steps']:,.0f} / {pos['naive']['inner_steps']:,.0f} inner steps "
                       f"(every meta-seed {'higher' if np.all(per_seed[0] > per_seed[1]) else 'not higher'}"
                       f"{'' if same_cost else '; ELO spent more inner steps'}).")

    # Fig. 2 right: buffer alone against buffer + behaviour cloning.
    if methods.get("elo", {}).get("runs"):
        task = task_of(s["configs"]["elo"])
        keys = _keys(s["seeds"])
        alone = buffer_alone(s["configs"]["elo"], res["meta_seeds"],
                                      os.path.join(runs, "buffer_alone"), progress)
        alone_eval = [evaluate_export(r["export"], task, keys, (H, long)) for r in alone]
        ramp = int(s["configs"]["elo"].unroll.behaviour_cloning.schedule.steps)
        arms = {"buffer alone": [loop.read_metrics(os.path.join(r["workdir"], "metrics.jsonl")) for r in alone],
                "buffer + BC (ELO)": rows["elo"]}
        plot_stability(arms, os.path.join(out, "elo_stability.png"), ramp)
        figures.append(("Fig. 2 right: buffer alone vs buffer + behaviour cloning over meta-training",
                        "elo_stability.png"))
        stab = {arm: [stability(r, ramp) for r in rs] for arm, rs in arms.items()}
        # Held-out final training loss at H (the figure's claim) and at 10 H (which of ELO's
        # two parts Table 1's gain comes from), paired over instances x meta-seeds.
        held, held_long = ({"buffer alone": np.concatenate([np.asarray(e[n]["final_train_loss"]) for e in alone_eval]),
                            "buffer + BC (ELO)": np.asarray(methods["elo"]["eval"][str(n)]["final_train_loss"]["per_seed"])}
                           for n in (H, long))
        cols = ["arm", "meta-loss, first / last 10% after the ramp", "largest meta-loss",
                "terms at clip", "non-finite losses", f"held-out train loss @ H={H}",
                f"@ {long // H}H={long}"]
        tables.append((f"Fig. 2 right, after behaviour cloning's ramp (outer step {ramp}), per "
                       "meta-seed means; held-out: mean ± std over instances x meta-seeds.",
                       table(cols, {arm: {cols[1]: ", ".join(f"{x['meta_loss_first']:.3f} / {x['meta_loss_last']:.3f}" for x in st if x),
                                          cols[2]: ", ".join(f"{x['meta_loss_max']:.3f}" for x in st if x),
                                          cols[3]: ", ".join(f"{x['clipped_share']:.3f}" for x in st if x),
                                          cols[4]: ", ".join(f"{x['nonfinite_share']:.4f}" for x in st if x),
                                          cols[5]: pm(stats(held[arm])),
                                          cols[6]: pm(stats(held_long[arm]))} for arm, st in stab.items()})))
        outcome.append("Fig. 2 right, buffer + BC trains a better optimizer than the buffer alone "
                       "(held-out final train loss at H): "
                       + stability_verdict(held["buffer alone"], held["buffer + BC (ELO)"], k))
        outcome.append(f"(not a claim of the paper) at {long // H}H, buffer + BC against the buffer "
                       "alone (held-out final train loss): "
                       + stability_verdict(held_long["buffer alone"], held_long["buffer + BC (ELO)"], k))
        extra["buffer_alone"] = dict(runs=alone, stability=stab,
                                     held_out_final_train_loss={a: v.tolist() for a, v in held.items()},
                                     held_out_final_train_loss_long={a: v.tolist() for a, v in held_long.items()})
    extra["positions"] = pos
    return Report(
        name="elo",
        title="ELO: Table 1's shape at a horizon where naive degrades, and Figure 2's two mechanisms",
        claim=("ELO (Algorithm 1: a replay buffer of optimizee states and online behaviour "
               "cloning) trains a learned optimizer that generalises to 10x the meta-training "
               "horizon H, where the naively trained one degrades (Table 1). Figure 2: the buffer "
               "gives longer effective unrolls at no extra cost (left); the buffer alone "
               "collapses meta-training and behaviour cloning keeps it stable (right)."),
        setting=(f"scripts/ablate.py {' '.join(budget_flags(b))}: task {res['task']}, H={H}, "
                 f"evaluated at H and {long} on {len(res['eval_seeds'])} held-out instances x "
                 f"meta-seeds {res['meta_seeds']}; AdamW tuned per length on separate instances "
                 f"(PRNGKey({res['adamw_tune_seeds'][0]}..)). One estimator (the configs' "
                 f"`{s['configs']['elo'].estimator.name}`) for every learned optimizer. H from the "
                 f"horizon search over {list(b.get('search_horizons') or [H])} "
                 "(lopt/experiments/elo_reproduce.py). Fig. 2 right: the ELO config with "
                 "`unroll.behaviour_cloning.enabled=False`, the same meta-seeds."),
        outcome=outcome,
        tables=tables,
        figures=figures,
        notes=[f"ablate's own outputs: {os.path.relpath(workdir)} (table.md, results.json)."],
        record={**res, **extra},
    )
