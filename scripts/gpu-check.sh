#!/usr/bin/env bash
# kdcli on a CUDA machine in one go, for a GPU borrowed for a few minutes:
#   1. the CUDA tests (tests/test_cuda.py; skipped where there is no GPU) and the CLI tests;
#   2. `kdcli bench` (training throughput, fp32 and bf16) on the idle GPU;
#   3. `make -j8 paper` from an empty runs folder, timed, then `make -j8 paper SEEDS=3` on top of it,
#      stopped at the deadline if it must be (make's file targets keep every finished run);
#      then `kdcli report` on what finished, and `kdcli runs` (a line per run).
# usage: scripts/gpu-check.sh DATA_DIR OUT_DIR [SECONDS]   (SECONDS: the whole script's budget, default 560; leave it a minute inside the call's own limit)
# It runs kdcli from this folder with $PYTHON (default: the python3 on the PATH); nothing is installed.
# `make gpu-check` runs it with the project's .venv.
set -u
[ $# -ge 2 ] || { echo "usage: $0 DATA_DIR OUT_DIR [SECONDS]  (DATA_DIR may be '' for kdcli's own lookup)" >&2; exit 2; }
data=${1:+$(cd "$1" && pwd)} out=$(mkdir -p "$2" && cd "$2" && pwd) budget=${3:-560}
deadline=$(( $(date +%s) + budget ))
left() { echo $(( deadline - $(date +%s) )); }
say() { echo "== $(date +%T) ($(left) s left) $*"; }
[ -z "$data" ] || export KDCLI_DATA_DIR=$data
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

# the GPU check first, so that a machine without one gets this one line and nothing else
$py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "no CUDA GPU for $py: nothing to check" >&2; exit 1; }
say environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
$py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))"
nproc

say "CUDA tests, and the CLI tests (their shared smoke teacher trains on the GPU)"
timeout 150 $py -m pytest -rs -p no:cacheprovider tests/test_cuda.py tests/test_cli.py 2>&1 \
  | tee "$out/cuda-tests.log" | tail -15

say "bench (idle GPU)"
{ timeout 60 $py -m kdcli bench --seconds 3 --no-ensemble
  timeout 60 $py -m kdcli bench --seconds 3 --no-ensemble --precision bf16; } 2>&1 | tee "$out/bench.log"

# plain `make paper` first (the figure users compare with the CPU's hour), then seeds 2 and 3 on top of it
rm -rf runs-gpu results-gpu
paper() {
  local limit=$(( $(left) - 40 )); [ "$limit" -ge 10 ] || { echo "no time left for make paper $*"; return 1; }
  local started=$(date +%s)
  OMP_NUM_THREADS=1 timeout "$limit" make -k -j8 paper "$@" KDCLI="$py -m kdcli" RUNS=runs-gpu RESULTS=results-gpu \
    >> "$out/paper.log" 2>&1
  local rc=$?
  echo "make -j8 paper $*: exit $rc after $(( $(date +%s) - started )) s"
  return $rc
}
say "make -j8 paper"
paper && { say "make -j8 paper SEEDS=3 (adds seeds 2 and 3)"; paper SEEDS=3; }
tail -3 "$out/paper.log"

say "report on the finished runs"
timeout 40 $py -m kdcli report --runs runs-gpu --out results-gpu > "$out/report.log" 2>&1; tail -30 "$out/report.log"
COLUMNS=200 timeout 40 $py -m kdcli runs runs-gpu  # every run: status (finished, or interrupted N/epochs), test errors, wall
tar czf "$out/gpu-runs.tgz" runs-gpu/*/result.json runs-gpu/*/metrics.jsonl runs-gpu/*/config.yaml results-gpu 2>/dev/null
say done
