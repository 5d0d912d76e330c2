#!/usr/bin/env bash
# The CUDA path of moekit on a GPU machine, in one run: the test suite with CUDA visible (every
# command whose --device defaults to auto runs there), the fixture's profile / eval / prune --data
# / merge on cuda against the same commands on the CPU, and the speed benchmarks of profile and
# eval (in memory and streamed). Logs go to $LOGS (default ./cuda-logs).
#
#   FIXTURES=../shared/fixtures bash benchmarks/cuda_check.sh [tests,cli,speed]
#
# Each part runs under its own time limit (TESTS_S, CLI_S, SPEED_S seconds).
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
  timeout "${TESTS_S:-150}" "$PY" -m pytest -q -p no:cacheprovider -n 12 --timeout 120 tests \
    >"$LOGS/tests.log" 2>&1
  echo "tests rc=$?"; tail -5 "$LOGS/tests.log"
fi

fixture_cli() {
  local model=$FIXTURES/models/mixtral-e16k2 text=$FIXTURES/text d data=() evald=()
  for f in "$text"/*.txt; do
    d=$(basename "$f" .txt); data+=(--data "$d=$f"); evald+=(--data "$d=$f")
  done
  for dev in cuda cpu; do
    stamp "profile $dev"
    timed moekit profile "$model" "${data[@]}" \
      --max-tokens 16384 --device $dev --out "$WORK/prof-$dev" --no-plots
    stamp "profile $dev streamed"
    moekit profile "$model" "${data[@]}" --max-tokens 16384 --device $dev \
      --max-memory 6MB --out "$WORK/prof-$dev-stream" --no-plots
    stamp "eval $dev"
    moekit eval "$model" "${evald[@]}" --data-range 0.5:1 --max-tokens 8192 --device $dev \
      --json >"$WORK/eval-$dev.json"
    moekit eval "$model" "${evald[@]}" --data-range 0.5:1 --max-tokens 8192 --device $dev \
      --max-memory 6MB --json >"$WORK/eval-$dev-stream.json"
  done
  "$PY" benchmarks/compare_profiles.py "$WORK"/prof-cpu "$WORK"/prof-cuda "$WORK"/prof-cpu-stream \
    "$WORK"/prof-cuda-stream "$WORK"/eval-cpu.json "$WORK"/eval-cuda.json \
    "$WORK"/eval-cuda-stream.json "$WORK"/eval-cpu-stream.json
  stamp "prune --data on cuda (default settings), then on cpu in the background"
  (moekit prune "$model" "${data[@]}" --data-range 0:0.5 --ratio 0.5 --device cpu \
     --out "$WORK/pruned-cpu" >"$WORK/prune-cpu.log" 2>&1; echo "cpu prune rc=$?" \
     >>"$WORK/prune-cpu.log") &
  local bg=$!
  timed moekit prune "$model" "${data[@]}" \
    --data-range 0:0.5 --ratio 0.5 --device cuda --out "$WORK/pruned-cuda"
  stamp "merge (default) on cuda"
  timed moekit merge "$model" "${data[@]}" \
    --data-range 0:0.5 --ratio 0.5 --device cuda --out "$WORK/merged-cuda"
  wait $bg; cat "$WORK/prune-cpu.log" | tail -3
  for out in pruned-cuda pruned-cpu merged-cuda; do
    stamp "eval $out vs source on the second halves"
    moekit eval "$WORK/$out" "${evald[@]}" --data-range 0.5:1 --max-tokens 8192 --seq-len 256 \
      --ref "$model" --device cuda --json >"$LOGS/eval-$out.json" && tail -c 600 "$LOGS/eval-$out.json"
  done
}

if [[ $PARTS == *cli* ]]; then
  export -f fixture_cli moekit stamp timed; export FIXTURES WORK LOGS PY
  timeout "${CLI_S:-200}" bash -c fixture_cli >"$LOGS/cli.log" 2>&1
  echo "cli rc=$?"; grep -E "^==|rc=|Error|error|compare" "$LOGS/cli.log" | tail -30
fi

speed() {
    stamp "bench_profile fixture cuda"
    "$PY" benchmarks/bench_profile.py --device cuda --stream --reps 9 --threads 4 \
      --model "$FIXTURES/models/mixtral-e16k2"
    "$PY" benchmarks/bench_profile.py --device cuda --stream --reps 9 --threads 4 \
      --model "$FIXTURES/models/mixtral-e16k2" --dtype bfloat16
    stamp "synthetic 3.65 GB checkpoint"
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
import bench_stream as b; p = Path('$WORK/big'); p.mkdir(); print(b.write_checkpoint(p, 8, 2048, 4096, 8))"
    stamp "bench_profile synthetic bf16 cuda"
    "$PY" benchmarks/bench_profile.py --device cuda --stream --reps 5 --threads 4 \
      --dtype bfloat16 --model "$WORK/big" --batch-size 8 --seq-len 512
    stamp "eval synthetic: in memory vs streamed (1.2 GB VRAM budget), cuda"
    for mm in auto 1200MB; do
      timed moekit eval "$WORK/big" \
        --data "s=sample_data/en_docs.txt" --max-tokens 16384 --seq-len 512 --batch-size 8 \
        --device cuda --max-memory $mm --json | grep -E '"(loss|tokens|mode|reason)"' 
    done
    stamp "bench_stream cuda"
    "$PY" benchmarks/bench_stream.py --device cuda --reps 3 --tokens 4096 --seq-len 512 \
      --batch 8 --workdir "$WORK"
}

if [[ $PARTS == *speed* ]]; then
  export -f speed moekit stamp timed; export FIXTURES WORK LOGS PY
  timeout "${SPEED_S:-200}" bash -c speed >"$LOGS/speed.log" 2>&1
  echo "speed rc=$?"; tail -40 "$LOGS/speed.log"
fi
rm -rf "$WORK"
