"""VeLO (lopt/velo.py): the published configuration's size, and parity with Google's code.

The fixture (tests/lopt/data/velo_small: the peer's checkpoint format, ``params`` +
``config.gin``, and ``trajectory.npz``) was recorded by ``scripts/peer/make_velo_fixture.py``
with learned_optimization's ``HyperV2(lstm_hidden_size=32, param_inits=8,
use_bugged_loss_features=False)`` and perturbed meta-params; no peer is needed here. Set
``LOPT_VELO_FULL_FIXTURE=DIR`` to also check a fixture of the published sizes (512, 256).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import lopt
from lopt import export, velo
from tests import FAST_COMPILE

FIXTURE = pathlib.Path(__file__).parent / "data" / "velo_small"
ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMES = ("a_tall", "b_wide", "c_conv", "d_bias")


def load_fixture(path: pathlib.Path, **options):
    raw = serialization.msgpack_restore((path / "params").read_bytes())
    h = raw["params"]["lstm_init_state"]["hidden"].shape[-1]
    k = raw["params"]["ff_mod_stack"]["~"]["b0"].shape[0]
    lo = lopt.get("velo", lstm_hidden_size=h, param_inits=k, **options)
    return lo, velo.from_google(lo, raw["params"]), dict(np.load(path / "trajectory.npz"))


def replay(lo, mp, rec, steps=None):
    """Our trajectory fed the peer's recorded gradients and losses (the first ``steps``, default
    all): [steps + 1] per tensor."""
    params = {n: jnp.asarray(rec[f"params_{n}"][0]) for n in NAMES}
    opt = lo.optimizer(mp, num_steps=int(rec["num_steps"]))
    state = opt.init(params)
    update = jax.jit(opt.update)
    out = {n: [np.asarray(params[n])] for n in NAMES}
    for t in range(steps or len(rec["losses"])):
        g = {n: jnp.asarray(rec[f"grads_{n}"][t]) for n in NAMES}
        u, state = update(g, state, params, value=jnp.asarray(rec["losses"][t]))
        params = optax.apply_updates(params, u)
        for n in NAMES:
            out[n].append(np.asarray(params[n]))
    return {n: np.stack(v) for n, v in out.items()}, state


def relative_errors(ours, rec):
    """Per tensor: max |ours - peer| over the trajectory / max |peer_t - peer_0| (how far it
    moved), over the steps ``ours`` has."""
    errs = {}
    for n in NAMES:
        peer = rec[f"params_{n}"][: len(ours[n])]
        moved = np.max(np.abs(peer - peer[0]))
        errs[n] = float(np.max(np.abs(ours[n] - peer)) / moved)
    return errs


def test_published_configuration_has_googles_size():
    mp = jax.eval_shape(lopt.get("velo").init, jax.random.PRNGKey(0))
    assert velo.num_meta_params(mp) == (33, 2_320_385)
    # The var_rms fix drops 2 LSTM inputs (28): a different architecture.
    mp = jax.eval_shape(lopt.get("velo", var_rms_of_momentum_mean=False).init, jax.random.PRNGKey(0))
    assert mp["mix"]["input"]["w"].shape == (28, 512)


def parity_errors(path: pathlib.Path) -> dict:
    """relative_errors of the fixture at ``path``, computed in a subprocess compiled as users'
    programs are (the suite's conftest sets tests.FAST_COMPILE, whose -O0 changes float
    rounding: there the small fixture's figure is 6e-6 rather than 3e-7)."""
    flags = os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE, "")
    env = dict(os.environ, XLA_FLAGS=flags.strip(), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parity_with_googles_hyperv2():
    errs = parity_errors(FIXTURE)
    print("velo small fixture (optax), max |ours - peer| / max movement:", errs)
    assert max(errs.values()) < 1e-5, errs
    lo, mp, rec = load_fixture(FIXTURE)
    # The trajectory moved, through the spikes: a no-op optimizer would be far off.
    assert all(np.max(np.abs(rec[f"params_{n}"][-1] - rec[f"params_{n}"][0])) > 1e-2 for n in NAMES)
    # In this process (-O0 rounding) it stays close too, and the state is what it should be.
    ours, state = replay(lo, mp, rec, steps=12)
    assert max(relative_errors(ours, rec).values()) < 1e-4
    assert int(state.iteration) == 12 and state.lstm_hidden.shape == (4, 32)


@pytest.mark.skipif(not os.environ.get("LOPT_VELO_FULL_FIXTURE"), reason="LOPT_VELO_FULL_FIXTURE unset")
def test_parity_published_sizes():
    errs = parity_errors(pathlib.Path(os.environ["LOPT_VELO_FULL_FIXTURE"]))
    print("velo published sizes (optax), max |ours - peer| / max movement:", errs)
    assert max(errs.values()) < 1e-5, errs


def test_each_quirk_changes_the_trajectory():
    """The options are live: switching a quirk off (with the arrays it still fits) moves the
    trajectory away from Google's, so the default is what the parity test pins."""
    lo, mp, rec = load_fixture(FIXTURE)
    lo_paper = lopt.get("velo", lstm_hidden_size=32, param_inits=8, paper_mixing=True)
    mp_paper = jax.tree.map(lambda x: x, mp)
    mp_paper["mix"]["second"]["w"] = jnp.zeros((32, 32)).at[:30].set(mp["mix"]["second"]["w"])
    errs = relative_errors(replay(lo_paper, mp_paper, rec, steps=12)[0], rec)
    assert max(errs.values()) > 1e-3, errs
    lo_var = lopt.get("velo", lstm_hidden_size=32, param_inits=8, var_rms_of_momentum_mean=False)
    mp_var = jax.tree.map(lambda x: x, mp)
    for layer in ("first", "second", "input"):  # the 30 inputs end with var_rms's 3; keep 1
        mp_var["mix"][layer]["w"] = mp["mix"][layer]["w"][:28]
    errs = relative_errors(replay(lo_var, mp_var, rec, steps=12)[0], rec)
    assert max(errs.values()) > 1e-3, errs


def test_missing_loss_or_horizon_is_one_error():
    lo = lopt.get("velo", lstm_hidden_size=8, param_inits=4)
    mp = lo.init(jax.random.PRNGKey(0))
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"num_steps=N") as e:
        lo.optimizer(mp).init(params)
    assert "\n" not in str(e.value)
    opt = lo.optimizer(mp, num_steps=10)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"value=loss") as e:
        opt.update(params, state, params)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="lstm_hidden_size must be a positive int"):
        lopt.get("velo", lstm_hidden_size=0)


def test_google_key_mapping_is_by_number():
    assert velo.google_key("mlp_bank/w0/10") == "ff_mod_stack/~/w0__10"
    assert velo.google_key("mix/first/w") == "rnn_params/linear/w"
    lo = lopt.get("velo", lstm_hidden_size=32, param_inits=8)
    raw = serialization.msgpack_restore((FIXTURE / "params").read_bytes())["params"]
    del raw["rnn_params"]["step_size"]
    with pytest.raises(ValueError, match="missing"):
        velo.from_google(lo, raw)


if __name__ == "__main__":  # parity_errors' subprocess
    lo_, mp_, rec_ = load_fixture(pathlib.Path(sys.argv[1]))
    print(json.dumps(relative_errors(replay(lo_, mp_, rec_)[0], rec_)))


def small_velo():
    lo = lopt.get("velo", lstm_hidden_size=8, param_inits=4)
    return lo, lo.init(jax.random.PRNGKey(3))


def test_export_round_trip_and_load_optimizer(tmp_path):
    from lopt import export

    lo, mp = small_velo()
    path = tmp_path / "velo.safetensors"
    export.save(path, lo, mp)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3), "b": jnp.ones((3,))}
    grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
    opt = export.load_optimizer(path, num_steps=100)
    u, _ = jax.jit(opt.update)(grads, opt.init(params), params, value=2.0)
    ref = lo.optimizer(mp, num_steps=100)
    u_ref, _ = jax.jit(ref.update)(grads, ref.init(params), params, value=2.0)
    assert all(np.array_equal(u[k], u_ref[k]) for k in u) and np.abs(u["w"]).max() > 0
    with pytest.raises(ValueError, match=r"load_optimizer\(path, num_steps=N\)"):
        export.load_optimizer(path).init(params)


def test_prefab_weight_decay_and_horizon_cap():
    """weight_decay is grads + wd p and loss + wd sum p^2 fed to VeLO; max_training_steps
    averages k = ceil(N / max) steps into one VeLO update on a horizon of N // k."""
    lo, mp = small_velo()
    params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3)}
    g1, g2 = {"w": jnp.full((4, 3), 0.2)}, {"w": jnp.linspace(0, 1, 12).reshape(4, 3)}
    wd = lo.optimizer(mp, num_steps=50, weight_decay=0.01)
    plain = lo.optimizer(mp, num_steps=50)
    u, _ = jax.jit(wd.update)(g1, wd.init(params), params, value=1.0)
    loss = 1.0 + 0.01 * float(jnp.sum(params["w"] ** 2))
    u_ref, _ = jax.jit(plain.update)({"w": g1["w"] + 0.01 * params["w"]}, plain.init(params), params, value=loss)
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6)
    capped = lo.optimizer(mp, num_steps=300, max_training_steps=150)  # k = 2, horizon 150
    s = capped.init(params)
    assert float(s.inner.num_steps) == 150.0
    step = jax.jit(capped.update)
    u1, s = step(g1, s, params, value=1.0)
    u2, s = step(g2, s, params, value=3.0)
    inner = lo.optimizer(mp, num_steps=150)
    u_ref, _ = jax.jit(inner.update)({"w": (g1["w"] + g2["w"]) / 2}, inner.init(params), params, value=2.0)
    assert float(jnp.abs(u1["w"]).max()) == 0.0
    np.testing.assert_allclose(u2["w"], u_ref["w"], rtol=1e-6)
    assert float(jnp.abs(u2["w"]).max()) > 0


def test_unroller_gives_velo_each_trajectorys_horizon():
    import estimators.schedules as schedules
    import tasks
    from estimators.unroll import Unroller

    lo, mp = small_velo()
    un = Unroller(tasks.get("quadratic"), lo, num_particles=1, trunc_length=4,
                  horizon=schedules.get("log_uniform", low=30, high=60))
    ps = un.fresh_particle(mp, jax.random.PRNGKey(0), jnp.zeros([], jnp.int32))
    assert 30 <= int(ps.length) <= 60
    assert float(ps.opt_state.num_steps) == float(ps.length)


def torch_replay(lo, mp, rec, steps=None):
    torch = pytest.importorskip("torch")
    from lopt.torch.velo import VeloTorch

    params = [torch.nn.Parameter(torch.tensor(rec[f"params_{n}"][0])) for n in NAMES]
    opt = VeloTorch(params, lo, jax.tree.map(np.asarray, mp), int(rec["num_steps"]))
    out = {n: [rec[f"params_{n}"][0]] for n in NAMES}
    for t in range(steps or len(rec["losses"])):
        for n, p in zip(NAMES, params):
            p.grad = torch.tensor(rec[f"grads_{n}"][t])
        opt.step(loss=float(rec["losses"][t]))
        for n, p in zip(NAMES, params):
            out[n].append(p.detach().numpy().copy())
    return {n: np.stack(v) for n, v in out.items()}, opt, params


def test_torch_parity_with_googles_hyperv2():
    lo, mp, rec = load_fixture(FIXTURE)
    ours, _, _ = torch_replay(lo, mp, rec)
    errs = relative_errors(ours, rec)
    print("velo small fixture (torch), max |ours - peer| / max movement:", errs)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.skipif(not os.environ.get("LOPT_VELO_FULL_FIXTURE"), reason="LOPT_VELO_FULL_FIXTURE unset")
def test_torch_parity_published_sizes():
    lo, mp, rec = load_fixture(pathlib.Path(os.environ["LOPT_VELO_FULL_FIXTURE"]))
    errs = relative_errors(torch_replay(lo, mp, rec)[0], rec)
    print("velo published sizes (torch), max |ours - peer| / max movement:", errs)
    assert max(errs.values()) < 1e-4, errs


def test_torch_closure_state_dict_and_errors(tmp_path):
    torch = pytest.importorskip("torch")
    import lopt.torch as lt
    from lopt import export

    lo, mp = small_velo()
    path = tmp_path / "velo.safetensors"
    export.save(path, lo, mp)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt = lt.load(path, model.parameters(), num_steps=20)
    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not torch.equal(before, model.weight)
    sd = opt.state_dict()
    assert {"lstm_hidden", "lstm_cell", "loss_means", "loss_min", "iteration"} <= set(sd["state"]["velo"])
    # Resuming from the state_dict continues exactly.
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt2 = lt.load(path, twin.parameters(), num_steps=20)
    opt2.load_state_dict(sd)
    opt.step(closure)
    loss2 = torch.nn.functional.mse_loss(twin(x), y)
    twin.zero_grad()
    loss2.backward()
    opt2.step(loss=loss2)
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    with pytest.raises(ValueError, match=r"opt.step\(loss=loss\)") as e:
        opt.step()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="num_steps=N"):
        lt.load(path, model.parameters())


def test_lopt_import_velo_reads_config_gin(tmp_path):
    """lopt-import --arch=velo: the fixture's checkpoint and config.gin become an export that
    computes the parity fixture's trajectory; a configuration velo lacks is refused in one line."""
    import shutil

    from lopt import export, importer

    out = importer.import_file("velo", FIXTURE / "params", tmp_path / "v.safetensors")
    lo, mp = export.load(out)
    assert (lo.lstm_hidden_size, lo.param_inits) == (32, 8)
    meta = export.read_metadata(out)["metadata"]
    assert meta["peer_config"]["use_bugged_loss_features"] is False
    _, mp_ref, rec = load_fixture(FIXTURE)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mp), jax.tree.leaves(mp_ref)))
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(FIXTURE / "params", bad / "params")
    (bad / "config.gin").write_text((FIXTURE / "config.gin").read_text().replace(
        "use_bugged_loss_features = False", "use_bugged_loss_features = True"))
    with pytest.raises(importer.ImportFailed, match="use_bugged_loss_features = True") as e:
        importer.import_file("velo", bad / "params", tmp_path / "w.safetensors")
    assert "\n" not in str(e.value)
    (bad / "config.gin").write_text("run_train.lopt = @MLPLOpt()\n")
    with pytest.raises(importer.ImportFailed, match="not HyperV2"):
        importer.import_file("velo", bad / "params", tmp_path / "w.safetensors")


@pytest.mark.slow  # 3 s: validation and contract traces of a whole MetaTrainer
def test_velo_small_config_builds_its_trainer():
    """configs/velo_small.py: the quickstart with a small VeLO (meta-trained from the command
    line with lopt-train --config=velo_small; a whole run is too slow for this suite)."""
    import importlib.util

    from lopt.training import config as config_lib

    spec = importlib.util.spec_from_file_location("velo_small", ROOT / "configs" / "velo_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    options = {k: v for k, v in c.lopt.items() if k != "name"}
    lo = lopt.get(c.lopt.name, **options)
    assert velo.num_meta_params(jax.eval_shape(lo.init, jax.random.PRNGKey(0))) == (33, 12_929)
    trainer = config_lib.build(c)  # validates, runs the contract checks (eval_shape)
    assert trainer.unroller.learned_opt == lo


def test_torch_matches_jax_across_slabs(monkeypatch):
    """Tensors larger than lopt.torch.velo.SLAB (features built a slab at a time; 256 here),
    factored over axis 0 or 1, and a long bias: torch's two steps follow JAX's."""
    torch = pytest.importorskip("torch")
    import lopt.torch.velo as torch_velo
    from lopt.torch.velo import VeloTorch

    monkeypatch.setattr(torch_velo, "SLAB", 256)
    lo, mp = small_velo()
    rng = np.random.default_rng(0)
    shapes = {"a": (70, 10), "b": (10, 70), "c": (600,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]
    opt = lo.optimizer(mp, num_steps=40)
    state, p = opt.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    update = jax.jit(opt.update)
    tp = [torch.nn.Parameter(torch.tensor(params[k])) for k in sorted(shapes)]
    topt = VeloTorch(tp, lo, jax.tree.map(np.asarray, mp), 40)
    for t, g in enumerate(grads):
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p, value=1.0 + t)
        p = optax.apply_updates(p, u)
        for k, q in zip(sorted(shapes), tp):
            q.grad = torch.tensor(g[k])
        topt.step(loss=1.0 + t)
    for k, q in zip(sorted(shapes), tp):
        moved = np.max(np.abs(np.asarray(p[k]) - params[k]))
        assert moved > 0
        err = np.max(np.abs(q.detach().numpy() - np.asarray(p[k])))
        assert err < 1e-3 * moved, (k, err, moved)  # 1 ulp of p is 2e-4 of this movement


@pytest.mark.slow  # ~30 s: a meta-training run through the command, as a user starts one
def test_velo_small_meta_trains_from_the_command_line(tmp_path):
    """``scripts/meta_train.py --config=velo_small`` (issue 32's done-when) at a tiny budget:
    every row's meta-loss is finite and the export loads into optax with a horizon."""
    import math

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "meta_train.py"), "--config=velo_small",
         f"--workdir={tmp_path / 'run'}", "--noprogress", "--config.num_outer_steps=3",
         "--config.log_every=1", "--config.unroll.num_particles=2",
         "--config.unroll.trunc_length=4", "--config.unroll.horizon.length=8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["meta_loss"] for r in rows if "meta_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    opt = export.load_optimizer(tmp_path / "run" / "export" / "optimizer.safetensors", num_steps=8)
    params = {"w": jnp.ones((3, 2))}
    updates, _ = opt.update(params, opt.init(params), params, value=jnp.float32(1.0))
    assert np.all(np.isfinite(updates["w"])) and float(jnp.abs(updates["w"]).max()) > 0
