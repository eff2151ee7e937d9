#!/usr/bin/env bash
# Cloud TPU VM slices for umg-jax: create (or reuse) a slice, install the project on every worker,
# mount the training records with Cloud Storage FUSE, and run the same
# `python -m umg_jax.train --config ... --workdir gs://...` on every host (`--worker=all`).
#
#   tools/tpu_pod.sh SUBCOMMAND [--flag=value ...] [-- extra arguments of the python module]
#
# Every command that would change something is printed instead of run with --dry_run (one per
# line, shell-quoted). Run `tools/tpu_pod.sh --help` for the flags and their defaults.
set -euo pipefail

PROG="tools/tpu_pod.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: tools/tpu_pod.sh SUBCOMMAND [flags] [-- extra arguments for the python module]

Subcommands (run from your workstation; gcloud must be logged in):
  create    create the TPU VM slice, or reuse it when one of that name exists
  install   copy the repo at --commit to every worker and pip-install it into a venv
  mount     install gcsfuse and mount --data_bucket read-only at --mount_point on every worker
  train     python -m umg_jax.train --config CONFIG --workdir WORKDIR on every worker
  resume    the same command as train: the trainer resumes from the latest checkpoint in WORKDIR
  eval      python -m umg_jax.evaluate --workdir WORKDIR on one worker (--eval_worker)
  export    python -m umg_jax.interop.export_torch WORKDIR --format F --out OUT on one worker
  delete    delete the slice (the run directory on the bucket stays)
  status    describe the slice (state, health, workers)

Flags (default in brackets):
  --name NAME              TPU VM name [umg-pod]
  --zone ZONE              zone [us-west4-a]
  --project PROJECT        GCP project ['' = gcloud's configured project]
  --accelerator_type TYPE  slice type, e.g. v5litepod-256, v4-128, v6e-64 [v5litepod-256]
  --runtime_version V      TPU VM software version [v2-alpha-tpuv5-lite]
                           (v4: tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                   create a Spot slice (can be preempted any time; resume after it)
  --preemptible            create a preemptible slice (legacy form of --spot)
  --service_account EMAIL  service account of the workers ['' = Compute Engine default]
  --scopes LIST            OAuth scopes of the workers (bucket access; IAM still decides)
                           [https://www.googleapis.com/auth/cloud-platform]
  --repo_url URL           git URL the workers clone ['' = copy this checkout (git archive)]
  --commit REV             commit to install [HEAD of this checkout]
  --remote_dir DIR         checkout on each worker, relative to its home [umg-jax]
  --venv DIR               virtual environment on each worker, relative to its home [umg-venv]
  --python VERSION         Python of the venv (uv downloads it if the image lacks it) [3.12]
  --data_bucket gs://B[/P] bucket (optionally a folder in it) with the training records ['']
  --mount_point DIR        where the bucket is mounted on every worker [/mnt/umg-data]
  --config FILE            training config, relative to the repo [configs/vit_l.py]
  --workdir gs://B/RUN     run directory shared by all hosts (required by train/resume/eval/
                           export; a pod has no shared disk, so it must be a gs:// path) ['']
  --detach                 train/resume: run under nohup, output in --log on each worker
  --log FILE               log of a detached run, relative to each worker's home [umg-train.log]
  --eval_worker N          worker that runs eval / export [0]
  --platforms LIST         JAX_PLATFORMS of eval / export ['cpu': one host of a multi-host
                           slice cannot open the TPU alone; '' = jax's default, for a
                           single-host slice]
  --export_format F        open_clip or hf [open_clip]
  --export_out PATH        export destination [WORKDIR/export-FORMAT]
  --dry_run                print the commands instead of running them
  -h, --help               this help

Arguments after `--` go to the python module, e.g.
  tools/tpu_pod.sh train --workdir gs://my-bucket/runs/vit_l -- \
      --config.data.path=/mnt/umg-data/coco --config.batch_size=22528
EOF
}

# die, q (shell-quote a word), qjoin (quote and join words)
# shellcheck source=tools/launcher_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/launcher_lib.sh"

run() {  # run a command, or print it with --dry_run
  if ((DRY_RUN)); then
    qjoin "$@"
    echo
  else
    "$@"
  fi
}

# ------------------------------------------------------------------ defaults (one per flag)
NAME=umg-pod
ZONE=us-west4-a
PROJECT=""
ACCELERATOR_TYPE=v5litepod-256
RUNTIME_VERSION=v2-alpha-tpuv5-lite
SPOT=0
PREEMPTIBLE=0
SERVICE_ACCOUNT=""
SCOPES=https://www.googleapis.com/auth/cloud-platform
REPO_URL=""
COMMIT=""
REMOTE_DIR=umg-jax
VENV=umg-venv
PYTHON=3.12
DATA_BUCKET=""
MOUNT_POINT=/mnt/umg-data
CONFIG=configs/vit_l.py
WORKDIR=""
DETACH=0
LOG=umg-train.log
EVAL_WORKER=0
PLATFORMS=cpu
EXPORT_FORMAT=open_clip
EXPORT_OUT=""
DRY_RUN=0
EXTRA=()

set_flag() {  # set_flag --name value
  case "$1" in
    --name) NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --accelerator_type) ACCELERATOR_TYPE="$2" ;;
    --runtime_version) RUNTIME_VERSION="$2" ;;
    --service_account) SERVICE_ACCOUNT="$2" ;;
    --scopes) SCOPES="$2" ;;
    --repo_url) REPO_URL="$2" ;;
    --commit) COMMIT="$2" ;;
    --remote_dir) REMOTE_DIR="$2" ;;
    --venv) VENV="$2" ;;
    --python) PYTHON="$2" ;;
    --data_bucket) DATA_BUCKET="$2" ;;
    --mount_point) MOUNT_POINT="$2" ;;
    --config) CONFIG="$2" ;;
    --workdir) WORKDIR="$2" ;;
    --log) LOG="$2" ;;
    --eval_worker) EVAL_WORKER="$2" ;;
    --platforms) PLATFORMS="$2" ;;
    --export_format) EXPORT_FORMAT="$2" ;;
    --export_out) EXPORT_OUT="$2" ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
}

# ------------------------------------------------------------------ arguments
SUB="${1:-}"
case "$SUB" in
  -h | --help) usage; exit 0 ;;
  create | install | mount | train | resume | eval | export | delete | status) shift ;;
  "" | -*) die "missing subcommand (the first argument): create, install, mount, train, resume, eval, export, delete or status (see --help)" ;;
  *) die "unknown subcommand '$SUB': create, install, mount, train, resume, eval, export, delete or status (see --help)" ;;
esac
while (($#)); do
  case "$1" in
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --detach) DETACH=1 ;;
    --dry_run=* | --spot=* | --preemptible=* | --detach=*)
      die "${1%%=*} takes no value" ;;
    --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
    --*)
      case "$1" in  # a value flag must be known before it may take the next word
        --name | --zone | --project | --accelerator_type | --runtime_version | \
          --service_account | --scopes | --repo_url | \
          --commit | --remote_dir | --venv | --python | --data_bucket | --mount_point | \
          --config | --workdir | --log | --eval_worker | --platforms | --export_format | \
          --export_out) ;;
        *) die "unknown flag $1 (see --help)" ;;
      esac
      (($# >= 2)) && [[ "$2" != --* ]] || die "$1 needs a value (write $1=VALUE for a value that starts with --)"
      set_flag "$1" "$2"
      shift ;;
    *) die "unexpected argument '$1' (arguments for the python module go after --)" ;;
  esac
  shift
done

# ------------------------------------------------------------------ checks (before any gcloud)
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME': lowercase letters, digits and hyphens, starting with a letter"
[[ -n "$ZONE" ]] || die "--zone is empty"
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator_type '$ACCELERATOR_TYPE': expected a slice type such as v5litepod-256, v4-128, v6e-64"
((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible exclude each other"
[[ "$EVAL_WORKER" =~ ^[0-9]+$ ]] || die "--eval_worker '$EVAL_WORKER': a worker index (0, 1, ...)"
case "$EXPORT_FORMAT" in open_clip | hf) ;; *) die "--export_format '$EXPORT_FORMAT': open_clip or hf" ;; esac
case "$SUB" in
  train | resume | eval | export)
    [[ -n "$WORKDIR" ]] || die "$SUB needs --workdir gs://BUCKET/RUN (the run directory every host shares)"
    [[ "$WORKDIR" == gs://?* ]] ||
      die "--workdir '$WORKDIR': the hosts of a TPU slice share no disk; use a gs:// run directory"
    ;;
  mount)
    [[ -n "$DATA_BUCKET" ]] || die "mount needs --data_bucket gs://BUCKET[/FOLDER]"
    [[ "$DATA_BUCKET" =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]] ||
      die "--data_bucket '$DATA_BUCKET': expected gs://BUCKET or gs://BUCKET/FOLDER"
    [[ "$MOUNT_POINT" == /* ]] || die "--mount_point '$MOUNT_POINT': an absolute path"
    ;;
esac

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=("--project=$PROJECT")

ssh_all() {  # ssh_all WORKER REMOTE_COMMAND: one shell command on the given worker(s)
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$1" "--command=$2"
}

# The python environment on a worker: home, venv, checkout (relative paths are from home).
ACTIVATE="cd && . $(q "$VENV")/bin/activate && cd $(q "$REMOTE_DIR")"

python_cmd() {  # python_cmd ENV_PREFIX ARGS...: the quoted python command of the remote shell
  local prefix="$1"
  shift
  printf '%s' "$prefix$(qjoin python -m "$@" ${EXTRA[@]+"${EXTRA[@]}"})"
}

# ------------------------------------------------------------------ subcommands
case "$SUB" in
  create)
    # Reuse the slice when it exists (describe succeeds); create it otherwise.
    create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
            "--version=$RUNTIME_VERSION")
    [[ -n "$SERVICE_ACCOUNT" ]] && create+=("--service-account=$SERVICE_ACCOUNT")
    [[ -n "$SCOPES" ]] && create+=("--scopes=$SCOPES")
    ((SPOT)) && create+=(--spot)
    ((PREEMPTIBLE)) && create+=(--preemptible)
    describe=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" "--format=value(state)")
    if ((DRY_RUN)); then
      run "${describe[@]}"
      run "${create[@]}"
    elif state="$("${describe[@]}" 2>/dev/null)"; then
      echo "$PROG: reusing TPU VM $NAME in $ZONE (state $state)" >&2
      [[ "$state" == READY ]] || echo "$PROG: a slice in state $state cannot run; a preempted Spot slice must be deleted and created again" >&2
    else
      run "${create[@]}"
    fi
    ;;

  install)
    if [[ -z "$COMMIT" ]]; then
      COMMIT="$(git -C "$REPO_ROOT" rev-parse HEAD)"
    fi
    # uv provides the Python the pinned jax needs (>= 3.11) on any TPU VM image.
    setup="{ test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    setup+=" && cd && ~/.local/bin/uv venv --seed --allow-existing --python $(q "$PYTHON") $(q "$VENV")"
    pip="$ACTIVATE && pip install -r requirements.txt -r requirements-tpu.txt"
    pip+=" && pip install --no-deps -e . && python -c 'import umg_jax'"
    # v5e and newer start the TPU runtime much faster with transparent hugepages (jax warns).
    thp="sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled'"
    if [[ -z "$REPO_URL" ]]; then
      sha="$(git -C "$REPO_ROOT" rev-parse --verify --quiet "$COMMIT^{commit}")" ||
        die "--commit '$COMMIT' is not a commit of $REPO_ROOT"
      COMMIT="$sha"
      if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
        echo "$PROG: note: uncommitted changes are not installed (only commit $COMMIT is)" >&2
      fi
      tarball="/tmp/umg-jax-$COMMIT.tar.gz"
      run git -C "$REPO_ROOT" archive --format=tar.gz "--prefix=$REMOTE_DIR/" -o "$tarball" "$COMMIT"
      run "${GCLOUD[@]}" scp "$tarball" "$NAME:" "${WHERE[@]}" --worker=all
      fetch="cd && rm -rf $(q "$REMOTE_DIR") && tar -xzf $(q "umg-jax-$COMMIT.tar.gz")"
    else
      fetch="cd && rm -rf $(q "$REMOTE_DIR") && git clone -q $(q "$REPO_URL") $(q "$REMOTE_DIR")"
      fetch+=" && git -C $(q "$REMOTE_DIR") checkout -q --detach $(q "$COMMIT")"
    fi
    ssh_all all "$thp && $fetch && $setup && $pip"
    ;;

  mount)
    path="${DATA_BUCKET#gs://}"
    bucket="${path%%/*}"
    folder=""
    [[ "$path" == */* ]] && folder="${path#*/}" && folder="${folder%/}"
    gcsfuse=(gcsfuse --implicit-dirs -o ro)
    [[ -n "$folder" ]] && gcsfuse+=("--only-dir=$folder")
    gcsfuse+=("$bucket" "$MOUNT_POINT")
    # gcsfuse from Google's apt repository, when the image lacks it.
    get="command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc]"
    get+=" https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\""
    get+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
    get+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    get+=" | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
    get+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }"
    mnt="sudo mkdir -p $(q "$MOUNT_POINT") && sudo chown \"\$USER\" $(q "$MOUNT_POINT")"
    mnt+=" && { mountpoint -q $(q "$MOUNT_POINT") || $(qjoin "${gcsfuse[@]}"); }"
    ssh_all all "$get && $mnt"
    ;;

  train | resume)
    # resume is train: the trainer continues from the latest checkpoint in WORKDIR.
    cmd="$(python_cmd "" umg_jax.train "--config=$CONFIG" "--workdir=$WORKDIR")"
    if ((DETACH)); then
      cmd="cd && nohup bash -c $(q "$ACTIVATE && $cmd") > $(q "$LOG") 2>&1 < /dev/null &"
    else
      cmd="$ACTIVATE && $cmd"
    fi
    ssh_all all "$cmd"
    ;;

  eval | export)
    env=""
    [[ -n "$PLATFORMS" ]] && env="JAX_PLATFORMS=$(q "$PLATFORMS") "
    if [[ "$SUB" == eval ]]; then
      cmd="$(python_cmd "$env" umg_jax.evaluate "--workdir=$WORKDIR")"
    else
      out="${EXPORT_OUT:-${WORKDIR%/}/export-$EXPORT_FORMAT}"
      cmd="$(python_cmd "$env" umg_jax.interop.export_torch "$WORKDIR" "--format=$EXPORT_FORMAT" "--out=$out")"
    fi
    ssh_all "$EVAL_WORKER" "$ACTIVATE && $cmd"
    ;;

  delete)
    run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;

  status)
    run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}"
    ;;
esac
