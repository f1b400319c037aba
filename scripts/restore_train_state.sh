#!/bin/bash
# Recreate a training run's folder from the resume state committed on main (train_state/<run name>/,
# written by scripts/save_train_state.sh), so that the same `epsscale train` command continues it:
#
#     bash scripts/restore_train_state.sh runs/fmnist28
#     epsscale train --run-dir runs/fmnist28 --steps 12000 --snapshot-every 600 --threads 1
#
# A run folder that already holds a state.json is left as it is (it is at least as far along).
set -eu
[ $# -gt 0 ] || { echo "usage: restore_train_state.sh RUN_DIR..." >&2; exit 2; }
for run in "$@"; do
  run="${run%/}"
  saved="train_state/$(basename "$run")"
  if [ -f "$run/state.json" ]; then echo "$run: already there, left as it is"; continue; fi
  ls "$saved"/checkpoint.pt.part-* >/dev/null 2>&1 || { echo "restore_train_state: $saved holds no checkpoint" >&2; exit 1; }
  mkdir -p "$run"
  find "$saved" -maxdepth 1 -type f ! -name 'checkpoint.pt.part-*' -exec cp {} "$run"/ \;
  [ -d "$saved/snapshots" ] && mkdir -p "$run/snapshots" && cp "$saved"/snapshots/* "$run/snapshots/"
  cat "$saved"/checkpoint.pt.part-* > "$run/checkpoint.pt.tmp" && mv "$run/checkpoint.pt.tmp" "$run/checkpoint.pt"
  # The EMA weights at the saved step are its snapshot, when there is one: `--export` reads them.
  step=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$run/state.json")
  snap="$run/snapshots/ema_step$(printf %06d "${step:-0}").safetensors"
  [ -f "$snap" ] && cp "$snap" "$run/ema.safetensors"
  echo "$run: restored from $saved"
done
