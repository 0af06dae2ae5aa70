#!/usr/bin/env bash
# Set up and run the main job: 2 CPU processes under torchrun on the embedded default
# (synthetic classification data, an MLP, SGD). Extra arguments are Hydra overrides.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
run_dir="outputs/demo-$(date +%Y-%m-%d_%H-%M-%S)"
torchrun --standalone --nproc_per_node=2 -m distsgd.train trainer.device=cpu "hydra.run.dir=$run_dir" "$@"
echo
echo "run directory: $run_dir"
echo "curves:        tensorboard --logdir $run_dir/tensorboard --host 127.0.0.1"
