#!/bin/bash
# The GPU check of issue 26, one script for a machine with an NVIDIA GPU: every step runs even
# when one before it failed, each step's output goes to OUT/<step>.log, and OUT/summary.md says
# what passed, what failed and the figures (W1 inner steps/s, one update against optax.adam).
#
#   bash scripts/gpu_check.sh [--out=DIR]            # on the GPU machine (JAX_PLATFORMS=cuda)
#   bash scripts/gpu_check.sh --dry_run [--out=DIR]  # every step on the CPU with tiny sizes
#
# Steps: the fast suite (make test's selection) with JAX_PLATFORMS=cuda; the quickstart
# (meta-train, then evaluate its export); W1 (scripts/benchmark.py) with the mlp's default
# fused="auto" (unfused on a GPU until this check has shown the Pallas kernel right) and with
# --fused (the Pallas kernel); scripts/benchmark_optimizers.py for mlp and adafac_mlp, unfused
# and fused (mlp's Pallas kernel; adafac_mlp has no fused kernel yet) at 1e7 and 1e8 parameters.
# The goal for the fused update on a GPU: <= 2x optax.adam at 1e7-1e8 (docs/performance.md).
# --dry_run checks that every step's command runs (its flags, its imports, its output parsed
# into the summary) on a CPU: 45-116 s on 2 loaded cores, less with warm compile caches (six
# processes, each importing JAX and compiling); tests/test_gpu_check.py runs it (make test-slow).
# Exit status: 0 when every step passed, 1 when one failed, 2 for a bad argument or no GPU.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
OUT=
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY=1 ;;
    --out=?*) OUT=${arg#--out=} ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: gpu_check.sh: unknown argument '$arg' (takes --dry_run and --out=DIR)" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ]; then OUT=${OUT:-runs/gpu_check_dry}; else OUT=${OUT:-runs/gpu_check}; fi
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "error: gpu_check.sh: no Python at $PYTHON (run make install-test, or set PYTHON)" >&2; exit 2
fi
mkdir -p "$OUT" || { echo "error: gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Two pytest workers (and the benchmarks) share the GPU: allocate on demand, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # Tiny sizes: each step's command, flags and output format, not its figures.
  case "${XLA_FLAGS:-}" in  # (once: the flags are part of the compile cache's key)
    *--xla_backend_optimization_level=*) ;;
    *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0" ;;
  esac
  SUITE=(tests/training/test_distributed.py -k auto_cpu_devices)
  TRAIN=(--config.num_outer_steps=2 --config.log_every=1 --config.unroll.num_particles=4
         --config.unroll.trunc_length=2 --config.unroll.horizon.length=4
         --config.lopt.hidden_size=16)
  EVAL=(--steps=4 --seeds=1 --lrs=0.01)
  W1=(--steps=1 --repeats=1 --particles=4)
  SIZES=1e3
  REPS=(--reps=1 --warmup=0)
else
  export JAX_PLATFORMS=cuda
  if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >/dev/null 2>&1; then
    echo "error: gpu_check.sh: JAX sees no CUDA GPU here (jax[cuda] installed? nvidia-smi?); on a CPU run --dry_run" >&2
    exit 2
  fi
  SUITE=(-n 2 -m "not slow" --durations=15)
  TRAIN=()
  EVAL=()
  W1=(--repeats=3)
  SIZES=1e7,1e8
  REPS=()
fi

SUMMARY="$OUT/summary.md"
FAILED=0
{
  echo "# GPU check ($( [ "$DRY" = 1 ] && echo "dry run on the CPU, tiny sizes: no figure means anything" || echo "JAX_PLATFORMS=cuda"))"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $("$PYTHON" -c 'import jax, jaxlib; d = jax.devices()[0]; print(d.platform, d.device_kind, "x", jax.device_count(), "(jax", jax.__version__, "jaxlib", jaxlib.__version__ + ")")' 2>&1 | tail -1)"
  echo
  echo "| step | result | seconds |"
  echo "| --- | --- | ---: |"
} > "$SUMMARY"

# step NAME COMMAND...: runs it with its output in OUT/NAME.log and adds its row to the summary.
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local result="passed"
  if [ $rc -ne 0 ]; then result="FAILED (exit $rc; $name.log)"; FAILED=1; fi
  echo "| $name | $result | $((SECONDS - t0)) |" >> "$SUMMARY"
  echo "   $result"
}

step suite "$PYTHON" -m pytest -q -p no:cacheprovider "${SUITE[@]}"
step quickstart_train "$PYTHON" scripts/meta_train.py --config=quickstart \
  --workdir="$OUT/quickstart" --noprogress "${TRAIN[@]}"
step quickstart_eval "$PYTHON" scripts/evaluate.py \
  --export="$OUT/quickstart/export/optimizer.safetensors" --task=digits_mlp \
  --task_kwargs='{"permute_classes": true}' --out="$OUT/quickstart/eval" "${EVAL[@]}"
step w1_default "$PYTHON" scripts/benchmark.py --workload=w1 "${W1[@]}"
step w1_fused "$PYTHON" scripts/benchmark.py --workload=w1 --fused "${W1[@]}"
step update "$PYTHON" scripts/benchmark_optimizers.py --optimizers=mlp,adafac_mlp --fused \
  --sizes="$SIZES" "${REPS[@]}"

{
  echo
  echo "## Figures"
  echo
  echo "suite: $(grep -E '(passed|failed|error)' "$OUT/suite.log" | tail -1)"
  echo
  echo "quickstart: $(grep -E '^done' "$OUT/quickstart_train.log" | tail -1)"
  echo
  for w in w1_default w1_fused; do
    echo "$w (inner steps/s):"
    echo
    echo '```'
    grep -A2 '^W1' "$OUT/$w.log" | tail -3
    echo '```'
    echo
  done
  echo "one update against optax.adam (benchmark_optimizers.py):"
  echo
  echo '```'
  cat "$OUT/update.log" | grep -v -E '^(WARNING|I[0-9]|W[0-9])' | tail -40
  echo '```'
} >> "$SUMMARY"
echo "summary: $SUMMARY"
exit $FAILED
