#!/bin/bash
# Train the shipped Fashion-MNIST model's recipe on one GPU, export it, and hand back the weights,
# in a single call of at most 9 minutes on a GPU machine (what takes ~7 CPU-hours here).
#
# Prepare here (the GPU machine cannot download; Fashion-MNIST travels with the working tree):
#     mkdir -p .gpu_data && cp /usr/share/datasets/fashion-mnist/*.gz .gpu_data/
# Run there, from the repository root, carrying .gpu_data:
#     bash scripts/gpu_train.sh
# Settings pass through the environment: STEPS (12000), BATCH (64), SNAPSHOT (600), MINUTES (8,
# the training budget; the run stops cleanly after the checkpoint that follows it), DEVICE (cuda),
# DATA (.gpu_data), RUN (runs/gpu), RESUME (a folder holding the run.tgz.part-* of an earlier call,
# carried along: the run continues from them; default $OUT, for a run on one machine).
# What comes back in $OUT (at most 8 files of 16 MiB): model.safetensors + model.json (the EMA
# weights at the last step), loss.json, train.log, and run.tgz.part-* (the run directory with its
# checkpoint and the EMA snapshots of KEEP, default steps 1200 3000 6000, i.e. 10/25/50%: join the
# parts with cat run.tgz.part-* > run.tgz; tar -xzf run.tgz, to resume or to study training).
# Test it on the CPU at toy size first:
#     STEPS=4 BATCH=4 SNAPSHOT=2 DEVICE=cpu DATA=/usr/share/datasets/fashion-mnist OUT=/tmp/gpu_train bash scripts/gpu_train.sh
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-out/gpu_train}"
RUN="${RUN:-runs/gpu}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$(dirname "$RUN")"
[ "$DEVICE" = cpu ] || nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
RESUME="${RESUME:-$OUT}"
if ls "$RESUME"/run.tgz.part-* >/dev/null 2>&1; then cat "$RESUME"/run.tgz.part-* | tar -xzf -; fi   # resume a returned run
start=$(date +%s)
$PY -m epsscale train --run-dir "$RUN" --steps "${STEPS:-12000}" --batch "${BATCH:-64}" --snapshot-every "${SNAPSHOT:-600}" \
  --max-minutes "${MINUTES:-8}" --data "${DATA:-.gpu_data}" --device "$DEVICE" --export "$RUN/model" 2>&1 \
  | tr '\r' '\n' | grep --line-buffered -E "^(train: *[0-9]+%|exported|epsscale)|Error|Traceback|^ +File " | awk 'NR % 50 == 1 || !/^train:/' | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
echo "train exit status $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
cp "$RUN/model.safetensors" "$RUN/model.json" "$RUN/loss.json" "$OUT/" 2>/dev/null
# The run: its checkpoint and the kept EMA snapshots, in parts under the 16 MiB limit.
keep=()
for s in ${KEEP:-1200 3000 6000}; do
  f=$(printf '%s/snapshots/ema_step%06d.safetensors' "$RUN" "$s"); [ -f "$f" ] && keep+=("$f")
done
rm -f "$OUT"/run.tgz.part-*
tar -czf - "$RUN/train_config.json" "$RUN/loss.json" "$RUN/state.json" "$RUN/checkpoint.pt" "$RUN/ema.safetensors" "${keep[@]}" | split -b 15M - "$OUT/run.tgz.part-"
ls -la "$OUT"
exit "$rc"
