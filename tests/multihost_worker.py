"""One process of a two-process run on loopback (see tests/test_multihost.py); prints JSON."""

from __future__ import annotations

import hashlib
import json
import sys

import jax
import numpy as np

from lopt.training import distributed, loop
from tests.test_outer import tiny_config

if __name__ == "__main__":
    port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    config = tiny_config(num_outer_steps=3, checkpoint_every=2)
    summary = loop.train(config, workdir, progress=False)
    params = distributed.to_host(summary["state"].meta_params)
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
    print("RESULT " + json.dumps({
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "sha": hashlib.sha256(flat.tobytes()).hexdigest(),
        "export": summary["export"],
    }), flush=True)
    jax.distributed.shutdown()
