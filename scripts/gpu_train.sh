#!/bin/bash
# Train the shipped Fashion-MNIST model's recipe on one GPU, and beside it (IP=0.1, the default)
# its DDPM-IP twin (the same recipe with --input-perturbation 0.1), export both, and hand back the
# weights, in a single call of at most 9 minutes on a GPU machine (what takes ~7 CPU-hours each
# here at ~2.2 s a step).
#
# Prepare here (the GPU machine cannot download; Fashion-MNIST travels with the working tree):
#     mkdir -p .gpu_data && cp /usr/share/datasets/fashion-mnist/*.gz .gpu_data/
# Run there, from the repository root, carrying .gpu_data:
#     bash scripts/gpu_train.sh
# Settings pass through the environment: STEPS (12000), BATCH (64), SNAPSHOT (600), MINUTES (7,
# the training budget; a run stops cleanly after the checkpoint that follows it), DEVICE (cuda),
# DATA (.gpu_data), RUN (runs/fmnist28), IP (0.1; 0 trains no twin), IP_RUN (runs/fmnist28-ip),
# KEEP (the main run's EMA snapshots to return: 1200 3000 6000, i.e. 10/25/50%, for
# benchmarks/es_vs_training.py). A run that has no state yet under RUN starts from its resume state
# on main, train_state/<run name>/, where there is one (scripts/save_train_state.sh keeps it there).
# What comes back in $OUT: train.log and train.tgz.part-* (at most 15 MiB each). Unpack here with
#     cat train.tgz.part-* | tar -xzf -
# It holds, per run: train_config.json, loss.json, state.json, model.json + model.safetensors (the
# EMA weights at the last step) where a run finished, else checkpoint.pt (rerun the same
# `epsscale train` command here, or save it onto main and rerun this script there), and the
# main run's KEEP snapshots once it has finished.
# Test it on the CPU at toy size first:
#     STEPS=4 BATCH=4 SNAPSHOT=2 KEEP=2 DEVICE=cpu DATA=/usr/share/datasets/fashion-mnist OUT=/tmp/gpu_train RUN=/tmp/gpu_train/runs/a IP_RUN=/tmp/gpu_train/runs/b bash scripts/gpu_train.sh
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-out/gpu_train}"
RUN="${RUN:-runs/fmnist28}"
IP_RUN="${IP_RUN:-runs/fmnist28-ip}"
IP="${IP:-0.1}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-12000}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
[ "$DEVICE" = cpu ] || nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for run in "$RUN" "$IP_RUN"; do   # continue from the resume state committed on main, where there is one
  [ -d "train_state/$(basename "$run")" ] && bash scripts/restore_train_state.sh "$run"
done

train() {  # run-dir, extra options...
  local run=$1; shift
  mkdir -p "$(dirname "$run")"
  $PY -m epsscale train --run-dir "$run" --steps "$STEPS" --batch "${BATCH:-64}" --snapshot-every "${SNAPSHOT:-600}" \
    --max-minutes "${MINUTES:-7}" --data "${DATA:-.gpu_data}" --device "$DEVICE" --threads 4 --export "$run/model" "$@" 2>&1 \
    | tr '\r' '\n' | grep --line-buffered -E "^(train: *[0-9]+%|exported|epsscale)|Error|Traceback|^ +File " | awk 'NR % 50 == 1 || !/^train:/' | sed "s|^|$(basename "$run"): |"
  return "${PIPESTATUS[0]}"
}
start=$(date +%s)
train "$RUN" > "$OUT/train.log" &
main_pid=$!
if [ "$IP" != 0 ]; then
  train "$IP_RUN" --input-perturbation "$IP" > "$OUT/train_ip.log" &
  ip_pid=$!
fi
wait "$main_pid"; rc=$?
if [ "$IP" != 0 ]; then wait "$ip_pid"; rc_ip=$?; cat "$OUT/train_ip.log" >> "$OUT/train.log"; rm -f "$OUT/train_ip.log"; else rc_ip=0; fi
echo "train exit status $rc (IP twin: $rc_ip) after $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"

# Under the 64 MiB that comes back: a finished run returns its weights, an unfinished one its
# checkpoint (which holds the EMA weights too); the snapshots come with a finished main run.
files=()
main_done=0
for run in "$RUN" $([ "$IP" != 0 ] && echo "$IP_RUN"); do
  for f in train_config.json loss.json state.json model.json init_from.json; do [ -f "$run/$f" ] && files+=("$run/$f"); done
  done_step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$run/state.json" 2>/dev/null || echo 0)
  echo "$(basename "$run"): at step $done_step of $STEPS" | tee -a "$OUT/train.log"
  if [ "$done_step" -ge "$STEPS" ]; then
    files+=("$run/model.safetensors"); [ "$run" = "$RUN" ] && main_done=1
  elif [ -f "$run/checkpoint.pt" ]; then
    files+=("$run/checkpoint.pt")   # unfinished: the resume state
  fi
done
if [ "$main_done" = 1 ]; then
  for s in ${KEEP:-1200 3000 6000}; do
    f=$(printf '%s/snapshots/ema_step%06d.safetensors' "$RUN" "$s"); [ -f "$f" ] && files+=("$f")
  done
fi
rm -f "$OUT"/train.tgz.part-*
tar -czf - "${files[@]}" | split -b 15M - "$OUT/train.tgz.part-"
ls -la "$OUT"
[ "$rc" = 0 ] && [ "$rc_ip" = 0 ]
