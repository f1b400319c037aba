#!/bin/bash
# Keep training runs' resume state on main, in the tracked folder train_state/, so that a fresh clone
# on any machine can continue them. (Only main survives from one machine to the next: a side branch
# made here was lost once, with 5,600 GPU-trained steps on it.)
#
#     bash scripts/save_train_state.sh runs/fmnist28
#     KEEP="runs/fmnist28/snapshots/ema_step001200.safetensors" bash scripts/save_train_state.sh runs/fmnist28
#
# Per run it copies train_config.json, loss.json, state.json and init_from.json (where there) into
# train_state/<run name>/, checkpoint.pt as checkpoint.pt.part-NN pieces of 15 MiB (no tracked file
# over 20 MiB), the files named in KEEP into train_state/<run name>/snapshots/, and commits
# train_state/ alone (nothing else that is staged). To continue a run in a fresh clone:
#     bash scripts/restore_train_state.sh runs/fmnist28
#     epsscale train --run-dir runs/fmnist28 --steps 12000 --snapshot-every 600 --threads 1
set -eu
[ $# -gt 0 ] || { echo "usage: save_train_state.sh RUN_DIR..." >&2; exit 2; }
summary=()
for run in "$@"; do
  run="${run%/}"
  [ -f "$run/checkpoint.pt" ] || { echo "save_train_state: $run has no checkpoint.pt" >&2; exit 1; }
  dest="train_state/$(basename "$run")"
  mkdir -p "$dest"
  for f in train_config.json loss.json state.json init_from.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
  done
  rm -f "$dest"/checkpoint.pt.part-*
  split -b 15M -d -a 2 "$run/checkpoint.pt" "$dest/checkpoint.pt.part-"
  for f in ${KEEP:-}; do
    case "$f" in "$run"/*) mkdir -p "$dest/snapshots"; cp "$f" "$dest/snapshots/";; esac
  done
  summary+=("$(basename "$run") at step $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$dest/state.json")")
done
git add train_state
git commit -q -m "train_state: resume state of $(IFS=,; echo "${summary[*]}")" -- train_state
echo "committed: $(git log -1 --format='%h %s')"
