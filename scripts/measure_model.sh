#!/bin/bash
# Re-measure everything on a newly trained model, in the order that matters, stage by stage.
# Every stage caches what it finishes (the benchmarks' own caches, or a file under $OUT), so a
# killed run loses at most one batch: rerun the same command to go on. Stages (STAGES, in order):
#   export   the run's EMA weights -> $RUN/model.{safetensors,json}
#   sweep    benchmarks/start_sweep.py: where DDIM, Euler and Heun start (FID at 20 steps, lambda = 1)
#   ship     scripts/ship_model.py: the model becomes src/epsscale/assets/fmnist_adm with those
#            starts in its config; the old model's caches and plots leave the working tree
#   targets  DDPM 20 and 100 steps, seeds 0..$TARGET_NUM-1 -> FID against the test split, pixel
#            statistics (scripts/pixel_stats.py), the extractor's floor (scripts/fid_floor.py)
#   measure  epsscale measure, DDPM, DDIM and Euler at 20 steps, from data and from the prior
#   lambdas  the demo's lambdas: FID grids on tuning seeds (benchmarks/calibration.py), then
#            scripts/ship_es.py
#   calib    benchmarks/calibration.py per sampler at 20 (and 10) steps: grid, norm matching, parabola,
#            linear search, each scored on held-out seeds (CALIB_STEPS, default "20 10")
#   esvt     benchmarks/es_vs_training.py over the run's 10/25/50/100% snapshots
#   quality  benchmarks/quality.py (Q_ARGS; default: 2,000 held-out samples), one process per
#            group of Q_SAMPLERS ("ddpm,ddim,euler heun") with Q_THREADS (1) threads each
#   ip       the DDPM-IP twin: the finished run fine-tuned for IP_STEPS more steps with
#            --input-perturbation 0.1 (constant lr 1e-4), and its control, the same fine-tune with
#            gamma = 0, exported to benchmarks/ip_model/{model,control}; the two run side by side
#            with IP_THREADS (1) threads each
#   compare  benchmarks/compare.py (C_ARGS), one process per group of C_SAMPLERS ("ddim ddpm") with
#            C_THREADS (1) threads each, then its tables into RESULTS.md
# Settings: RUN (runs/fmnist28), STEPS (12000), THREADS (2), DEVICE (cpu), OUT (out/measure),
# STAGES (all of the above), TARGET_NUM (5000), IP_STEPS (2400, 20% of the run).
#     STAGES="export sweep ship targets" bash scripts/measure_model.sh
# Each stage's commands are echoed; they are the commands benchmarks/RESULTS.md quotes.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUN="${RUN:-runs/fmnist28}"
STEPS="${STEPS:-12000}"
T="${THREADS:-2}"
DEVICE="${DEVICE:-cpu}"
OUT="${OUT:-out/measure}"
N="${TARGET_NUM:-5000}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-export sweep ship targets measure lambdas calib esvt quality ip compare}"
mkdir -p "$OUT"
run() { echo "+ $*"; "$@" || { echo "measure_model: failed ($?): $*"; exit 1; }; }
# The FID grid over b of each sampler: DDPM's best b sat at 0.985, the first grid's low end, so
# its grid reaches down to 0.95.
grid_of() { [ "$1" = ddpm ] && echo "--lo 0.95 --points 14 --hi 1.015" || echo "--lo 0.985 --points 7 --hi 1.015"; }
ep() { run "$PY" -m epsscale "$@"; }
# wait_all WHAT PID...: wait for every background job; if any failed, say WHAT and stop.
wait_all() {
  local what="$1" p failed=0
  shift
  for p in "$@"; do wait "$p" || failed=1; done
  [ "$failed" = 0 ] || { echo "measure_model: failed: $what"; exit 1; }
}
# side_by_side "GROUPS" THREADS CMD...: CMD --samplers G --threads THREADS for every group G, all at
# once (on two cores, two one-thread processes beat one two-thread process); fails if any fails.
side_by_side() {
  local groups="$1" threads="$2" g pids=()
  shift 2
  for g in $groups; do run "$@" --samplers "$g" --threads "$threads" & pids+=($!); done
  wait_all "$*" "${pids[@]}"
}

for stage in $STAGES; do
  echo "== $stage ($(date +%H:%M:%S))"
  case "$stage" in
  export)
    done_step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$RUN/state.json" 2>/dev/null || echo 0)
    [ "$done_step" -ge "$STEPS" ] || { echo "measure_model: $RUN is at step $done_step of $STEPS"; exit 1; }
    ep train --run-dir "$RUN" --steps "$STEPS" --export "$RUN/model" --threads "$T" --quiet ;;
  sweep)
    run "$PY" benchmarks/start_sweep.py --model "$RUN/model" --steps 20 --threads "$T" --batch 250 --device "$DEVICE" ;;
  ship)
    run "$PY" scripts/ship_model.py "$RUN/model" --start-sweep benchmarks/start_sweep.json --steps 20
    # The old model's numbers go rather than stand beside the new ones.
    rm -rf benchmarks/quality_cache*.json benchmarks/quality_tune benchmarks/quality_tune_cuda benchmarks/quality.png \
      benchmarks/quality_cuda.png benchmarks/calibration_*.json benchmarks/calibration_norm benchmarks/exposure_ddpm20 \
      benchmarks/exposure_ddim20 benchmarks/*_work
    echo "old caches removed: commit their removal with the new model" ;;
  targets)
    for s in 20 100; do
      f="$OUT/ddpm${s}_${N}.npz"
      [ -f "$f" ] || ep sample --sampler ddpm --steps "$s" --seeds "0-$((N - 1))" --batch 250 --threads "$T" --quiet --out "$f"
      [ -f "$f.fid.json" ] || { ep fid "$f" --ref fashion-mnist-test --threads "$T" --json --quiet > "$f.fid.json.tmp" && mv "$f.fid.json.tmp" "$f.fid.json"; }
      cat "$f.fid.json"
    done
    # The best deterministic setting of the start sweep (Heun, 20 steps, the config's grid): pixel
    # statistics need fewer samples than FID.
    f="$OUT/heun20_1000.npz"
    [ -f "$f" ] || ep sample --sampler heun --steps 20 --seeds 0-999 --batch 250 --threads "$T" --quiet --out "$f"
    run "$PY" scripts/pixel_stats.py --npz "$OUT"/ddpm20_"$N".npz "$OUT"/ddpm100_"$N".npz "$f"
    run "$PY" scripts/fid_floor.py --sizes 500,2000,5000 --repeats 3 --threads "$T" ;;
  measure)
    for start in data prior; do
      ep measure --sampler ddpm --steps 20 --eps-scale 1.01 --num 256 --batch 256 --threads "$T" --start "$start" --quiet --out "benchmarks/exposure_ddpm20_$start"
      ep measure --sampler ddim --steps 20 --eps-scale 1.01 --num 256 --batch 256 --threads "$T" --start "$start" --quiet --out "benchmarks/exposure_ddim20_$start"
      ep measure --sampler euler --steps 20 --eps-scale 1.01 --num 256 --batch 256 --threads "$T" --start "$start" --quiet --out "benchmarks/exposure_euler20_$start"
    done ;;
  lambdas)
    for s in ddpm ddim euler; do
      run "$PY" benchmarks/calibration.py --sampler "$s" --steps 20 $(grid_of "$s") --grid-num 500 --norm-kinds "" \
        --eval-num 0 --parabola-num 0 --threads "$T" --cache "benchmarks/calibration_${s}_points.json" --out "benchmarks/calibration_$s.json"
    done
    run "$PY" scripts/ship_es.py benchmarks/calibration_ddpm.json benchmarks/calibration_ddim.json benchmarks/calibration_euler.json ;;
  calib)
    # Which calibration works, and whether the linear schedule beats uniform: grid, lambda = 1, norm
    # matching (uniform, per sigma), the parabola and the linear FID search, each scored on 1,000
    # held-out seeds. The 20-step grids are the lambdas stage's (its caches).
    for n in ${CALIB_STEPS:-20 10}; do
      for s in ddpm ddim euler; do
        [ "$n" != 20 ] && [ "$s" = euler ] && continue
        [ "$n" = 20 ] && cache="benchmarks/calibration_${s}_points.json" || cache="benchmarks/calibration_${s}_${n}_points.json"
        run "$PY" benchmarks/calibration.py --sampler "$s" --steps "$n" $(grid_of "$s") --grid-num 500 --cache "$cache" \
          --norm-num 256 --norm-kinds uniform,per_sigma --eval-num 1000 --batch 125 --threads "$T" --out "benchmarks/calibration_${s}_${n}_full.json"
      done
    done ;;
  esvt)
    run "$PY" benchmarks/es_vs_training.py --run-dir "$RUN" --steps-of 1200,3000,6000,12000 --total "$STEPS" --threads "$T" --device "$DEVICE" ;;
  quality)
    side_by_side "${Q_SAMPLERS:-ddpm,ddim,euler heun}" "${Q_THREADS:-1}" "$PY" benchmarks/quality.py --steps 10,20,50,100 --device "$DEVICE" ${Q_ARGS:---num 2000} ;;
  ip)
    # The two fine-tunes run side by side, one thread each (IP_THREADS): on two cores that beats
    # one after the other at two threads (about 1.1 s a step each: 45 min for 2,400 steps).
    pids=()
    for g in 0.1 0; do
      [ "$g" = 0 ] && name=control || name=model
      ep train --run-dir "$RUN-ip$g" --init-from "$RUN/checkpoint.pt" \
        --steps "$((STEPS + ${IP_STEPS:-2400}))" --lr 1e-4 --lr-schedule constant --input-perturbation "$g" \
        --snapshot-every 600 --threads "${IP_THREADS:-1}" --quiet --export "benchmarks/ip_model/$name" &
      pids+=($!)
    done
    wait_all "an IP fine-tune" "${pids[@]}" ;;
  compare)
    side_by_side "${C_SAMPLERS:-ddim ddpm}" "${C_THREADS:-1}" "$PY" benchmarks/compare.py ${C_ARGS:-}
    run "$PY" benchmarks/compare.py --report --write-results ${C_ARGS:-} ;;
  *) echo "measure_model: unknown stage $stage"; exit 2 ;;
  esac
done
echo "== done ($(date +%H:%M:%S))"
