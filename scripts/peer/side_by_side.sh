#!/bin/bash
# W1 (scripts/benchmark.py) ours and google/learned_optimization's, alternated on one machine
# (ROUNDS rounds, default 3), in inner steps/s; the ratio of a round is ours / peer's.
# CPU_DEVICES="1 4" (the default) runs ours as one device and with the CPU as 4 devices
# (--host_devices, the train command's --cpu_devices); FUSED="0 1" (the default) runs each both
# unfused and with the mlp's fused C++ CPU kernel (--fused); FUSED=bf16 runs the fused kernel
# with its bfloat16 middle layer (--fused --bf16_hidden, an approximation: lopt/mlp_cpu.py);
# FUSED=auto the mlp's default (fused="auto": the C++ kernel on a CPU); the peer runs as it
# ships, one device. The train command's defaults on a 2-core CPU: CPU_DEVICES=2 FUSED=auto.
# Needs .venv (make install) and the peer's venv (scripts/peer/setup_venv.sh).
cd "$(dirname "$0")/../.."
PEER_DIR=${PEER_DIR:-peer}
for i in $(seq "${ROUNDS:-3}"); do
  echo "round $i: $(uptime | sed 's/.*load/load/')"
  for n in ${CPU_DEVICES:-1 4}; do
    for f in ${FUSED:-0 1}; do
      case "$f" in 1) fused=--fused ;; bf16) fused="--fused --bf16_hidden" ;; auto) fused= ;; *) fused=--nofused ;; esac
      .venv/bin/python scripts/benchmark.py --workload=w1 --repeats=1 --steps=98 --host_devices="$n" $fused 2>&1 \
        | grep -A1 "^W1" | tail -1 | sed "s/^/  ours ($n device(s), $fused):  /"
    done
  done
  "$PEER_DIR"/venv/bin/python scripts/peer/bench_w1_learned_optimization.py --outer_steps 100 2>&1 | grep "^W1" | sed 's/^/  peer:  /'
done
