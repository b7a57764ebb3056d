#!/usr/bin/env bash
# TPU VM pod lifecycle for dpo-jax through gcloud; every host runs the same `dpo-jax train` (jax.distributed auto).
#
#   launch/tpu_pod.sh [--dry-run] ACTION NAME ZONE [ACCELERATOR] [-- dpo-jax train args...]
#   ACTION: plan | create | setup | copy | run | stop | delete
#
# `plan` (on this machine, no TPU: pip install -e ".[tpu]") compiles the run for ACCELERATOR and says whether it
# fits and how fast the compiler expects it to be; `create` given the train args plans first and stops if it does
# not fit, before any TPU is paid for.
# `stop` sends SIGTERM: each host finishes its step, the run saves a checkpoint and exits 0; `run` again resumes.
# --dry-run (or DRY_RUN=1) prints the gcloud commands instead of running them.
set -euo pipefail

dry=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
if [[ $# -lt 3 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
action=$1 name=$2 zone=$3
shift 3
accelerator=v4-32
if [[ $# -gt 0 && "$1" != "--" ]]; then accelerator=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
train_args=("$@")
version=${TPU_VERSION:-tpu-ubuntu2204-base}
repo_dir='~/dpo_jax'
# Overlap collectives with compute (the settings MaxText uses on v4/v5p).
libtpu_args="--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"

run() {
  if [[ "$dry" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

plan_run() {
  [[ ${#train_args[@]} -gt 0 ]] || { echo "plan needs: -- --config configs/x.py ..." >&2; exit 2; }
  run dpo-jax plan "${train_args[@]}" --topology "$accelerator" --out "plan_${name}.json"
}

case "$action" in
  plan)
    plan_run ;;
  create)
    [[ ${#train_args[@]} -gt 0 ]] && plan_run  # a plan that does not fit exits 1: nothing is created
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accelerator" --version "$version" ;;
  setup)
    ssh_all "python3 -m pip install -U pip && python3 -m pip install 'jax[tpu]' && python3 -m pip install -e $repo_dir" ;;
  copy)
    archive=$(mktemp -u /tmp/dpo_jax.XXXXXX.tar.gz)
    run tar czf "$archive" --exclude=.git --exclude=.venv --exclude=runs -C "$(dirname "$0")/.." .
    run gcloud compute tpus tpu-vm scp "$archive" "$name:/tmp/dpo_jax.tar.gz" --zone "$zone" --worker=all
    ssh_all "mkdir -p $repo_dir && tar xzf /tmp/dpo_jax.tar.gz -C $repo_dir" ;;
  run)
    [[ ${#train_args[@]} -gt 0 ]] || { echo "run needs: -- --config configs/x.py ..." >&2; exit 2; }
    quoted=$(printf ' %q' "${train_args[@]}")
    ssh_all "cd $repo_dir && export LIBTPU_INIT_ARGS='$libtpu_args' && nohup dpo-jax train$quoted --config.distributed.mode=auto > train.log 2>&1 &" ;;
  stop)
    ssh_all "pkill -TERM -f 'dpo-jax train' || true" ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *)
    echo "unknown action '$action' (plan | create | setup | copy | run | stop | delete)" >&2; exit 2 ;;
esac
