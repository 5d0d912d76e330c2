#!/usr/bin/env bash
# The moekit tour on a small MoE trained here from sample_data/ (under three minutes on 2 idle
# x86-64 cores):
# build -> inspect -> profile -> prune -> eval -> report. Everything lands in demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
M=.venv/bin/moekit
OUT=demo_out
DATA=(--data bible=sample_data/en_bible.txt --data code=sample_data/code_py.txt
      --data docs=sample_data/en_docs.txt)

if [ ! -f "$OUT/model/config.json" ]; then
  echo "== 1. training a small Mixtral (8 experts, top-2) on sample_data/ (600 seeded steps, ~1 min)"
  .venv/bin/python scripts/build_demo_model.py --out "$OUT/model" --steps "${DEMO_STEPS:-600}"
fi

echo "== 2. inspect: what is this checkpoint?"
$M inspect "$OUT/model"

echo "== 3. profile: route the first 80% of each text, per domain"
$M profile "$OUT/model" "${DATA[@]}" --data-range 0:0.8 --seq-len 128 --max-tokens 60000 \
  --out "$OUT/profile" --overwrite

echo "== 4. prune: drop 25% of the experts of every layer by the default criterion (EAN)"
$M prune "$OUT/model" --stats "$OUT/profile" --ratio 0.25 --out "$OUT/pruned" --overwrite

echo "== 5. eval: what did it cost, on the held-out last 10% of each text?"
$M eval "$OUT/pruned" --ref "$OUT/model" "${DATA[@]}" --data-range 0.9:1 --seq-len 128 \
  --export "$OUT/eval.csv"

echo "== 6. report"
$M inspect "$OUT/pruned"
echo "Report with plots: $OUT/profile/report.md (PNG files beside it), or one file: $OUT/profile/report.html"
echo "Pruned checkpoint: $OUT/pruned (model card README.md, moekit_provenance.json)"
