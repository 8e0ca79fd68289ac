#!/usr/bin/env bash
# The experiment that justifies distil: a teacher pretrained by distil on the English Wikipedia
# leads, a student of half its depth distilled from it, and the same student trained on the
# same tokens with the MLM loss alone (same initialisation from the teacher's layers, and also
# from random). Writes experiments/wiki-distill.md. Needs ../shared. About an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
D=./target/release/distil
# Stage 1 (skipped when runs/wiki2/teacher exists) and the distilled student.
$D run recipes/wiki-student.yaml --resume
# Baselines: the same student, the same batches (same seed), MLM loss only.
$D run recipes/wiki-student.yaml --resume \
  --set training.output_dir=runs/wiki2/student-mlm-only \
  --set distill.losses.soft=0 --set distill.losses.cosine=0 --set distill.losses.hard=1
$D run recipes/wiki-student.yaml --resume \
  --set training.output_dir=runs/wiki2/student-mlm-only-random-init \
  --set distill.student_init=random \
  --set distill.losses.soft=0 --set distill.losses.cosine=0 --set distill.losses.hard=1
# The same student from random initialisation, distilled (against the random-init MLM baseline).
$D run recipes/wiki-student.yaml --resume \
  --set training.output_dir=runs/wiki2/student-distilled-random-init \
  --set distill.student_init=random
# All five on the same held-out text and masks.
$D eval runs/wiki2/teacher runs/wiki2/student-distilled runs/wiki2/student-mlm-only \
  runs/wiki2/student-distilled-random-init runs/wiki2/student-mlm-only-random-init \
  --data ../shared/corpora/en/wikipedia-leads.txt --block-size 128 --eval-fraction 0.02 \
  --max-batches 40 --batch-size 16 --json experiments/wiki-distill.json
