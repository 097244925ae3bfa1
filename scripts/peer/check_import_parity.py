"""Measure lopt-import's parity with learned_optimization on trajectories its own code wrote.

    /work/peer/venv/bin/python scripts/peer/make_import_fixture.py --out=/tmp/draw --seed=1
    python scripts/peer/check_import_parity.py --data=/tmp/draw        # this project's venv

For each architecture (``mlp``: MLPLOpt, ``adafac_mlp``: AdafacMLPLOpt) with files in
``--data`` (``peer_<arch>_params.msgpack`` and ``peer_<arch>.npz``, as
scripts/peer/make_import_fixture.py writes them): import the meta-params
(:func:`lopt.importer.import_file`), feed the peer's 100 (parameters, gradients) to the export's
optax transformation (``lopt.export.load_optimizer``, jitted) and to ``lopt.torch.load``'s
optimizer (float64 parameters, so that ``p - p'`` is its float32 step exactly), and print the
largest relative difference from the peer's steps: max over leaves and steps of
``max |ours - peer| / max |peer|`` (per leaf and step), and the largest elementwise
``|ours - peer| / |peer|`` over entries with ``|peer| >= 1e-3 max |peer|``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

ARCHS = ("mlp", "adafac_mlp")


def load(data: str, arch: str) -> tuple[dict, list[str]]:
    with np.load(os.path.join(data, f"peer_{arch}.npz")) as f:
        fix = {k: f[k] for k in f.files}
    return fix, sorted({k.split("/", 1)[1] for k in fix})


def differences(fix: dict, names: list[str], ours: dict) -> tuple[float, float]:
    """(max of max|d| / max|peer| per leaf and step, max elementwise |d| / |peer| over entries
    at least 1e-3 of their step's largest)."""
    whole = elementwise = 0.0
    for k in names:
        peer = fix[f"step/{k}"].reshape(len(fix[f"step/{k}"]), -1).astype(np.float64)
        mine = np.asarray(ours[k], np.float64).reshape(peer.shape)
        diff = np.abs(mine - peer)
        scale = np.max(np.abs(peer), axis=1, keepdims=True)
        whole = max(whole, float(np.max(np.max(diff, axis=1, keepdims=True) / scale)))
        big = np.abs(peer) >= 1e-3 * scale
        elementwise = max(elementwise, float(np.max(diff[big] / np.abs(peer[big]))))
    return whole, elementwise


def jax_steps(opt, fix: dict, names: list[str]) -> dict:
    """The steps the optax transformation ``opt`` takes on the fixture's (p, g), in one jitted
    scan."""
    import jax
    import jax.numpy as jnp

    ps = {k: jnp.asarray(fix[f"p/{k}"]) for k in names}
    gs = {k: jnp.asarray(fix[f"g/{k}"]) for k in names}

    @jax.jit
    def run(ps, gs):
        def body(state, pg):
            updates, state = opt.update(pg[1], state, pg[0])
            return state, jax.tree.map(jnp.negative, updates)

        return jax.lax.scan(body, opt.init(jax.tree.map(lambda x: x[0], ps)), (ps, gs))[1]

    return jax.tree.map(np.asarray, run(ps, gs))


def torch_steps(path: str, fix: dict, names: list[str]) -> dict:
    import torch

    import lopt.torch as lopt_torch

    tensors = [torch.tensor(fix[f"p/{k}"][0], dtype=torch.float64) for k in names]
    opt = lopt_torch.load(path, tensors)
    steps: dict[str, list] = {k: [] for k in names}
    for i in range(len(fix[f"p/{names[0]}"])):
        with torch.no_grad():
            for k, t in zip(names, tensors):
                t.copy_(torch.from_numpy(np.asarray(fix[f"p/{k}"][i], np.float64)))
                t.grad = torch.from_numpy(np.asarray(fix[f"g/{k}"][i], np.float64))
        before = [t.detach().clone() for t in tensors]
        opt.step()
        for k, t, b in zip(names, tensors, before):
            steps[k].append((b - t.detach()).numpy())
    return {k: np.stack(v) for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="tests/lopt/data",
                        help="the directory make_import_fixture.py wrote")
    args = parser.parse_args()
    from lopt import export, importer

    print("| architecture | framework | max abs(d) / max abs(peer) | elementwise abs(d) / abs(peer) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            params = os.path.join(args.data, f"peer_{arch}_params.msgpack")
            if not os.path.exists(params):
                continue
            path = importer.import_file(arch, params, os.path.join(tmp, f"{arch}.safetensors"))
            fix, names = load(args.data, arch)
            runs = [("jax", lambda path, fix, names: jax_steps(
                export.load_optimizer(path), fix, names))]
            try:
                import torch  # noqa: F401
                runs.append(("torch", torch_steps))
            except ImportError:
                print(f"| {arch} | torch | not installed | |")
            for framework, fn in runs:
                whole, elementwise = differences(fix, names, fn(path, fix, names))
                print(f"| {arch} | {framework} | {whole:.2e} | {elementwise:.2e} |")


if __name__ == "__main__":
    main()
