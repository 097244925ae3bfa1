"""Chen et al. 2020 (NeurIPS), Sec. 5.3 / Table 2: L2O-DM trained with the curriculum (Alg. 1)
and imitation of analytical optimizers (Alg. 2) reaches a lower final training loss than L2O-DM
trained naively, on unseen ``mlp_orig`` MNIST optimizees run well past the training length;
Adam (tuned) beside them."""

from __future__ import annotations

import copy
import os

from lopt.experiments.harness import (
    COST_COLUMNS,
    EVAL_SEED_OFFSET,
    LRS,
    Report,
    adam_label,
    configured,
    cost_cells,
    ensure_mnist,
    keys,
    lo_curves,
    meta_train,
    metric_cells,
    metric_values,
    stacked,
    table,
    task_of,
    tuned_adam,
    verdict,
    without_curves,
)

_MNIST14 = {"task.dataset": "mnist", "task.resize": 14}

BUDGETS: dict[str, dict] = {
    "smoke": dict(meta_seeds=1, instances=2, lrs=(1e-3, 1e-2), factor=2, models=("lstm_dm",),
                  set={"num_outer_steps": 3, "unroll.num_particles": 2, "unroll.trunc_length": 4,
                       "task.batch_size": 16, "curriculum.stages": (4, 8), "curriculum.period": 1,
                       "curriculum.min_periods": 1, "curriculum.valid_seeds": 2}),
    # CPU scale: MNIST 14x14 (the paper's 28x28 MNIST optimizee is 4x the coordinates the
    # coordinate-wise LSTM runs on), 4 particles, stages 20..160, a 160-outer-step budget,
    # periods of T_period = 20 epochs (the config's 5 stopped stage 0 too early:
    # docs/results/chen2020.md, "What was tried before").
    "cpu": dict(meta_seeds=3, instances=16, lrs=LRS, factor=10, models=("lstm_dm",),
                set={**_MNIST14, "num_outer_steps": 160, "unroll.num_particles": 4,
                     "curriculum.period": 20}),
    "gpu": dict(meta_seeds=3, instances=64, lrs=LRS, factor=10, models=("lstm_dm", "rnnprop"),
                set={"task.dataset": "mnist", "num_outer_steps": 1000,
                     "curriculum.stages": (100, 200, 500, 1000), "unroll.trunc_length": 20}),
}


def chen_configs(b: dict, model: str) -> dict:
    """Naive and CL+IL configs of one model (``lstm_dm`` or ``rnnprop``): the same task, model,
    estimator, particles, truncation and outer-step budget; naive trains at the last stage's
    length with neither curriculum nor imitation."""
    cl_il = configured("chen2020_dm_cl_il", b["set"])
    cl_il.lopt = type(cl_il.lopt)(dict(name=model))
    naive = copy.deepcopy(cl_il)
    naive.curriculum.enabled = False
    naive.imitation.enabled = False
    naive.unroll.horizon.length = int(cl_il.curriculum.stages[-1])
    return {"naive": naive, "CL+IL": cl_il}


def run(b: dict, runs: str, out: str, progress: bool = True) -> Report:
    from lopt.training import evaluation

    n = b["instances"]
    rows, records, plots, outcome, cfgs = {}, {}, {}, [], {}
    task = train_len = long = None
    for model in b["models"]:
        configs = chen_configs(b, model)
        base = configs["CL+IL"]
        ensure_mnist(base)
        task = task_of(base)
        train_len = int(base.curriculum.stages[-1])
        long = b["factor"] * train_len
        for method, config in configs.items():
            name = f"{model} {method}"
            cfgs[name] = config.to_dict()
            records[name], rows[name] = [], []
            for seed in range(b["meta_seeds"]):
                c = copy.deepcopy(config)
                c.seed = seed
                print(f"[chen2020] meta-training {name}, seed {seed}", flush=True)
                records[name].append(meta_train(c, os.path.join(runs, model, method.replace("+", "_"),
                                                                f"seed{seed}"), progress))
                rows[name].append(lo_curves(records[name][-1]["export"], task,
                                            keys(EVAL_SEED_OFFSET, n), long))
            plots[name] = stacked(rows[name], "train_loss")
        outcome.append(f"{model}: " + verdict(metric_values(rows[f"{model} CL+IL"], "final_train_loss"),
                                              metric_values(rows[f"{model} naive"], "final_train_loss"),
                                              "CL+IL", "naive") + f" (final training loss after {long} steps).")
    print("[chen2020] tuning Adam", flush=True)
    adam = tuned_adam(task, long, b["lrs"], n, "final_train_loss")
    label = adam_label(adam)
    rows[label] = [adam["curves"]]
    plots[label] = adam["curves"]["train_loss"]
    metrics = [("final_train_loss", f"final train loss @ {long}", ".4f"),
               ("test_loss", "test loss", ".4f"), ("test_accuracy", "test accuracy", ".3f")]
    header = ["method", *(column for _, column, _ in metrics), *COST_COLUMNS]
    results = table(header, {name: {**metric_cells(runs, metrics), **cost_cells(records.get(name, []))}
                             for name, runs in rows.items()})
    for model in b["models"]:
        outcome.append(f"{model} CL+IL vs Adam: " + verdict(
            metric_values(rows[f"{model} CL+IL"], "final_train_loss"),
            metric_values([adam["curves"]], "final_train_loss")[0], "CL+IL", "tuned Adam"))
    fig = "chen2020.png"
    evaluation.plot_curves(plots, os.path.join(out, fig),
                           f"{task.name}: training loss, unseen optimizees ({long} steps)",
                           vlines={f"training length {train_len}": train_len}, log_x=True, smooth=0.1)
    curricula = []
    for name, recs in records.items():
        for r in recs:
            if r.get("curriculum"):
                stops = [d for d in r["curriculum"] if d.get("decision")]
                last = stops[-1] if stops else {}
                curricula.append(f"{name} seed {r['seed']}: {len(stops)} decisions, ended at stage "
                                 f"{last.get('curriculum_stage')} (length {last.get('train_length')}) "
                                 f"after {r['outer_steps']} outer steps, last decision "
                                 f"{last.get('decision')!r}")
    return Report(
        name="chen2020",
        title="Chen et al. 2020: L2O-DM with curriculum and imitation vs naive training",
        claim=("Chen et al. 2020 (Sec. 5.3, Table 2): training L2O-DM with the unroll-length "
               "curriculum (Algorithm 1) and off-policy imitation of Adam/SGD/Adagrad "
               "(Algorithm 2) gives lower final training loss than training it naively, on "
               "unseen MLP optimizees (mlp_orig on MNIST) run well past the training length."),
        setting=(f"configs/chen2020_dm_cl_il.py with {b['set']}; naive: the same config with the "
                 f"curriculum and imitation off and trajectories of the last stage's length "
                 f"({train_len}); task {task.name}; {b['meta_seeds']} meta-seeds per method, the "
                 f"same outer-step budget (the curriculum may stop earlier); evaluation on {n} "
                 f"unseen instances for {long} steps ({b['factor']}x the training length); Adam's "
                 f"rate tuned for final training loss at {long} steps on {n} separate instances."),
        outcome=outcome,
        tables=[(f"Unseen optimizees after {long} steps, mean ± std over {n} instances x "
                 "meta-seeds.", results)],
        figures=[("Training loss on unseen optimizees (mean ± 1 std, trailing 10% smoothing)", fig)],
        notes=curricula + ([] if "rnnprop" in b["models"] else [
            "RNNprop runs in the gpu budget only (the cpu budget's 30 minutes fit one model)."]),
        record=dict(configs=cfgs, runs=records, train_length=train_len, eval_length=long,
                    adam_best_lr=adam["best_lr"], adam_sweep=adam["sweep"],
                    results={k: [without_curves(r) for r in v] for k, v in rows.items()}),
    )
