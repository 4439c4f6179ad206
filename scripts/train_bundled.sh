#!/usr/bin/env bash
# Reproduce the bundled default world model (mmbench2_lab/assets/bundled/) with the project's own CLI.
#   bash scripts/train_bundled.sh [WORK_DIR]       # about 1.5 hours on a 2-core CPU, no GPU
# Data: random-policy episodes (64x64, 200 agent steps) of 12 tasks in 6 domains. Held out of training on
# purpose: walker-run (dmcontrol), og-point-var1 (an MMBench2 unseen variant of the ogbench point maze) and
# lunarlander-hover (box2d), so the model can be seen hallucinating on them.
# Each stage runs on one core with one thread (OMP_NUM_THREADS=1), as the model card's figures were measured.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/bundled}
LAB=".venv/bin/mmbench2-lab"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TRAIN_TASKS="cartpole-swingup reacher-easy og-point-maze atari-pong cheetah-run walker-walk mujoco-halfcheetah
  mujoco-inverted-pendulum bipedal-walker-flat atari-boxing og-point-arena mw-reach"
HELD_OUT_TASKS="walker-run og-point-var1 lunarlander-hover"
MINUTES=${MINUTES:-20}
COLLECT="--policy random --size 64 --max-steps 200 --workers 2 --resume"

$LAB collect --tasks $TRAIN_TASKS --episodes 8 --seed 0 $COLLECT --out "$WORK/data/train"
$LAB collect --tasks $TRAIN_TASKS --episodes 3 --seed 1000 $COLLECT --out "$WORK/data/val"
$LAB collect --tasks $HELD_OUT_TASKS --episodes 4 --seed 1000 $COLLECT --out "$WORK/data/held_out"

# The tiny preset's CPU recipe (lr 5e-4, loss on all patches, cosine decay), longer and with MAE p ~ U(0, 0.5).
$LAB train-tokenizer --preset tiny --data "$WORK/data/train" --val "$WORK/data/val" --out "$WORK/tokenizer" \
  --max-minutes "$MINUTES" --steps 4800 --no-progress \
  --set tokenizer_train.eval_every=1000000 tokenizer_train.mae_p_max=0.5
$LAB train-dynamics --preset tiny --data "$WORK/data/train" --val "$WORK/data/val" \
  --tokenizer "$WORK/tokenizer/tokenizer" --out "$WORK/dynamics" --max-minutes "$MINUTES" --steps 3400 --no-progress \
  --set dynamics_train.eval_every=1000000 dynamics_train.eval_windows=48 dynamics_train.seq_len=16 \
  dynamics_train.batch_size=8 dynamics_train.lr=0.001 dynamics_train.lr_decay=cosine \
  dynamics_train.bootstrap_start=1000 sampler.ctx_window=16

# Figures for the model card: calibration on held-out episodes of trained tasks and on the held-out tasks.
$LAB calibrate --model "$WORK/dynamics/world_model" --data "$WORK/data/val" --out "$WORK/calibration_val.csv" \
  --sequences 300 --seeds 2
$LAB calibrate --model "$WORK/dynamics/world_model" --data "$WORK/data/held_out" \
  --out "$WORK/calibration_held_out.csv" --sequences 120 --seeds 2
$LAB calibration-report "$WORK/calibration_val.csv"
$LAB calibration-report "$WORK/calibration_held_out.csv" --per-task
echo "trained model: $WORK/dynamics/world_model (copy it to mmbench2_lab/assets/bundled/ to ship it)"
