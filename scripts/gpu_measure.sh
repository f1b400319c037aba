#!/bin/bash
# After scripts/gpu_train.sh, in the same GPU call: the measurements on the new model that take
# CPU-hours here, each cached so that what finishes before the deadline is kept:
#   1. benchmarks/start_sweep.py --device cuda: where DDIM, Euler and Heun start (20 steps);
#   2. scripts/ship_model.py: the model becomes the shipped one, with those starts in its config;
#   3. benchmarks/es_vs_training.py --device cuda: the tuned-b gain at 10/25/50/100% of training;
#   4. benchmarks/quality.py --device cuda: the quality grid (tuned b against lambda = 1).
# Settings: RUN (runs/fmnist28), STEPS (12000, the run's length), DEADLINE (epoch seconds; default
# now + 150), SWEEP_STEPS (20), DATA (.gpu_data, Fashion-MNIST's .gz files), QSTEPS (20,10,50,100), and extra options
# for each benchmark in SWEEP_ARGS, ES_ARGS and Q_ARGS (a toy-size test on the CPU:
#     DEVICE=cpu DATA=/usr/share/datasets/fashion-mnist RUN=/tmp/gpu_train/runs/a STEPS=4 OUT=/tmp/gpu_measure \
#       SWEEP_STEPS=5 SWEEP_ARGS='--num 64 --sigma-maxes 10,40' ES_ARGS='--steps-of 2,4 --total 4 --num 64 --sampling-steps 5' \
#       Q_ARGS='--num 64 --tune-num 64 --tune-points 3 --samplers ddpm' QSTEPS=5 DEADLINE=$(( $(date +%s) + 900 )) bash scripts/gpu_measure.sh
# writes into the checkout's caches: run it in a scratch worktree).
# What comes back in $OUT: measure.log and measure.tgz (the caches and the shipped config; unpack
# here with tar -xzf measure.tgz, then ship the weights with scripts/ship_model.py as in step 2).
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EPSSCALE_FASHION_MNIST="${DATA:-$PWD/.gpu_data}" EPSSCALE_CACHE="${EPSSCALE_CACHE:-$PWD/.gpu_cache}"
OUT="${OUT:-out/gpu_measure}"
RUN="${RUN:-runs/fmnist28}"
DEVICE="${DEVICE:-cuda}"
DEADLINE="${DEADLINE:-$(( $(date +%s) + 150 ))}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
left() { echo $(( DEADLINE - $(date +%s) > 1 ? DEADLINE - $(date +%s) : 1 )); }
pack() {
  local f=() p
  for p in benchmarks/start_sweep_cuda.json benchmarks/es_vs_training/grids_cuda benchmarks/quality_cache_cuda.json benchmarks/quality_tune_cuda src/epsscale/assets/fmnist_adm.json; do [ -e "$p" ] && f+=("$p"); done
  [ ${#f[@]} -gt 0 ] && tar -czf "$OUT/measure.tgz" "${f[@]}"
}
{
done_step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$RUN/state.json" 2>/dev/null || echo 0)
if [ "$done_step" -lt "${STEPS:-12000}" ]; then echo "$RUN is at step $done_step of ${STEPS:-12000}: nothing to measure yet"; exit 0; fi
timeout "$(left)" $PY benchmarks/start_sweep.py --model "$RUN/model" --device "$DEVICE" --batch 500 --threads 4 --steps "${SWEEP_STEPS:-20}" ${SWEEP_ARGS:-} || echo "start sweep: exit $?"
[ "$DEVICE" = cpu ] && sweep=benchmarks/start_sweep.json || sweep=benchmarks/start_sweep_cuda.json
$PY scripts/ship_model.py "$RUN/model" --start-sweep "$sweep" --steps "${SWEEP_STEPS:-20}" || exit 1
pack
timeout "$(left)" $PY benchmarks/es_vs_training.py --run-dir "$RUN" --device "$DEVICE" --batch 500 --threads 4 ${ES_ARGS:-} || echo "es_vs_training: exit $?"
pack
timeout "$(left)" $PY benchmarks/quality.py --device "$DEVICE" --batch 1000 --threads 4 --steps "${QSTEPS:-20,10,50,100}" ${Q_ARGS:-} 2>&1 | grep --line-buffered -v "img/s" || echo "quality: exit $?"
pack
echo "measure done, $(left) s before the deadline"
} 2>&1 | tee "$OUT/measure.log"
