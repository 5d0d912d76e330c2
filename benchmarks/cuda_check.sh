#!/usr/bin/env bash
# The CUDA path of moekit on a GPU machine, in one run: the test suite with CUDA visible (every
# command whose --device defaults to auto runs there), the fixture's profile / eval / prune --data
# / merge on cuda against the same commands on the CPU, and the speed benchmarks of profile and
# eval (in memory and streamed). Logs go to $LOGS (default ./cuda-logs).
#
#   FIXTURES=../shared/fixtures bash benchmarks/cuda_check.sh [tests,cli,speed]
#
# Each part runs under its own time limit (TESTS_S, CLI_S, SPEED_S seconds; defaults 190 + 160
# + 130, about 8 minutes on a 16-core machine). The test part names its failures even when its
# limit stops it: each failure is appended to $LOGS/failed.txt as it happens, pytest is sent
# SIGINT at the limit (so it prints its -rf summary and writes $LOGS/junit.xml), and every test
# has its own timeout (TEST_S, 90 s) when pytest-timeout is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOGS=${LOGS:-$ROOT/cuda-logs}
FIXTURES=${FIXTURES:-$ROOT/../shared/fixtures}
PARTS=${1:-tests,cli,speed}
WORK=$(mktemp -d)
mkdir -p "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-python3}
moekit() { "$PY" -m moekit "$@"; }
stamp() { echo "== $(date +%T) $*"; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; echo "-- $((SECONDS - t0)) s wall, rc $rc: $*" | cut -c1-160; return $rc; }

stamp "machine" | tee "$LOGS/env.log"
{ nvidia-smi -L; "$PY" -c "import torch, transformers; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"; \
  nproc; free -g | head -2; } >>"$LOGS/env.log" 2>&1

if [[ $PARTS == *tests* ]]; then
  stamp "tests (CUDA visible)"
  opts=(-q -p no:cacheprovider -rf -p pytest_failures_log --junitxml "$LOGS/junit.xml")
  workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  "$PY" -c "import xdist" 2>/dev/null && opts+=(-n "$(( workers > 14 ? 14 : workers ))")
  "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout "${TEST_S:-90}")
  : >"$LOGS/failed.txt"
  FAILED_LOG=$LOGS/failed.txt PYTHONPATH=$ROOT/benchmarks:$PYTHONPATH \
    timeout -s INT -k 30 "${TESTS_S:-190}" "$PY" -m pytest "${opts[@]}" tests >"$LOGS/tests.log" 2>&1
  echo "tests rc=$? (124: stopped by TESTS_S)"; tail -3 "$LOGS/tests.log"
  echo "failed: $(wc -l <"$LOGS/failed.txt")"; cut -c1-200 "$LOGS/failed.txt"
fi

fixture_cli() {
  local model=$FIXTURES/models/mixtral-e16k2 text=$FIXTURES/text d data=() evald=()
  for f in "$text"/*.txt; do
    d=$(basename "$f" .txt); data+=(--data "$d=$f"); evald+=(--data "$d=$f")
  done
  stamp "prune --data on cpu in the background (reference for the cuda prune)"
  (moekit prune "$model" "${data[@]}" --data-range 0:0.5 --ratio 0.5 --device cpu \
     --out "$WORK/pruned-cpu" >"$WORK/prune-cpu.log" 2>&1; echo "cpu prune rc=$?" \
     >>"$WORK/prune-cpu.log") &
  local bg=$!
  for dev in cuda cpu; do
    stamp "profile $dev"
    timed moekit profile "$model" "${data[@]}" \
      --max-tokens 16384 --device $dev --out "$WORK/prof-$dev" --no-plots | tail -3
    stamp "eval $dev"
    moekit eval "$model" "${evald[@]}" --data-range 0.5:1 --max-tokens 8192 --device $dev \
      --json >"$WORK/eval-$dev.json"
  done
  stamp "profile and eval cuda streamed (--max-memory 6MB: experts in groups)"
  moekit profile "$model" "${data[@]}" --max-tokens 16384 --device cuda \
    --max-memory 6MB --out "$WORK/prof-cuda-stream" --no-plots | tail -2
  moekit eval "$model" "${evald[@]}" --data-range 0.5:1 --max-tokens 8192 --device cuda \
    --max-memory 6MB --json >"$WORK/eval-cuda-stream.json"
  "$PY" benchmarks/compare_profiles.py "$WORK"/prof-cpu "$WORK"/prof-cuda \
    "$WORK"/prof-cuda-stream "$WORK"/eval-cpu.json "$WORK"/eval-cuda.json \
    "$WORK"/eval-cuda-stream.json
  stamp "prune --data on cuda (default settings)"
  timed moekit prune "$model" "${data[@]}" \
    --data-range 0:0.5 --ratio 0.5 --device cuda --out "$WORK/pruned-cuda" | tail -12
  stamp "merge (default, fit-layer) on cuda, usage weights from the cuda profile"
  timed moekit merge "$model" --stats "$WORK/prof-cuda" "${data[@]}" \
    --data-range 0:0.5 --ratio 0.5 --device cuda --out "$WORK/merged-cuda" | tail -6
  wait $bg; tail -3 "$WORK/prune-cpu.log"
  for out in pruned-cuda pruned-cpu merged-cuda; do
    [[ -d $WORK/$out ]] || continue
    stamp "eval $out vs source on the second halves"
    moekit eval "$WORK/$out" "${evald[@]}" --data-range 0.5:1 --max-tokens 8192 --seq-len 256 \
      --ref "$model" --device cuda --json >"$LOGS/eval-$out.json" && tail -c 600 "$LOGS/eval-$out.json"
  done
}

if [[ $PARTS == *cli* ]]; then
  export -f fixture_cli moekit stamp timed; export FIXTURES WORK LOGS PY
  timeout "${CLI_S:-160}" bash -c fixture_cli >"$LOGS/cli.log" 2>&1
  echo "cli rc=$?"; grep -E "^==|rc=|Error|error|compare" "$LOGS/cli.log" | tail -30
fi

speed() {
    stamp "bench_profile fixture cuda float32, bfloat16"
    "$PY" benchmarks/bench_profile.py --device cuda --stream --reps 7 --threads 4 \
      --model "$FIXTURES/models/mixtral-e16k2"
    "$PY" benchmarks/bench_profile.py --device cuda --reps 7 --threads 4 \
      --model "$FIXTURES/models/mixtral-e16k2" --dtype bfloat16
    stamp "synthetic 3.65 GB checkpoint"
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
import bench_stream as b; p = Path('$WORK/big'); p.mkdir(); print(b.write_checkpoint(p, 8, 2048, 4096, 8))"
    stamp "bench_profile synthetic bf16 cuda, with torch.profiler tables"
    "$PY" benchmarks/bench_profile.py --device cuda --stream --reps 3 --threads 4 \
      --dtype bfloat16 --model "$WORK/big" --batch-size 8 --seq-len 512 --torch-profile \
      >"$LOGS/torch-profile.log" 2>&1
    grep -E "^(model|plain|profile|ratio|streamed|throughput|== torch)" "$LOGS/torch-profile.log"
    stamp "bench_stream cuda (memory only)"
    "$PY" benchmarks/bench_stream.py --device cuda --reps 1 --tokens 4096 --seq-len 512 \
      --batch 8 --skip warm,cold --workdir "$WORK"
}

if [[ $PARTS == *speed* ]]; then
  export -f speed moekit stamp timed; export FIXTURES WORK LOGS PY
  timeout "${SPEED_S:-130}" bash -c speed >"$LOGS/speed.log" 2>&1
  echo "speed rc=$?"; tail -40 "$LOGS/speed.log"
fi
rm -rf "$WORK"
