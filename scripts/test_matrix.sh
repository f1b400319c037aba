#!/usr/bin/env bash
# Run the test suite under every variation that may change float rounding or test order, to show
# that it passes on any machine and in any order, not just on the one it was written on:
#
#   OMP_NUM_THREADS     1, 2                 (OpenMP/BLAS thread counts, here and in subprocesses)
#   OPENBLAS_CORETYPE   unset, Haswell       (numpy/scipy's OpenBLAS kernels; some processors set it)
#   order               normal, reversed     (pytest-reverse's --reverse; -p no:randomly if present)
#   repetitions         --repeat N           (default 3)
#
# Usage: scripts/test_matrix.sh [--repeat N] [--threads "1 2"] [--coretype NAME] [--logs DIR] [PYTEST ARGS/PATHS...]
#   e.g. scripts/test_matrix.sh                                  # the whole matrix, -m "not slow"
#        scripts/test_matrix.sh --repeat 1 tests/test_distributed.py
#        scripts/test_matrix.sh --threads 1     # one half of the matrix (run the halves side by side
#                                               # in two checkouts on a machine with cores to spare)
#
# Each run is `python -m pytest -q -p no:cacheprovider -m "not slow" [--reverse] ARGS` from the
# repository root, with PYTHONPATH=src so the checkout's code is tested. PYTHON (default
# .venv/bin/python, else python3) must have pytest and pytest-reverse (the `test` extra).
# Prints one line per run and a pass/fail table per variation; exits 1 if any run failed.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

repeat=3
threads_list="1 2"
coretype=Haswell
logs=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=${2:?--repeat needs a number}; shift 2 ;;
    --repeat=*) repeat=${1#*=}; shift ;;
    --threads) threads_list=${2:?--threads needs a list such as "1 2"}; shift 2 ;;
    --threads=*) threads_list=${1#*=}; shift ;;
    --coretype) coretype=${2:?--coretype needs an OpenBLAS core name}; shift 2 ;;
    --coretype=*) coretype=${1#*=}; shift ;;
    --logs) logs=${2:?--logs needs a directory}; shift 2 ;;
    --logs=*) logs=${1#*=}; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$repeat" in ''|*[!0-9]*|0) echo "test_matrix: --repeat must be a positive integer, got '$repeat'" >&2; exit 2 ;; esac

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import pytest_reverse" 2>/dev/null; then
  echo "test_matrix: $PYTHON has no pytest-reverse; install the test extra: $PYTHON -m pip install -e '.[test]'" >&2
  exit 2
fi
order_opts=()
if "$PYTHON" -c "import pytest_randomly" 2>/dev/null; then order_opts=(-p no:randomly); fi

logs=${logs:-$(mktemp -d "${TMPDIR:-/tmp}/epsscale-test-matrix.XXXXXX")}
mkdir -p "$logs" || exit 2
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

echo "test_matrix: $PYTHON, pytest arguments: ${args[*]:-(none: the whole suite)}"
echo "test_matrix: this shell has OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)}; logs in $logs"

declare -A passed total
variations=()
failed_runs=0
for threads in $threads_list; do
  for core in unset "$coretype"; do
    for order in normal reversed; do
      key="OMP_NUM_THREADS=$threads OPENBLAS_CORETYPE=$core order=$order"
      variations+=("$key")
      passed[$key]=0
      total[$key]=0
      for rep in $(seq 1 "$repeat"); do
        log="$logs/omp$threads-$core-$order-$rep.log"
        if [ "$core" = unset ]; then env_cmd=(env -u OPENBLAS_CORETYPE); else env_cmd=(env OPENBLAS_CORETYPE="$core"); fi
        env_cmd+=(OMP_NUM_THREADS="$threads")
        order_flag=()
        if [ "$order" = reversed ]; then order_flag=(--reverse); fi
        t0=$(date +%s)
        "${env_cmd[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider ${order_opts[@]+"${order_opts[@]}"} -m "not slow" \
          ${order_flag[@]+"${order_flag[@]}"} ${args[@]+"${args[@]}"} >"$log" 2>&1
        rc=$?
        dt=$(( $(date +%s) - t0 ))
        total[$key]=$(( total[$key] + 1 ))
        summary=$(tail -n 1 "$log" | sed 's/=//g; s/^ *//; s/ *$//')  # pytest's last line: "N passed in Ts"
        if [ "$rc" -eq 0 ]; then
          passed[$key]=$(( passed[$key] + 1 ))
          printf '%-4s %-62s run %d/%d  %4ds  %s\n' PASS "$key" "$rep" "$repeat" "$dt" "$summary"
        else
          failed_runs=$(( failed_runs + 1 ))
          printf '%-4s %-62s run %d/%d  %4ds  %s (rc %d, log %s)\n' FAIL "$key" "$rep" "$repeat" "$dt" "$summary" "$rc" "$log"
          grep -E '^(FAILED|ERROR) ' "$log" | head -n 20 | sed 's/^/       /'
        fi
      done
    done
  done
done

echo
printf '%-16s %-18s %-9s %-7s %s\n' OMP_NUM_THREADS OPENBLAS_CORETYPE order passed result
for key in "${variations[@]}"; do
  set -- $key
  t=${1#*=}; c=${2#*=}; o=${3#*=}
  result=PASS
  [ "${passed[$key]}" -eq "${total[$key]}" ] || result=FAIL
  printf '%-16s %-18s %-9s %-7s %s\n' "$t" "$c" "$o" "${passed[$key]}/${total[$key]}" "$result"
done
if [ "$failed_runs" -gt 0 ]; then
  echo "test_matrix: $failed_runs run(s) failed (logs in $logs)"
  exit 1
fi
echo "test_matrix: every run passed"
