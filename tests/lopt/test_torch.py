"""lopt.torch: the mlp and adafac_mlp exports as torch optimizers compute what JAX computes.

Skipped when PyTorch is not installed (``pip install 'lopt[torch]'``; ``make test`` installs it
where the CPU wheel is available).
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed (optional extra: pip install 'lopt[torch]')"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lopt  # noqa: E402
import lopt.torch as lt  # noqa: E402
from lopt import export  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tensors here are tiny: torch's intra-op thread pool only adds waits (tens of ms per
    matmul on a busy 2-core machine), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NUM_STEPS = 100
EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
# Allowance, in units of eps32 relative to the update, for the two frameworks' different
# summation orders (per-tensor means, matmuls over <= 40 inputs) and libm exp/tanh/rsqrt/sigmoid
# (a few ulp each): see test_matches_jax_for_100_steps.
K_ROUNDING = 64
# Bound on the growth of a perturbation over the trajectory: exp(N * step_mult * L) with a
# per-step sensitivity L <= 10 of the normalised update to the parameters, exp(1) < 3.
GROWTH = 3.0

CASES = {
    "mlp": dict(name="mlp", hidden_size=8, hidden_layers=1),
    "adafac_mlp": dict(name="adafac_mlp", hidden_size=8, hidden_layers=2),
    "adafac_mlp_learnable_decays": dict(
        name="adafac_mlp", hidden_size=8, hidden_layers=2, learnable_decays=True
    ),
}


def _data():
    """A fixed synthetic regression: 32 points in 6-D, targets from a random tanh teacher."""
    rng = np.random.RandomState(0)
    x = rng.randn(32, 6).astype(np.float32)
    y = (np.tanh(x @ rng.randn(6, 3)) @ rng.randn(3, 1)).astype(np.float32)
    return x, y


def _init_params():
    """A 6-8-1 tanh MLP, float32, weights in (in, out) layout in both frameworks."""
    rng = np.random.RandomState(1)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {
        "w1": f32(rng.randn(6, 8) / np.sqrt(6)),
        "b1": f32(0.1 * rng.randn(8)),
        "w2": f32(rng.randn(8, 1) / np.sqrt(8)),
        "b2": f32(np.zeros(1)),
    }


NAMES = ("w1", "b1", "w2", "b2")


def _jax_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jnp.square(h @ params["w2"] + params["b2"] - y))


def _torch_loss(params, x, y):
    h = torch.tanh(x @ params["w1"] + params["b1"])
    return torch.mean(torch.square(h @ params["w2"] + params["b2"] - y))


def _export(tmp_path, case: str) -> str:
    """An export of randomly initialised meta-params, perturbed so every leaf (biases and decay
    logits included) differs from its default."""
    options = dict(CASES[case])
    learned_opt = lopt.get(options.pop("name"), **options)
    meta_params = learned_opt.init(jax.random.PRNGKey(7))
    keys = iter(jax.random.split(jax.random.PRNGKey(8), len(jax.tree.leaves(meta_params))))
    meta_params = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), meta_params
    )
    return export.save(tmp_path / f"{case}.safetensors", learned_opt, meta_params)


def _jax_trajectory(path: str) -> np.ndarray:
    """Parameters after each of NUM_STEPS steps of lopt.export.load_optimizer(path), as an
    array [NUM_STEPS, num_params] (one scan, one compile)."""
    opt = export.load_optimizer(path)
    x, y = (jnp.asarray(a) for a in _data())

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(_jax_loss)(params, x, y)
        updates, state = opt.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        return (params, state), jnp.concatenate([params[k].ravel() for k in NAMES])

    @jax.jit
    def run(params):
        _, traj = jax.lax.scan(step, (params, opt.init(params)), None, length=NUM_STEPS)
        return traj

    with jax.default_matmul_precision("float32"):  # full float32 dots on any backend
        return np.asarray(run(jax.tree.map(jnp.asarray, _init_params())))


def _torch_params():
    return {k: torch.tensor(v, requires_grad=True) for k, v in _init_params().items()}


def _torch_steps(opt, params, num_steps: int) -> np.ndarray:
    x, y = (torch.from_numpy(a) for a in _data())
    traj = []
    for _ in range(num_steps):
        opt.zero_grad()
        _torch_loss(params, x, y).backward()
        opt.step()
        traj.append(np.concatenate([params[k].detach().numpy().ravel() for k in NAMES]))
    return np.stack(traj)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_jax_for_100_steps(tmp_path, case):
    """Train the same 6-8-1 MLP from the same init for 100 steps with the JAX optimizer
    (``lopt.export.load_optimizer``) and the torch one (``lopt.torch.load``, weights and biases
    in two param groups); every parameter agrees at every step within

        tol = GROWTH * N * (ulp(P) + K_ROUNDING * eps32 * U),

    N = 100 steps, P the largest |parameter| and U the largest per-step |update| on the JAX
    trajectory (U ~ step_mult = 1e-3), eps32 = 2^-23. Why: both compute the same float32
    operations, differing only in rounding. Per step, (a) the two updates differ by at most
    K_ROUNDING ulp of the update (reduction order in the per-tensor means and the small
    matmuls, a few ulp from each exp/tanh/rsqrt; 64 is generous: 1 to 2 ulp are observed), and
    (b) adding an update to a parameter rounds to float32, so a difference in the update can
    flip the last bit of the parameter: at most ulp(P) per step. Over N steps these add up,
    and a perturbation of the parameters changes later updates only through gradients and
    features normalised per tensor, by at most a factor GROWTH = 3 > exp(N * 1e-3 * 10) over
    the trajectory. With P < 1 and U ~ 2e-3 this gives tol ~ 2e-5, about 400 ulp of P,
    while the observed difference is one or two ulp. The parameters move by ~0.1 >= 100 * tol,
    so the comparison can fail: time features one step off move them ~1e-3 apart, an
    epsilon changed from 1e-6 to 1e-5 ~4e-2.
    """
    path = _export(tmp_path, case)
    ref = _jax_trajectory(path)
    params = _torch_params()
    groups = [
        {"params": [params["w1"], params["w2"]]},
        {"params": [params["b1"], params["b2"]]},
    ]
    opt = lt.load(path, groups)
    expected_cls = lt.MLPLOptTorch if CASES[case]["name"] == "mlp" else lt.AdafacMLPLOptTorch
    assert type(opt) is expected_cls
    got = _torch_steps(opt, params, NUM_STEPS)

    init = np.concatenate([_init_params()[k].ravel() for k in NAMES])
    prev = np.concatenate([init[None], ref[:-1]])
    big_p = float(np.max(np.abs(ref)))
    big_u = float(np.max(np.abs(ref - prev)))
    ulp_p = float(np.spacing(np.float32(big_p)))
    tol = GROWTH * NUM_STEPS * (ulp_p + K_ROUNDING * EPS32 * big_u)
    diff = float(np.max(np.abs(got - ref)))
    moved = float(np.max(np.abs(ref[-1] - init)))
    assert diff <= tol, f"{case}: torch and JAX differ by {diff:.3g} > tol {tol:.3g}"
    assert moved >= 100 * tol, f"{case}: moved only {moved:.3g} (tol {tol:.3g})"
    assert 1e-5 < tol < 1e-3  # the derivation's numbers, for the record


@pytest.mark.parametrize("case", ["mlp", "adafac_mlp"])
def test_state_dict_round_trip(tmp_path, case):
    """Save after 10 steps, load into a fresh optimizer from the same export, continue: the
    parameters equal the uninterrupted run's bit for bit. One parameter is float64, whose
    float32 accumulators torch's own load_state_dict would cast to float64."""
    path = _export(tmp_path, case)
    x, y = (torch.from_numpy(a) for a in _data())

    def make(params64=None):
        params = _torch_params()
        extra = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
        if params64 is not None:
            for k in params:
                params[k].data.copy_(params64[k])
            extra.data.copy_(params64["extra"])
        return params, extra

    def run(opt, params, extra, n):
        for _ in range(n):
            opt.zero_grad()
            loss = _torch_loss(params, x, y) + torch.sum(torch.sin(3 * extra)).float()
            loss.backward()
            opt.step()

    params, extra = make()
    full = lt.load(path, [*params.values(), extra])
    run(full, params, extra, 20)

    params_a, extra_a = make()
    opt_a = lt.load(path, [*params_a.values(), extra_a])
    run(opt_a, params_a, extra_a, 10)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    snapshot = {k: v.detach().clone() for k, v in params_a.items()}
    snapshot["extra"] = extra_a.detach().clone()

    params_b, extra_b = make(snapshot)
    opt_b = lt.load(path, [*params_b.values(), extra_b])
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf))
    state = opt_b.state[extra_b]
    assert int(state["step"]) == 10
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    run(opt_b, params_b, extra_b, 10)
    for k in params:
        assert torch.equal(params_b[k], params[k]), k
    assert torch.equal(extra_b, extra)
    assert not torch.equal(params["w1"], torch.from_numpy(_init_params()["w1"]))

    other = lt.load(_export(tmp_path, "mlp" if case != "mlp" else "adafac_mlp"),
                    [*params_b.values(), extra_b])
    with pytest.raises(ValueError, match="another optimizer's state_dict"):
        other.load_state_dict(opt_a.state_dict())


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    learned_opt = lopt.get("lstm_dm")
    meta_params = learned_opt.init(jax.random.PRNGKey(0))
    path = export.save(tmp_path / "lstm.safetensors", learned_opt, meta_params)
    with pytest.raises(lt.UnsupportedArchitectureError, match="'lstm_dm'.*load_optimizer"):
        lt.load(path, [torch.zeros(3, requires_grad=True)])
    mlp = lopt.get("mlp", hidden_size=4)
    with pytest.raises(TypeError, match="AdafacMLPLOpt"):
        lt.AdafacMLPLOptTorch(
            [torch.zeros(3, requires_grad=True)], mlp, mlp.init(jax.random.PRNGKey(0))
        )


def test_step_closure_lr_and_parameters_without_grad(tmp_path):
    path = _export(tmp_path, "adafac_mlp")
    w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(3, 4))
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = lt.load(path, [w, frozen])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the export's step_mult

    def closure():
        opt.zero_grad()
        loss = torch.sum(torch.cos(w))
        loss.backward()
        return loss

    w0 = w.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert float(loss.detach()) == pytest.approx(float(torch.sum(torch.cos(w0))))
    step1 = w.detach() - w0
    assert torch.count_nonzero(step1) == w.numel()
    assert torch.equal(frozen, torch.ones(2)) and len(opt.state[frozen]) == 0  # no grad: skipped
    # lr scales the step exactly as step_mult does: twice the lr, twice the first step.
    w2 = torch.nn.Parameter(w0.clone())
    opt2 = lt.load(path, [w2], lr=2e-3)
    opt2.zero_grad()
    torch.sum(torch.cos(w2)).backward()
    opt2.step()
    torch.testing.assert_close(w2.detach() - w0, 2 * step1, rtol=1e-5, atol=1e-7)


def test_torch_linear_layout(tmp_path):
    """A torch Linear weight (out, in) is factored over its own two axes; for the elementwise
    mlp optimizer, updating the (out, in) tensor equals updating the (in, out) one, transposed."""
    layer = torch.nn.Linear(6, 8)
    opt = lt.load(_export(tmp_path, "adafac_mlp"), layer.parameters())
    layer(torch.ones(2, 6)).sum().backward()
    opt.step()
    state = opt.state[layer.weight]
    assert state["row"].shape == (8, 1, 3) and state["col"].shape == (1, 6, 3)
    assert "v" in opt.state[layer.bias] and opt.state[layer.bias]["v"].shape == (8, 3)

    path = _export(tmp_path, "mlp")
    rng = np.random.RandomState(3)
    p, g = (rng.randn(8, 6).astype(np.float32) for _ in range(2))
    a, b = torch.nn.Parameter(torch.tensor(p)), torch.nn.Parameter(torch.tensor(p.T.copy()))
    opt_a, opt_b = lt.load(path, [a]), lt.load(path, [b])
    a.grad, b.grad = torch.tensor(g), torch.tensor(g.T.copy())
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a.detach().T, b.detach(), rtol=0, atol=1e-6)
    assert float(torch.max(torch.abs(a.detach() - torch.tensor(p)))) > 1e-4
