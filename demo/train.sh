#!/usr/bin/env bash
# Reproduces the shipped demo model (modeling_mlmamba/demo_model) from nothing, with the project's own recipes:
#   synthetic data → untrained small ML-Mamba + BPE tokenizer → recipes/finetune.py --mode full → recipes/evaluate.py
#
#   demo/train.sh [RUN_DIR]        (default runs/shapes; data goes to $DATA, default data/shapes)
#
# Environment: PYTHON (default python), DATA, WORKERS (DataLoader workers, default 4), and EPOCHS, LR, BATCH,
# BUILD_ARGS (extra demo/build_model.py options) (defaults: the shipped model's). On one GPU the whole script takes a few minutes; on a 2-core CPU, hours.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/shapes}
PYTHON=${PYTHON:-python}
DATA=${DATA:-data/shapes}
WORKERS=${WORKERS:-4}
EPOCHS=${EPOCHS:-10}
LR=${LR:-5e-4}
BATCH=${BATCH:-64}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. data: train seed 0 (20000 images: 30% asked for a description, the others 1-4 questions), validation seed 1 (300), test seed 2 (600)
[ -f "$DATA/test.jsonl" ] || $PYTHON demo/make_data.py --out "$DATA"
# 2. the untrained model (weights seed 0) and its tokenizer, trained on the training conversations
$PYTHON demo/build_model.py --data "$DATA/train.json" --out "$RUN/init" --seed 0 ${BUILD_ARGS:-}
# 3. training: everything but the (random, frozen) vision towers
$PYTHON recipes/finetune.py --model "$RUN/init" --mode full --data "$DATA/train.json" --image_folder "$DATA/images" \
    --output_dir "$RUN/train" --num_epochs "$EPOCHS" --learning_rate "$LR" --global_batch_size "$BATCH" \
    --per_device_batch_size "$BATCH" --seed 0 --no_gradient_checkpointing --num_workers "$WORKERS" \
    --save_every 1000000 --log_every 20
# 4. evaluation: validation, then test (greedy, exact match)
for split in validation test; do
    $PYTHON recipes/evaluate.py --model "$RUN/train/merged" --data "$DATA/$split.jsonl" --image_folder "$DATA/images" \
        --output "$RUN/$split-predictions.jsonl" --batch_size 64 --max_new_tokens 8 --dtype float32
    $PYTHON - "$RUN/$split-predictions.jsonl" <<'EOF'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by_type = collections.defaultdict(list)
for r in rows:
    by_type[r.get("type", "all")].append(r["exact_match"])
for t, hits in sorted(by_type.items()):
    print(f"  {t:<16} {100 * sum(hits) / len(hits):6.2f}% of {len(hits)}")
EOF
done
