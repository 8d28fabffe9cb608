#!/usr/bin/env bash
# For a machine with at least 2 GPUs (not run by the tests, which have no GPU): train.py under every launch
# configuration of hub_configs/accelerate/ on the tiny synthetic recipe, with a kill and a resume under FSDP2, and the
# final model loaded back. Usage, from the repository root after `make setup` (and `pip install deepspeed` for the
# DeepSpeed part): bash bench/launch_check_gpu.sh [output folder]
set -euo pipefail
OUT=${1:-outputs/launch-check}
PY=.venv/bin/python
ACCELERATE=.venv/bin/accelerate
$PY -m modeling_taskexpert.data synthetic --output-dir data/synthetic --skip-if-exists
COMMON=(--config hub_configs/synthetic-tiny.yaml --max_steps 40 --save_steps 20 --eval_steps 0 --logging_steps 10
        --per_device_train_batch_size 4 --final_edge_modes "[approximate]")
run() {  # run NAME CONFIG [extra train.py arguments]
  local name=$1 config=$2; shift 2
  echo "== $name ($config)"
  $ACCELERATE launch --config_file "hub_configs/accelerate/$config" train.py "${COMMON[@]}" \
      --output_dir "$OUT/$name" "$@"
  $PY -c "from modeling_taskexpert import TaskExpertForDensePrediction as M; M.from_pretrained('$OUT/$name'); print('$name: the final model loads')"
}
run ddp ddp.yaml --overwrite_output_dir true
run fsdp2 fsdp2.yaml --overwrite_output_dir true
run fsdp2-streamed fsdp2.yaml --overwrite_output_dir true --streaming true
# FSDP2, killed after its step-20 checkpoint and resumed: the losses must equal those of the uninterrupted fsdp2 run.
rm -rf "$OUT/fsdp2-resumed"
$ACCELERATE launch --config_file hub_configs/accelerate/fsdp2.yaml train.py "${COMMON[@]}" --output_dir "$OUT/fsdp2-resumed" &
PID=$!
until [ -f "$OUT/fsdp2-resumed/checkpoints/step_00000020/manifest.json" ]; do sleep 1; done
kill -9 -- -$PID 2>/dev/null || pkill -9 -f "output_dir $OUT/fsdp2-resumed" || true
sleep 5
run fsdp2-resumed fsdp2.yaml --resume_from_checkpoint latest
$PY - "$OUT" <<'PYTHON'
import json, sys
out = sys.argv[1]
def losses(name):
    return [r["loss"] for r in map(json.loads, open(f"{out}/{name}/train_log.jsonl")) if r["kind"] == "train"]
assert losses("fsdp2") == losses("fsdp2-resumed"), (losses("fsdp2"), losses("fsdp2-resumed"))
print("fsdp2: the resumed run's losses equal the uninterrupted run's")
PYTHON
if $PY -c "import deepspeed" 2>/dev/null; then
  run deepspeed-zero2 deepspeed_zero2.yaml --overwrite_output_dir true
else
  echo "deepspeed is not installed: skipped deepspeed_zero2.yaml (pip install deepspeed)"
fi
