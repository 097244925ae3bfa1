#!/bin/bash
# The benchmark peer of issue 16: google/learned_optimization in its own venv under PEER_DIR
# (default ./peer), at the commit measured (32186aa). Its setup.py pins do not install on
# Python 3.11, so the pieces are installed by hand; TensorFlow is only imported by its modules.
#   bash scripts/peer/setup_venv.sh
#   bash scripts/peer/side_by_side.sh          # W1, ours and the peer alternated
set -e
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PEER_DIR=${PEER_DIR:-$REPO/peer}
# the same jax as ours (.venv), so the comparison is of the code, not of XLA versions
JAX_VERSION=$("$REPO/.venv/bin/python" -c 'import jax; print(jax.__version__)')
mkdir -p "$PEER_DIR" && cd "$PEER_DIR"
if [ ! -d learned_optimization ]; then
  git clone -q https://github.com/google/learned_optimization learned_optimization
  git -C learned_optimization checkout -q 32186aa46a96f26ba0625755f93c55659adcd523
fi
python3 -m venv venv
venv/bin/pip install -q --upgrade pip
venv/bin/pip install -q "jax==$JAX_VERSION" \
  dm-haiku optax flax chex gin-config numpy absl-py tqdm scikit-learn
venv/bin/pip install -q tensorflow-cpu tensorflow-datasets
venv/bin/pip install -q --no-deps -e learned_optimization
