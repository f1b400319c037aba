#!/bin/bash
# Keep training runs' resume state in git, on the branch train-state, so that a fresh clone (on
# any machine) can continue them. The working tree, main's index and main's history are untouched:
# the files go in through a scratch index straight onto the branch.
#
#     bash scripts/save_train_state.sh runs/fmnist28 runs/fmnist28-ip
#     KEEP="runs/fmnist28-cpu/snapshots/ema_step001200.safetensors" bash scripts/save_train_state.sh runs/fmnist28
#
# Per run: train_config.json, loss.json, state.json, checkpoint.pt, init_from.json (where there),
# plus the files named in KEEP. To continue a run in a fresh clone:
#     git fetch origin train-state 2>/dev/null; git archive train-state runs/fmnist28 | tar -x
#     epsscale train --run-dir runs/fmnist28 --steps 12000 --snapshot-every 600 --data .gpu_data --threads 1
set -eu
BRANCH="${BRANCH:-train-state}"
[ $# -gt 0 ] || { echo "usage: save_train_state.sh RUN_DIR..." >&2; exit 2; }
export GIT_INDEX_FILE
GIT_INDEX_FILE=$(mktemp -u)
trap 'rm -f "$GIT_INDEX_FILE"' EXIT
parent=$(git rev-parse -q --verify "refs/heads/$BRANCH" || true)
if [ -n "$parent" ]; then git read-tree "$parent"; else git read-tree --empty; fi
add() { git update-index --add --cacheinfo "100644,$(git hash-object -w "$1"),$1"; }
summary=()
for run in "$@"; do
  run="${run%/}"
  [ -f "$run/checkpoint.pt" ] || { echo "save_train_state: $run has no checkpoint.pt" >&2; exit 1; }
  for f in train_config.json loss.json state.json checkpoint.pt init_from.json; do [ -f "$run/$f" ] && add "$run/$f"; done
  summary+=("$run at step $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$run/state.json")")
done
for f in ${KEEP:-}; do add "$f"; done
tree=$(git write-tree)
commit=$(git commit-tree "$tree" ${parent:+-p "$parent"} -m "Resume state: $(IFS=,; echo "${summary[*]}")")
git update-ref "refs/heads/$BRANCH" "$commit"
echo "saved onto $BRANCH ($commit): $(IFS=,; echo "${summary[*]}")"
