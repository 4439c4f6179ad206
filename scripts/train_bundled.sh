#!/usr/bin/env bash
# Reproduce the bundled default world model (mmbench2_lab/assets/bundled/) with the project's own CLI.
#   bash scripts/train_bundled.sh [WORK_DIR]       # ~1 hour on a 2-core CPU, no GPU
# Data: random-policy episodes (64x64, 200 agent steps) of 15 tasks in 6 domains; walker-run and
# lunarlander-hover are held out of training on purpose, so the model can be seen hallucinating on them.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/bundled}
LAB=".venv/bin/mmbench2-lab"
TRAIN_TASKS="cheetah-run walker-walk reacher-easy pendulum-swingup cartpole-swingup finger-spin
  mujoco-halfcheetah mujoco-inverted-pendulum lunarlander-land bipedal-walker-flat atari-pong atari-boxing
  og-point-maze mw-reach mw-push"
HELD_OUT_TASKS="walker-run lunarlander-hover"
MINUTES=${MINUTES:-14}

$LAB collect --tasks $TRAIN_TASKS --episodes 6 --policy random --size 64 --max-steps 200 --workers 2 \
  --seed 0 --out "$WORK/data/train" --resume
$LAB collect --tasks $TRAIN_TASKS --episodes 2 --policy random --size 64 --max-steps 200 --workers 2 \
  --seed 1000 --out "$WORK/data/val" --resume
$LAB collect --tasks $HELD_OUT_TASKS --episodes 4 --policy random --size 64 --max-steps 200 --workers 2 \
  --seed 1000 --out "$WORK/data/held_out" --resume

$LAB train-tokenizer --preset tiny --data "$WORK/data/train" --val "$WORK/data/val" --out "$WORK/tokenizer" \
  --max-minutes "$MINUTES" --steps 20000 --no-progress --set tokenizer_train.eval_every=1000000 \
  tokenizer_train.batch_size=32 tokenizer_train.seq_len=1 tokenizer_train.lr=0.002 tokenizer_train.mae_p_max=0.5
$LAB train-dynamics --preset tiny --data "$WORK/data/train" --val "$WORK/data/val" \
  --tokenizer "$WORK/tokenizer/tokenizer" --out "$WORK/dynamics" --max-minutes "$MINUTES" --steps 20000 --no-progress \
  --set dynamics_train.eval_every=1000000 dynamics_train.seq_len=16 dynamics_train.batch_size=8 \
  dynamics_train.lr=0.001 dynamics_train.bootstrap_start=1000 sampler.ctx_window=16

# Figures for the model card: calibration on held-out episodes of trained tasks and on the held-out tasks.
$LAB calibrate --model "$WORK/dynamics/world_model" --data "$WORK/data/val" --out "$WORK/calibration_val.csv" \
  --sequences 300 --seeds 2
$LAB calibrate --model "$WORK/dynamics/world_model" --data "$WORK/data/held_out" \
  --out "$WORK/calibration_held_out.csv" --sequences 60
echo "trained model: $WORK/dynamics/world_model (copy it to mmbench2_lab/assets/bundled/ to ship it)"
