"""``configs/naive.py`` on MNIST: the "LO (naive)" twin of ``configs/elo_mnist.py`` (the same
N-step segments, every one fresh, no behaviour cloning)."""

import importlib.util
import os

from ml_collections import ConfigDict


def _load(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ConfigDict:
    c = _load("elo_mnist").get_config()
    c.unroll.replay.enabled = False
    c.unroll.behaviour_cloning.enabled = False
    c.unroll.horizon.length = c.unroll.get_oneway_ref("trunc_length")  # H = N after overrides too
    c.unroll.stagger = False  # every trajectory exactly one N-step segment (configs/naive.py)
    return c
