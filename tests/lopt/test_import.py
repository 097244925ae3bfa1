"""lopt-import (lopt/importer.py): learned_optimization's MLPLOpt and AdafacMLPLOpt, imported,
compute that library's own updates, in JAX (lopt.export.load_optimizer) and in torch (lopt.torch).

The fixtures in tests/lopt/data were written with learned_optimization itself
(scripts/peer/make_import_fixture.py): its meta-params as its ``checkpoints.save_state`` writes
them (``peer_<arch>_params.msgpack``), and ``peer_<arch>.npz`` with the parameters ``p/<leaf>``
and gradients ``g/<leaf>`` it was fed for 100 steps and the steps ``step/<leaf>`` its update
subtracted. Each step here is fed the same ``p`` and ``g``, so errors do not compound through the
trajectory; the accumulators do carry them.

The difference is measured per leaf and step as max |ours - peer| / max |peer| (a relative error
of the step as a whole: an entry of a step can be near zero) and must stay under ``TOL``. Measured
with scripts/peer/check_import_parity.py on CPU: 0.8e-6 (mlp) and 1.6e-6 (adafac_mlp) in JAX,
1.2e-6 and 1.3e-6 in torch on this fixture; at most 2.3e-6 on two more draws. Reverting an
option the importer sets moves it by more than 100 TOL (:func:`test_each_option_is_needed`);
``factored_grad_eps`` (the peer's 1e-30 in g^2) is the exception: in float32 it cannot change an
update (it is 1e-22 of the smallest epsilon it meets), so no test can tell it apart.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from lopt import export, importer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = ("mlp", "adafac_mlp")
TOL = 1e-5


def _params_file(arch: str) -> str:
    return os.path.join(DATA, f"peer_{arch}_params.msgpack")


@functools.lru_cache(maxsize=None)
def _fixture(arch: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(DATA, f"peer_{arch}.npz")) as f:
        return {k: f[k] for k in f.files}


def _leaves(arch: str) -> list[str]:
    return sorted({k.split("/", 1)[1] for k in _fixture(arch)})


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("imported")
    return {a: importer.import_file(a, _params_file(a), out / f"{a}.safetensors") for a in ARCHS}


def relative_error(ours: dict, arch: str) -> float:
    """max over leaves and steps of max |ours - peer| / max |peer|; ``ours[leaf]`` is [100, ...]
    steps subtracted from the parameters (the peer's sign)."""
    fix = _fixture(arch)
    worst = 0.0
    for k in _leaves(arch):
        peer = fix[f"step/{k}"].reshape(len(fix[f"step/{k}"]), -1).astype(np.float64)
        mine = np.asarray(ours[k], np.float64).reshape(peer.shape)
        scale = np.max(np.abs(peer), axis=1)
        assert np.all(scale > 0), k
        worst = max(worst, float(np.max(np.max(np.abs(mine - peer), axis=1) / scale)))
    return worst


@functools.lru_cache(maxsize=None)
def _parity_script():
    """scripts/peer/check_import_parity.py, whose replays give the figures in
    docs/optimizers.md: the test checks with the same procedure."""
    spec = importlib.util.spec_from_file_location(
        "check_import_parity", os.path.join(REPO, "scripts", "peer", "check_import_parity.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def jax_steps(opt, arch: str) -> dict[str, np.ndarray]:
    """The steps the optax transformation ``opt`` takes on the fixture's 100 (p, g)."""
    return _parity_script().jax_steps(opt, _fixture(arch), _leaves(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_jax_matches_learned_optimization(exports, arch):
    err = relative_error(jax_steps(export.load_optimizer(exports[arch]), arch), arch)
    assert err <= TOL, f"{arch}: imported optimizer differs from the peer's by {err:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_matches_learned_optimization(exports, arch):
    """The replay of scripts/peer/check_import_parity.py (the figures in docs/optimizers.md):
    float64 parameters, so the float32 update is added without rounding and p - p' is the step."""
    pytest.importorskip("torch")
    steps = _parity_script().torch_steps(exports[arch], _fixture(arch), _leaves(arch))
    err = relative_error(steps, arch)
    assert err <= TOL, f"{arch}: lopt.torch differs from the peer's by {err:.3g}"


def _reverted(arch: str, what: str, learned_opt, meta_params):
    """The imported optimizer with one thing the importer sets put back to this project's
    default (or, for the feature order, not permuted)."""
    if what == "feature_order":
        order = importer.adafac_feature_order(3, 1, 3)
        w = np.asarray(meta_params["mlp"][0]["w"])
        unpermuted = np.empty_like(w)
        unpermuted[order] = w
        mlp = [{"w": unpermuted, "b": meta_params["mlp"][0]["b"]}, *meta_params["mlp"][1:]]
        return learned_opt, {**meta_params, "mlp": mlp}
    if what == "decay_param":  # the offsets ignored: the initial decays, fixed
        meta = {k: v for k, v in meta_params.items() if k != "decay_offsets"}
        return dataclasses.replace(learned_opt, learnable_decays=False,
                                   decay_param="sigmoid"), meta
    default = {f.name: f.default for f in dataclasses.fields(learned_opt)}[what]
    return dataclasses.replace(learned_opt, **{what: default}), meta_params


@pytest.mark.parametrize("arch,what", [
    ("mlp", "norm_eps"),
    ("adafac_mlp", "norm_eps"),
    ("adafac_mlp", "factored_order"),
    ("adafac_mlp", "preconditioner"),
    ("adafac_mlp", "decay_param"),
    ("adafac_mlp", "feature_order"),
])
def test_each_option_is_needed(exports, arch, what):
    """The fixture tells every option the importer sets from its default: reverting one moves
    the updates far past TOL, so the parity tests above fail without it."""
    learned_opt, meta_params = _reverted(arch, what, *export.load(exports[arch]))
    err = relative_error(jax_steps(learned_opt.optimizer(meta_params), arch), arch)
    assert err > 100 * TOL, f"{arch} without {what}: still within {err:.3g} of the peer"


def test_unmappable_leaf_is_one_line_exit_2(tmp_path):
    import flax.serialization

    theta, _ = importer.read_params(_params_file("mlp"))
    theta["mlp/~/linear_0"]["extra"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(flax.serialization.msgpack_serialize(theta))
    with pytest.raises(importer.ImportFailed, match=r"cannot map leaf 'mlp/~/linear_0/extra'"):
        importer.import_file("mlp", bad, tmp_path / "x.safetensors")
    # The other architecture's meta-params: its first missing leaf is named.
    with pytest.raises(importer.ImportFailed, match=r"missing leaf 'momentum_decays'"):
        importer.convert("adafac_mlp", theta)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "import_optimizer.py"),
         "--from=learned_optimization", "--arch=mlp", f"--params={bad}",
         f"--out={tmp_path / 'x.safetensors'}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mlp/~/linear_0/extra" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "x.safetensors").exists()


def test_export_records_its_source(exports):
    meta = export.read_metadata(exports["adafac_mlp"])
    assert meta["architecture"]["name"] == "adafac_mlp"
    assert meta["metadata"]["imported_from"] == "learned_optimization"
    assert meta["metadata"]["gen_id"] == "fixture" and meta["metadata"]["step"] == 0
