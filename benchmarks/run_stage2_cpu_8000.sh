#!/bin/bash
# Continuation of run_stage2_cpu.sh for the shipped model: the same command with --max_train_steps 8000, resumed exactly
# from checkpoint-4000 (optimiser, EMA, LR schedule, RNG and data position restored). For the shipped model it
# was stopped with SIGTERM at step 6,967 (a clean stop: checkpoint, pipeline and validation grid written).
STEPS=8000 LOG=outputs/stage2-text-kl-f4-8000.log exec bash "$(dirname "$0")/run_stage2_cpu.sh"
