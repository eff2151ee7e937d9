#!/usr/bin/env bash
# Multi-node GPU training of umg-jax under Slurm: writes an sbatch script (N nodes x G GPUs, one
# task per node driving all its GPUs) and submits it. Every task runs the same
# `python -m umg_jax.train --config ... --workdir ...`; the trainer calls
# `jax.distributed.initialize()`, which reads the cluster from Slurm (SLURM_JOB_ID, SLURM_NTASKS,
# SLURM_PROCID, SLURM_STEP_NODELIST). The job is requeueable: on preemption Slurm sends SIGTERM,
# the trainer saves a checkpoint and stops, and the requeued job resumes from the workdir; before
# the time limit the script stops the trainer the same way and requeues the job itself.
#
#   tools/slurm_gpu.sh --workdir gs://bucket/run [--flag=value ...] [-- extra trainer arguments]
#
# With --dry_run the script is written but not submitted, and the sbatch command is printed.
set -euo pipefail

PROG="tools/slurm_gpu.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: tools/slurm_gpu.sh --workdir RUN_DIR [flags] [-- extra arguments for umg_jax.train]

Writes an sbatch script (--script) and submits it with sbatch.

Flags (default in brackets):
  --workdir DIR          run directory every node reads and writes: gs://..., s3://... or an
                         absolute path on a filesystem all nodes share (required)
  --config FILE          training config, relative to --repo_dir [configs/vit_l.py]
  --nodes N              nodes; one task (process) per node [2]
  --gpus_per_node G      GPUs per node, all driven by the node's one process [8]
  --cpus_per_task C      CPUs per task (data workers) ['' = the cluster's default]
  --mem MEM              memory per node (sbatch --mem) [0 = all of the node's memory]
  --time T               time limit (sbatch --time) [24:00:00]
  --partition P          partition ['' = the cluster's default]
  --account A            account ['' = none]
  --qos Q                quality of service ['' = none]
  --job_name NAME        job name [umg-jax]
  --repo_dir DIR         the checkout on the shared filesystem [this checkout]
  --venv DIR             virtual environment with requirements-gpu.txt installed [REPO_DIR/.venv]
  --output PATTERN       job log (sbatch --output; requeued runs append) [slurm-%x-%j.out]
  --grace_s S            seconds before the time limit at which the trainer is asked to save and
                         stop, then the job requeued [300]
  --no_requeue           do not requeue on preemption or at the time limit
  --env KEY=VALUE        exported to the trainer (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0
  --script FILE          where the sbatch script is written [./JOB_NAME.sbatch]
  --dry_run              write the script, print the sbatch command, do not submit
  -h, --help             this help

Arguments after `--` go to the trainer, e.g.
  tools/slurm_gpu.sh --nodes 4 --workdir gs://my-bucket/runs/vit_l -- \
      --config.data.path=/shared/coco --config.batch_size=4096
EOF
}

# die, q (shell-quote a word), qjoin (quote and join words)
# shellcheck source=tools/launcher_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"

# ------------------------------------------------------------------ defaults (one per flag)
WORKDIR=""
CONFIG=configs/vit_l.py
NODES=2
GPUS_PER_NODE=8
CPUS_PER_TASK=""
MEM=0
TIME=24:00:00
PARTITION=""
ACCOUNT=""
QOS=""
JOB_NAME=umg-jax
REPO_DIR="$REPO_ROOT"
VENV=""
OUTPUT="slurm-%x-%j.out"
GRACE_S=300
REQUEUE=1
ENVS=()
SCRIPT=""
DRY_RUN=0
EXTRA=()

VALUE_FLAGS=" --workdir --config --nodes --gpus_per_node --cpus_per_task --mem --time --partition
  --account --qos --job_name --repo_dir --venv --output --grace_s --env --script "

set_flag() {  # set_flag --name value
  case "$1" in
    --workdir) WORKDIR="$2" ;;
    --config) CONFIG="$2" ;;
    --nodes) NODES="$2" ;;
    --gpus_per_node) GPUS_PER_NODE="$2" ;;
    --cpus_per_task) CPUS_PER_TASK="$2" ;;
    --mem) MEM="$2" ;;
    --time) TIME="$2" ;;
    --partition) PARTITION="$2" ;;
    --account) ACCOUNT="$2" ;;
    --qos) QOS="$2" ;;
    --job_name) JOB_NAME="$2" ;;
    --repo_dir) REPO_DIR="$2" ;;
    --venv) VENV="$2" ;;
    --output) OUTPUT="$2" ;;
    --grace_s) GRACE_S="$2" ;;
    --env) ENVS+=("$2") ;;
    --script) SCRIPT="$2" ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
}

ORIG_ARGS=("$@")
while (($#)); do
  case "$1" in
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --no_requeue) REQUEUE=0 ;;
    --dry_run=* | --no_requeue=*) die "${1%%=*} takes no value" ;;
    --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
    --*)
      [[ "$VALUE_FLAGS" == *[[:space:]]"$1"[[:space:]]* ]] || die "unknown flag $1 (see --help)"
      (($# >= 2)) && [[ "$2" != --* ]] || die "$1 needs a value (write $1=VALUE for a value that starts with --)"
      set_flag "$1" "$2"
      shift ;;
    *) die "unexpected argument '$1' (arguments for the trainer go after --)" ;;
  esac
  shift
done

# ------------------------------------------------------------------ checks
[[ -n "$WORKDIR" ]] || die "--workdir is required: gs://..., s3://... or an absolute path on a filesystem all nodes share"
case "$WORKDIR" in
  gs://?* | s3://?* | /*) ;;
  *) die "--workdir '$WORKDIR': the nodes share no working directory; use gs://..., s3://... or an absolute path on a shared filesystem" ;;
esac
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES': a positive integer"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node '$GPUS_PER_NODE': a positive integer"
[[ -z "$CPUS_PER_TASK" || "$CPUS_PER_TASK" =~ ^[1-9][0-9]*$ ]] ||
  die "--cpus_per_task '$CPUS_PER_TASK': a positive integer"
[[ "$GRACE_S" =~ ^[0-9]+$ ]] || die "--grace_s '$GRACE_S': seconds (an integer)"
[[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job_name '$JOB_NAME': letters, digits, _ . -"
[[ "$REPO_DIR" == /* ]] || die "--repo_dir '$REPO_DIR': an absolute path (on the shared filesystem)"
VENV="${VENV:-$REPO_DIR/.venv}"
[[ "$VENV" == /* ]] || die "--venv '$VENV': an absolute path (on the shared filesystem)"
e=""
for e in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env '$e': expected KEY=VALUE"
done
SCRIPT="${SCRIPT:-$PWD/$JOB_NAME.sbatch}"

# One process per node drives all of the node's GPUs. jax.distributed.initialize() would
# otherwise give each Slurm task only GPU number SLURM_LOCALID (one process per GPU).
device_ids="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"

# ------------------------------------------------------------------ the sbatch script
{
  echo "#!/bin/bash"
  echo "# Written by $PROG: $(qjoin "$0" "${ORIG_ARGS[@]}")"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  [[ -n "$CPUS_PER_TASK" ]] && echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --mem=$MEM"
  echo "#SBATCH --exclusive"
  echo "#SBATCH --time=$TIME"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  [[ -n "$QOS" ]] && echo "#SBATCH --qos=$QOS"
  echo "#SBATCH --output=$OUTPUT"
  echo "#SBATCH --open-mode=append"
  if ((REQUEUE)); then
    echo "#SBATCH --requeue"
    echo "#SBATCH --signal=B:USR1@$GRACE_S"
  else
    echo "#SBATCH --no-requeue"
  fi
  cat <<EOF
set -euo pipefail

cd $(q "$REPO_DIR")
. $(q "$VENV/bin/activate")
export JAX_LOCAL_DEVICE_IDS=$device_ids
EOF
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    echo "export $(q "$e")"
  done
  cat <<'EOF'
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $(date -u)"

requeue=0
interrupted=0
# Near the time limit (--signal=B:USR1): every trainer finishes its step, saves and exits; then
# the job is requeued and resumes from the workdir.
on_usr1() {
  echo "time limit near: asking the trainers to save and stop, then requeueing"
  requeue=1
  interrupted=1
  scancel --signal=TERM "$SLURM_JOB_ID"  # the job's steps (the trainers), not this script
}
# Preemption / scancel: Slurm sends SIGTERM to the trainers too; wait here while they save.
on_term() {
  echo "SIGTERM: waiting for the trainers to save"
  interrupted=1
}
trap on_usr1 USR1
trap on_term TERM

EOF
  srun=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
  # Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task.
  [[ -n "$CPUS_PER_TASK" ]] && srun+=("--cpus-per-task=$CPUS_PER_TASK")
  echo "set +e"
  echo "$(qjoin "${srun[@]}" python -m umg_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" \
    ${EXTRA[@]+"${EXTRA[@]}"}) &"
  cat <<'EOF'
srun_pid=$!
status=-1
while :; do
  interrupted=0
  wait "$srun_pid"
  s=$?
  # 127: srun's status was collected on the previous round (the trap ran just after it).
  if ((s == 127 && status >= 0)); then break; fi
  status=$s
  # A trap ends `wait` early (status > 128) while srun runs on: wait again.
  ((interrupted)) || break
done
echo "trainers exited with status $status: $(date -u)"
if ((requeue)); then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
EOF
} >"$SCRIPT.tmp"
mv "$SCRIPT.tmp" "$SCRIPT"
chmod +x "$SCRIPT"
echo "$PROG: wrote $SCRIPT" >&2

if ((DRY_RUN)); then
  qjoin sbatch "$SCRIPT"
  echo
else
  sbatch "$SCRIPT"
fi
