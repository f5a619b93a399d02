#!/usr/bin/env bash
# Launch instructor_jax training on a Cloud TPU VM or pod slice: create or reuse the TPU, put this
# package on every worker, start the same `python -m instructor_jax.train` on all of them, stream
# the log. `--dry-run` prints the commands instead. Run `bash launch_tpu.sh --help` for the flags.
#
# Written for bash 3.2 as well (macOS laptops launch pods too): no mapfile, no associative
# arrays, and empty arrays are expanded as ${a[@]+"${a[@]}"} because 3.2's `set -u` rejects "${a[@]}".
set -euo pipefail

readonly PROG=launch_tpu.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly ROOT
# Remote paths live in the TPU user's home, the one place writable on every worker without sudo.
# The tilde is kept literal on purpose: the workers' shells expand it, not this one.
# shellcheck disable=SC2088
readonly R_CODE='~/instructor_jax' R_TGZ='~/instructor_jax.tgz' R_LOG='~/instructor_jax_train.log' \
  R_PID='~/instructor_jax_train.pid' R_RC='~/instructor_jax_train.rc' R_VENV='~/instructor_jax_venv'
# The TPU images run Ubuntu 22.04's Python 3.10, and JAX needs 3.11 or newer since 0.7: pip there
# would quietly install a JAX years older than the ones this project is tested with. So the package
# goes into a virtual environment of its own Python, which uv fetches.
readonly R_PY="$R_VENV/bin/python"

usage() {
  cat <<EOF
Usage: bash $PROG --name NAME --zone ZONE --workdir gs://BUCKET/DIR --gin-file FILE [options] [-- TRAIN_ARGS...]

Creates (or reuses) the TPU VM / pod slice NAME, copies this package to every worker, installs it
with 'uv pip install -e ".[train]" "jax[tpu]"' into a virtual environment of Python 3.12 (~/instructor_jax_venv;
the TPU images' own Python is too old for current JAX), starts the same training command on all
workers (JAX joins the hosts by itself through jax.distributed.initialize()) and streams worker 0's log.

Required:
  --name NAME               TPU name (lowercase letters, digits, hyphens; starts with a letter)
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --workdir gs://B/DIR      checkpoints, metrics and config; must be on GCS, since every worker writes there
  --gin-file FILE           repeatable; path relative to the repository root, e.g. gin_configs/runs/instructor_medi.gin

TPU:
  --project PROJECT         default: gcloud's configured project
  --accelerator-type TYPE   e.g. v4-32, v5litepod-256, v5p-128, v6e-64; needed only to create the TPU
  --runtime-version VER     default by TPU generation: v4 and older tpu-ubuntu2204-base,
                            v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot | --preemptible    cheaper capacity that can be taken away; training resumes from --workdir
  --queued                  create through a queued resource and wait until it is ACTIVE
  --delete-after            delete the TPU once training has ended on every worker (success or not),
                            or when a TPU this launch created fails before training starts
  --relaunch N              when training ends with the TPU preempted, create it again, install and
                            resume from --workdir, up to N times (default 0: say so and stop)

Training:
  --gin-binding BINDING     repeatable, e.g. --gin-binding "MEDI_PATH='gs://b/medi.json'"
  -- TRAIN_ARGS...          anything after -- is appended to the training command as is

Code:
  (default)                 tar the working tree (git-tracked and untracked, not ignored) and scp it
  --repo-url URL            git clone URL on every worker instead
  --repo-ref REF            branch, tag or commit to check out after cloning
  --skip-install            reuse the copy already installed on a reused TPU (fast restart)
  --python VERSION          the workers' Python for the virtual environment (default 3.12; >= 3.11)

Other:
  --log-worker N|all        whose log to stream (default 0); 'all' prefixes each line with the host
  --detach                  start training and return without streaming the log
  --dry-run                 print every command ('+ ' per line) and run nothing; needs no gcloud
  -h, --help                this help

Ctrl-C while the log streams stops only the stream: training runs on under nohup. With
--delete-after the launcher then waits for training to end before deleting the TPU; a second
Ctrl-C leaves it running (the launcher says how to delete it).
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# POSIX single quotes, so a printed command reads the same in bash, sh, zsh and Python's shlex;
# `printf %q` can emit $'...' forms that sh and shlex do not understand.
shq() {
  local safe='^[A-Za-z0-9_@%+=:,./-]+$' q="'\\''" escaped
  # No quotes inside ${//}: bash before 4.3 keeps them literally there.
  escaped=${1//\'/$q}
  if [[ $1 =~ $safe ]]; then printf '%s' "$1"; else printf "'%s'" "$escaped"; fi
}

shjoin() {
  local out='' a
  for a in "$@"; do out+="${out:+ }$(shq "$a")"; done
  printf '%s' "$out"
}

# A command line as it would run: stdout in a dry run (so it can be piped or diffed), stderr else.
show() {
  if ((DRY_RUN)); then printf '+ %s\n' "$1"; else printf '+ %s\n' "$1" >&2; fi
}

# Dry-run-only remarks between the commands ("only if ...").
remark() { if ((DRY_RUN)); then printf '# %s\n' "$*"; fi; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

run() {
  show "$(shjoin "$@")"
  if ((!DRY_RUN)); then "$@"; fi
}

on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

parse_args() {
  while (($#)); do
    case $1 in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --name | --zone | --project | --accelerator-type | --runtime-version | --workdir | --gin-file | \
        --gin-binding | --repo-url | --repo-ref | --log-worker | --python | --relaunch)
        (($# >= 2)) || die "$1 expects a value; see --help"
        case $1 in
          --name) NAME=$2 ;;
          --zone) ZONE=$2 ;;
          --project) PROJECT=$2 ;;
          --accelerator-type) ACCEL=$2 ;;
          --runtime-version) RUNTIME=$2 ;;
          --workdir) WORKDIR=$2 ;;
          --gin-file) GIN_FILES+=("$2") ;;
          --gin-binding) GIN_BINDINGS+=("$2") ;;
          --repo-url) REPO_URL=$2 ;;
          --repo-ref) REPO_REF=$2 ;;
          --log-worker) LOG_WORKER=$2 ;;
          --python) PYTHON_VERSION=$2 ;;
          --relaunch) RELAUNCH=$2 ;;
        esac
        shift 2 ;;
      --spot) SPOT=1; shift ;;
      --preemptible) PREEMPTIBLE=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --delete-after) DELETE_AFTER=1; shift ;;
      --skip-install) SKIP_INSTALL=1; shift ;;
      --detach) DETACH=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      *) die "unknown argument '$1'; see --help (training flags go after --)" ;;
    esac
  done
}

# Gin files are read by the workers from their copy of the repository, so they must be paths
# inside it; a local copy can be checked now instead of failing minutes later on the pod.
check_gin_files() {
  local i g
  for i in "${!GIN_FILES[@]}"; do
    g=${GIN_FILES[$i]}
    if [[ $g == /* ]]; then
      [[ $g == "$ROOT"/* ]] || die "--gin-file $g is outside the repository $ROOT; the workers only get the repository. Copy it under gin_configs/ and pass the relative path"
      g=${g#"$ROOT"/}
      GIN_FILES[i]=$g
    fi
    if [[ -z $REPO_URL && ! -f $ROOT/$g ]]; then
      die "--gin-file $g: no such file under $ROOT (expected a path relative to the repository root, e.g. gin_configs/runs/instructor_medi.gin)"
    fi
  done
}

# Each worker has its own disk: a local MEDI_PATH must exist on every one of them (a gs:// one is
# fetched by each worker). Only a warning: the file may well have been copied there already.
check_medi_path() {
  local b path medi_re="^[[:space:]]*MEDI_PATH[[:space:]]*=[[:space:]]*[\"']?([^\"']*)"
  for b in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do
    if [[ $b =~ $medi_re ]]; then
      path=${BASH_REMATCH[1]}
      if [[ $path != gs://* ]]; then
        warn "MEDI_PATH '$path' is not on GCS: every worker needs that file at that path (each has its own disk); a gs:// MEDI_PATH is fetched by every worker"
      fi
    fi
  done
}

validate() {
  [[ -n $NAME ]] || die "--name is required (the TPU to create or reuse); see --help"
  [[ -n $ZONE ]] || die "--zone is required (e.g. us-central2-b); see --help"
  [[ -n $WORKDIR ]] || die "--workdir is required (a gs:// directory for checkpoints); see --help"
  ((${#GIN_FILES[@]})) || die "at least one --gin-file is required (e.g. gin_configs/runs/instructor_medi.gin); see --help"
  local name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$' accel_re='^v[0-9][a-z0-9]*-[0-9]+$' worker_re='^(all|[0-9]+)$'
  [[ $NAME =~ $name_re ]] || die "--name '$NAME': expected lowercase letters, digits and hyphens, starting with a letter"
  [[ $WORKDIR == gs://?* ]] || die "--workdir '$WORKDIR': expected a gs:// path; each worker has its own disk, so a local path would split the checkpoint across hosts"
  [[ -z $ACCEL || $ACCEL =~ $accel_re ]] || die "--accelerator-type '$ACCEL': expected a type like v4-32 or v5litepod-256"
  [[ $LOG_WORKER =~ $worker_re ]] || die "--log-worker '$LOG_WORKER': expected a worker number or 'all'"
  [[ $RELAUNCH =~ ^[0-9]+$ ]] || die "--relaunch '$RELAUNCH': expected a number of relaunches (0 or more)"
  ((!(DETACH && RELAUNCH))) || die "--relaunch needs the launcher to wait for the end; drop --detach"
  local py_re='^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$'
  [[ $PYTHON_VERSION =~ $py_re ]] || die "--python '$PYTHON_VERSION': expected a Python version >= 3.11, e.g. 3.12 (JAX needs 3.11 or newer)"
  ((!(SPOT && PREEMPTIBLE))) || die "--spot and --preemptible are exclusive; pick one (--spot is the newer)"
  ((!(QUEUED && PREEMPTIBLE))) || die "queued resources take --spot, not --preemptible"
  ((!(DETACH && DELETE_AFTER))) || die "--delete-after needs the launcher to wait for the end; drop --detach"
  [[ -z $REPO_REF || -n $REPO_URL ]] || die "--repo-ref needs --repo-url (the local copy is sent as it is)"
  check_gin_files
  check_medi_path
  LOC=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=(--project="$PROJECT"); fi
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH; install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use --dry-run"
  fi
}

# The software image a new TPU of this type boots (--runtime-version overrides it).
default_runtime() {
  case $1 in
    v5litepod-* | v5e-*) printf v2-alpha-tpuv5-lite ;;
    v5p-*) printf v2-alpha-tpuv5 ;;
    v6e-*) printf v2-alpha-tpuv6e ;;
    *) printf tpu-ubuntu2204-base ;;
  esac
}

create_tpu() {
  local capacity=()
  if [[ -z $RUNTIME ]]; then RUNTIME=$(default_runtime "$ACCEL"); fi
  if ((SPOT)); then capacity=(--spot); elif ((PREEMPTIBLE)); then capacity=(--preemptible); fi
  if [[ -z $ACCEL ]]; then
    if ((DRY_RUN)); then remark "(that would fail here: creating needs --accelerator-type)"; return; fi
    die "there is no TPU named $NAME in $ZONE; pass --accelerator-type (e.g. v4-32) to create it"
  fi
  MADE=1 DELETED=0  # from here on this launch has a TPU (or a request for one) to clean up
  if ((!QUEUED)); then
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" \
      --version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}
    return
  fi
  run gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}" --node-id="$NAME" \
    --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" '--format=value(state.state)')
  remark "repeated every 60 s until the queued resource is ACTIVE:"
  show "$(shjoin "${describe[@]}")"
  ((!DRY_RUN)) || return 0
  local state
  while state=$("${describe[@]}") && [[ $state != ACTIVE ]]; do
    case $state in
      FAILED | SUSPENDED) die "queued resource $NAME is $state; see why: gcloud compute tpus queued-resources describe $(shjoin "$NAME" "${LOC[@]}")" ;;
    esac
    note "queued resource $NAME is $state; checking again in 60 s (Ctrl-C stops waiting, not the request)"
    sleep 60
  done
  [[ $state == ACTIVE ]] || die "could not read the state of queued resource $NAME (gcloud's message is above)"
}

# Reuse only a READY TPU of the requested type: anything else would fail later, on ssh, less clearly.
# TPU_STATE and TPU_ACCEL of TPU $NAME; fails (gcloud's message in $TMP/describe.err) where gcloud
# cannot describe it, e.g. none of that name exists (`describe_said_not_found`).
describe_tpu() {
  local out
  out=$(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" '--format=value(state,acceleratorType)' \
    2>"$TMP/describe.err") || return
  read -r TPU_STATE TPU_ACCEL <<<"$out"
  TPU_ACCEL=${TPU_ACCEL##*/}
}

describe_said_not_found() {
  local err
  err=$(cat "$TMP/describe.err")
  [[ $err == *NOT_FOUND* || $err == *"not found"* ]]
}

ensure_tpu() {
  show "$(shjoin gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" '--format=value(state,acceleratorType)')"
  if ((DRY_RUN)); then
    remark "only if no TPU named $NAME exists yet (an existing one is reused when READY; a PREEMPTED one is deleted first):"
    create_tpu
    return
  fi
  if describe_tpu; then
    local state=$TPU_STATE accel=$TPU_ACCEL
    if [[ $state == PREEMPTED ]]; then
      # A preempted spot/preemptible TPU VM never becomes READY again: the only way on is a new one.
      local kind=on-demand
      if ((SPOT)); then kind=spot; elif ((PREEMPTIBLE)); then kind=preemptible; fi
      note "TPU $NAME ($accel) was preempted; deleting it and creating it again as $kind capacity (training resumes from $WORKDIR)"
      if ((SKIP_INSTALL)); then
        note "installing anyway: the new TPU has nothing installed (--skip-install ignored)"
        SKIP_INSTALL=0
      fi
      ACCEL=${ACCEL:-$accel}
      delete_tpu
      create_tpu
      return
    fi
    [[ $state == READY ]] || die "TPU $NAME exists but is $state, not READY; wait for it, or delete it (gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE) and rerun"
    [[ -z $ACCEL || $accel == "$ACCEL" ]] || die "TPU $NAME is a $accel, not the requested $ACCEL; pick another --name or delete it first"
    note "reusing READY TPU $NAME ($accel)"
    ACCEL=${ACCEL:-$accel}  # what a relaunch after a preemption creates
    CREATED=0
    return
  fi
  describe_said_not_found || die "could not describe TPU $NAME (not a 'not found' answer, so not creating one): $(cat "$TMP/describe.err")"
  create_tpu
}

list_tree() {
  local f
  # git ls-files --cached still lists files deleted from the working tree; tar would fail on them.
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [[ -e $ROOT/$f || -L $ROOT/$f ]]; then printf '%s\0' "$f"; fi
  done
}

# The working tree, uncommitted edits included, is what the user means to run; .gitignore'd
# outputs (venvs, workdirs) are left behind. Without git, the usual build junk is excluded by name.
ship_local_tree() {
  local tgz=$TMP/instructor_jax.tgz
  if [[ -e $ROOT/.git ]]; then
    show "$(shjoin git -C "$ROOT" ls-files -z --cached --others --exclude-standard) > $(shq "$TMP/files")"
    if ((!DRY_RUN)); then list_tree >"$TMP/files"; fi
    # COPYFILE_DISABLE: macOS's tar would add ._* files and extended-attribute headers.
    COPYFILE_DISABLE=1 run tar -czf "$tgz" -C "$ROOT" --null -T "$TMP/files"
  else
    COPYFILE_DISABLE=1 run tar -czf "$tgz" -C "$ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' .
  fi
  if ((!DRY_RUN)); then
    # Untracked files that git does not ignore (a local MEDI copy, say) travel to every worker too.
    local mib=$(($(wc -c <"$tgz") >> 20))
    if ((mib >= 100)); then
      warn "the copy of $ROOT for the workers is $mib MiB compressed (untracked files that are not git-ignored are included); add large files to .gitignore, or put data on GCS"
    fi
  fi
  run gcloud compute tpus tpu-vm scp "$tgz" "$NAME:instructor_jax.tgz" "${LOC[@]}" --worker=all
}

install_on_workers() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    fetch="rm -rf $R_CODE && git clone -q $(shq "$REPO_URL") $R_CODE"
    if [[ -n $REPO_REF ]]; then fetch+=" && git -C $R_CODE checkout -q $(shq "$REPO_REF")"; fi
  else
    ship_local_tree
    fetch="rm -rf $R_CODE && mkdir -p $R_CODE && tar -xzf $R_TGZ -C $R_CODE"
  fi
  # uv goes into the system Python's user site (PIP_BREAK_SYSTEM_PACKAGES: newer images mark that
  # Python externally managed; `python3 -m uv` needs no PATH entry), then makes the environment with
  # a Python of the version asked for, downloading it where the image has none. The versions are
  # printed so a log says what ran.
  local versions="import importlib.metadata as m, platform, socket; print(socket.gethostname() + ': Python ' + platform.python_version() + ', ' + ', '.join(p + ' ' + m.version(p) for p in ('jax', 'jaxlib', 'flax', 'orbax-checkpoint')))"
  on_workers all "$GUARD; $fetch && cd $R_CODE && export PIP_BREAK_SYSTEM_PACKAGES=1 && python3 -m pip install -q --user -U uv && rm -rf $R_VENV && python3 -m uv venv -q --python $(shq "$PYTHON_VERSION") $R_VENV && python3 -m uv pip install -q --python $R_PY -e '.[train]' 'jax[tpu]' && $R_PY -c $(shq "$versions")"
}

start_training() {
  local train=(-m instructor_jax.train) g
  for g in "${GIN_FILES[@]}"; do train+=(--gin_file="$g"); done
  for g in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do train+=(--gin_bindings="$g"); done
  train+=(--workdir="$WORKDIR")
  train+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  # setsid + nohup: the run survives the ssh session and sits in its own process group, so one
  # `kill -TERM -- -PID` reaches python (which checkpoints on SIGTERM). The wrapper records the
  # pid and the exit status, which the log stream and the final check wait on. The same signal
  # reaches the wrapper: with a trap set, bash runs it only once its foreground command (python,
  # saving its checkpoint) has exited, so the wrapper outlives the save and records python's own
  # status. (A background python would start with SIGINT ignored.)
  local wrapper="echo \$\$ > $R_PID; trap : TERM INT; \"\$@\"; echo \$? > $R_RC"
  on_workers all "$GUARD; $VENV_CHECK; cd $R_CODE || exit 1; rm -f $R_PID $R_RC; setsid nohup bash -c $(shq "$wrapper") instructor_jax_train $R_PY $(shjoin "${train[@]}") > $R_LOG 2>&1 < /dev/null &"
  STARTED=1
}

print_attach_help() {
  local ssh
  ssh="gcloud compute tpus tpu-vm ssh $(shjoin "$NAME" "${LOC[@]}")"
  note "follow the log:  $ssh --worker=0 --command=$(shq "tail -n +1 -F $R_LOG")"
  note "stop training:   $ssh --worker=all --command=$(shq "kill -TERM -- -\$(cat $R_PID)")"
}

# Waits on every worker, not just the streamed one, so --delete-after never cuts a host short.
stream_and_wait() {
  local follow="for i in \$(seq 120); do [ -s $R_PID ] && break; sleep 1; done; [ -s $R_PID ] || { echo \"\$(hostname): training did not start; see $R_LOG\" >&2; exit 1; }; tail -n +1 -F --pid=\"\$(cat $R_PID)\" $R_LOG"
  if [[ $LOG_WORKER == all ]]; then follow+=" 2>&1 | sed -u \"s/^/[\$(hostname)] /\""; fi
  note "streaming the log of worker $LOG_WORKER; Ctrl-C stops the stream, not the training."
  print_attach_help
  # gcloud ends itself with SIGINT on Ctrl-C, which would end this script too (and skip
  # --delete-after): with a trap, bash only notes it once gcloud has exited.
  local interrupted=0
  trap 'interrupted=1' INT
  on_workers "$LOG_WORKER" "$follow" || ((interrupted)) || note "the log stream ended with an error; checking every worker's status"
  default_int_trap
  if ((interrupted)); then
    if ((!DELETE_AFTER)); then
      note "log stream stopped; training goes on on $NAME (the commands above follow or stop it)"
      STREAM_STOPPED=1
      return 0
    fi
    note "log stream stopped; waiting for training to end on every worker, then deleting $NAME (--delete-after). Ctrl-C again leaves the TPU running."
  fi
  on_workers all "while kill -0 \"\$(cat $R_PID)\" 2>/dev/null; do sleep 5; done; rc=\$(cat $R_RC 2>/dev/null || echo 'none (killed?)'); echo \"\$(hostname): training exited with status \$rc\"; if [ \"\$rc\" = 75 ]; then echo \"\$(hostname): (75: stopped early with a checkpoint, on a signal or a preemption notice; rerun the same command to resume)\"; fi; [ \"\$rc\" = 0 ]"
}

delete_tpu() {
  DELETED=1
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

# Whether the TPU was taken away: a preempted TPU VM never comes back; a queued resource whose node
# is gone was preempted too (its request stays, SUSPENDED, until deleted).
preempted() {
  if describe_tpu; then
    [[ $TPU_STATE == PREEMPTED ]]
  else
    ((QUEUED)) && describe_said_not_found
  fi
}

# Bash killed by SIGINT runs the EXIT trap with $? = 0: a real run exits with 130 instead, so that
# on_exit knows the launch was interrupted (Ctrl-C during an install, or while waiting to delete).
default_int_trap() {
  if ((DRY_RUN)); then trap - INT; else trap 'exit 130' INT; fi
}

# Runs however the script ends. With --delete-after, a TPU this launch created is deleted when
# training never started (a failed install, a refused start): nothing on it is worth keeping. One
# whose training started is never deleted behind the user's back (a second Ctrl-C while waiting):
# the command to do it is printed instead.
on_exit() {
  local status=$?
  rm -rf "$TMP"
  if ((DELETE_AFTER && !DELETED)); then
    local delete
    delete="gcloud compute tpus tpu-vm delete $(shjoin "$NAME" "${LOC[@]}")"
    if ((QUEUED)); then delete="gcloud compute tpus queued-resources delete $(shjoin "$NAME" "${LOC[@]}") --force"; fi
    if ((MADE && !STARTED && status != 0)); then
      note "training never started on $NAME, which this launch created; deleting it (--delete-after)"
      delete_tpu || warn "deleting $NAME failed; it is still billed: $delete"
    elif ((status != 0)); then
      warn "TPU $NAME is left running (and billed); delete it when done: $delete"
    fi
  fi
}

main() {
  NAME='' ZONE='' PROJECT='' ACCEL='' RUNTIME='' WORKDIR='' REPO_URL='' REPO_REF='' LOG_WORKER=0
  SPOT=0 PREEMPTIBLE=0 QUEUED=0 DELETE_AFTER=0 SKIP_INSTALL=0 DETACH=0 DRY_RUN=0 CREATED=1 PYTHON_VERSION=3.12
  RELAUNCH=0
  STARTED=0 DELETED=0 STREAM_STOPPED=0 MADE=0
  GIN_FILES=() GIN_BINDINGS=() EXTRA_ARGS=() LOC=()
  parse_args "$@"
  validate
  # Refuse to reinstall under, or start a second run beside, a live one: two processes cannot share
  # the TPU chips, and deleting the code under a running job breaks its imports.
  VENV_CHECK="[ -x $R_PY ] || { echo \"\$(hostname): no $R_VENV: this TPU was set up by an older launch_tpu.sh, or not at all; rerun without --skip-install\" >&2; exit 1; }"
  GUARD="if [ -s $R_PID ] && kill -0 \"\$(cat $R_PID)\" 2>/dev/null; then echo \"\$(hostname): training (pid \$(cat $R_PID)) is still running; stop it first: kill -TERM -- -\$(cat $R_PID)\" >&2; exit 1; fi"
  if ((DRY_RUN)); then
    TMP="${TMPDIR:-/tmp}/launch_tpu.XXXXXX"
    remark "$PROG --dry-run: the commands a real run would execute, in order; nothing was run."
  else
    TMP=$(mktemp -d)
    trap on_exit EXIT
    default_int_trap
  fi

  ensure_tpu
  if ((SKIP_INSTALL)); then
    ((DRY_RUN || !CREATED)) || die "--skip-install on a TPU just created: nothing is installed there yet; drop --skip-install"
    # Checked on every worker before any starts: one refusing while the others start would leave
    # those waiting for it in jax.distributed.initialize() (the install step checks the same).
    on_workers all "$GUARD; $VENV_CHECK"
  else
    install_on_workers
  fi
  start_training
  if ((DETACH)); then
    note "training started on every worker of $NAME; checkpoints and metrics go to $WORKDIR"
    print_attach_help
    return 0
  fi
  local status=0 relaunched=0
  stream_and_wait || status=$?
  while ((status != 0 && !STREAM_STOPPED && !DRY_RUN)) && preempted; do
    if ((relaunched == RELAUNCH)); then
      note "TPU $NAME was preempted; rerun the same command to resume from $WORKDIR (or pass --relaunch N to do it unattended)"
      break
    fi
    relaunched=$((relaunched + 1))
    note "TPU $NAME was preempted; relaunch $relaunched of $RELAUNCH: creating it again, installing, resuming from $WORKDIR"
    STARTED=0  # a new TPU: the clean-up deletes it if training does not start there
    delete_tpu
    create_tpu
    install_on_workers
    start_training
    status=0
    stream_and_wait || status=$?
  done
  if ((DRY_RUN || STREAM_STOPPED)); then
    :
  elif ((status == 0)); then
    note "training finished on every worker; results in $WORKDIR"
  else
    note "training failed or was stopped on at least one worker (statuses above); each worker keeps its log in $R_LOG"
  fi
  if ((DELETE_AFTER)); then delete_tpu; fi
  return "$status"
}

main "$@"
