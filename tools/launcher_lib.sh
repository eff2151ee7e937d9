# Shell helpers shared by tools/tpu_pod.sh and tools/slurm_gpu.sh (sourced, not run).
# The sourcing script sets PROG (its name in messages) first.

die() {  # usage error: one line on stderr, exit status 2
  echo "$PROG: $*" >&2
  exit 2
}

q() {  # shell-quote one word (like python's shlex.quote, so the output round-trips)
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

qjoin() {  # shell-quote every argument, joined by spaces
  local out="" a
  for a in "$@"; do out+="$(q "$a") "; done
  printf '%s' "${out% }"
}
