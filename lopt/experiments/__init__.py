"""Reproductions of the papers' claims and the ablations: one harness (:mod:`.harness`: train
a config or reuse its finished run, tuned Adam on separate instances, paired verdicts, tables,
reports) and one module per claim, each with its own budgets. It sits on the training layer;
only the command-line programs import it."""
