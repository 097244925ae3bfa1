#!/bin/bash
# The peer of issues 16 and 25: google/learned_optimization in its own venv under PEER_DIR
# (default ./peer), at the commit measured (32186aa). Its setup.py pins do not install on
# Python 3.11, so the pieces are installed by hand; TensorFlow is needed because its summary
# and filesystem modules import it.
#   PEER_SRC=/path/to/a/clone bash scripts/peer/setup_venv.sh   # from a local clone or mirror
#   bash scripts/peer/setup_venv.sh                             # else: git clone from GitHub
#   bash scripts/peer/side_by_side.sh          # W1, ours and the peer alternated
# PEER_SRC may be a work tree or a bare git directory; it is cloned into PEER_DIR and checked
# out at PEER_COMMIT (default 32186aa). Files git cannot read there (large data files a mirror
# leaves out) are skipped with a sparse checkout: the peer's Python modules do not read them.
# A PEER_DIR/venv that already imports the peer is reused.
set -e
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PEER_DIR=${PEER_DIR:-$REPO/peer}
PEER_COMMIT=${PEER_COMMIT:-32186aa46a96f26ba0625755f93c55659adcd523}
# the same jax as ours (.venv), so the comparison is of the code, not of XLA versions
JAX_VERSION=$("$REPO/.venv/bin/python" -c 'import jax; print(jax.__version__)')
mkdir -p "$PEER_DIR" && cd "$PEER_DIR"
if [ ! -d learned_optimization ]; then
  git clone -q --no-checkout "${PEER_SRC:-https://github.com/google/learned_optimization}" \
    learned_optimization
  cd learned_optimization
  missing=$(git ls-tree -r "$PEER_COMMIT" | while read -r _ type sha path; do
    [ "$type" = blob ] && ! git cat-file -e "$sha" 2>/dev/null && echo "!/$path"; done || true)
  if [ -n "$missing" ]; then
    echo "skipping files absent from the source: $missing" | tr '\n' ' '; echo
    git sparse-checkout init --no-cone
    printf '/*\n%s\n' "$missing" > .git/info/sparse-checkout
  fi
  git checkout -q "$PEER_COMMIT"
  cd ..
fi
if venv/bin/python -c 'import jax, learned_optimization.learned_optimizers.adafac_mlp_lopt' \
    2>/dev/null; then
  echo "reusing $PEER_DIR/venv (jax $(venv/bin/python -c 'import jax; print(jax.__version__)'))"
  exit 0
fi
python3 -m venv venv
venv/bin/pip install -q --upgrade pip
venv/bin/pip install -q "jax==$JAX_VERSION" \
  dm-haiku optax flax chex gin-config numpy absl-py tqdm scikit-learn
venv/bin/pip install -q tensorflow-cpu tensorflow-datasets
venv/bin/pip install -q --no-deps -e learned_optimization
