"""The command-line programs, installed as console commands: ``lopt-train`` (meta-train from a
config), ``lopt-eval`` (an export against tuned Adam), ``lopt-export`` (a checkpoint to an export
file), ``lopt-ablate`` (ELO Table 1's ablation) and ``lopt-reproduce`` (the papers' claims). The
last two parse flags around ``lopt.experiments``. ``scripts/*.py`` run the same from a checkout.
They sit above the training layer and the experiments; nothing imports them."""
