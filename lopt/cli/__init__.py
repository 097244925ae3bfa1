"""The command-line programs, installed as console commands: ``lopt-train`` (meta-train from a
config), ``lopt-eval`` (an export against tuned Adam), ``lopt-export`` (a checkpoint to an export
file) and ``lopt-ablate`` (ELO Table 1's ablation). ``scripts/*.py`` run the same from a checkout.
They sit above the training layer; nothing imports them."""
