"""launch_tpu.sh: dry-run output, argument errors, shellcheck, and a real run against a fake gcloud."""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch_tpu.sh"
BASH = shutil.which("bash")

# A binding with spaces and both quote kinds: it must reach python's argv byte for byte.
NASTY = """MEDI_PATH='gs://b/medi data.json' # it's "quoted\""""
BASE = ["--name", "my-pod", "--zone", "us-central2-b", "--workdir", "gs://b/run 1",
        "--repo-url", "https://example.com/instructor_jax.git"]
GINS = ["gin_configs/runs/instructor_medi.gin", "gin_configs/models/gtr_base.gin"]
VENV_PY = "~/instructor_jax_venv/bin/python"
EXPECTED_TRAIN = [
  VENV_PY, "-m", "instructor_jax.train", f"--gin_file={GINS[0]}", f"--gin_file={GINS[1]}",
  f"--gin_bindings={NASTY}", "--gin_bindings=TRAIN_STEPS = 10", "--workdir=gs://b/run 1", "--extra=1"]
TRAIN_FLAGS = ["--gin-file", GINS[0], "--gin-file", GINS[1], "--gin-binding", NASTY,
               "--gin-binding=TRAIN_STEPS = 10", "--", "--extra=1"]


def launch(*args: str, script: pathlib.Path = SCRIPT, env: dict | None = None, timeout: float = 30):
  # No gcloud on this PATH: a dry run must not need it.
  run_env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
  return subprocess.run([BASH, str(script), *args], capture_output=True, text=True, env=run_env,
                        timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def remote(cmd: list[str]) -> str:
  (value,) = [a.removeprefix("--command=") for a in cmd if a.startswith("--command=")]
  return value


def train_argv(remote_cmd: str) -> list[str]:
  """The python argv inside the remote start command, as the worker's shell will split it."""
  words = shlex.split(remote_cmd)
  start = words.index("instructor_jax_train") + 1  # the wrapper's $0; python follows
  return words[start:words.index(">", start)]


pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def test_another_python_for_the_environment():
  res = launch("--dry-run", *BASE, "--gin-file", GINS[0], "--python", "3.13")
  assert res.returncode == 0 and "python3 -m uv venv -q --python 3.13 ~/instructor_jax_venv" in res.stdout


def test_dry_run_prints_every_step_and_round_trips_the_train_command():
  res = launch("--dry-run", *BASE, "--project", "p1", "--accelerator-type", "v5litepod-256", "--spot",
               "--delete-after", *TRAIN_FLAGS)
  assert res.returncode == 0, res.stderr
  cmds = commands(res.stdout)
  verbs = [c[:5] for c in cmds]
  assert verbs[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  create = cmds[1]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod"]
  for flag in ["--zone=us-central2-b", "--project=p1", "--accelerator-type=v5litepod-256",
               "--version=v2-alpha-tpuv5-lite", "--spot"]:
    assert flag in create
  ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  install, start, follow, wait = ssh
  assert "--worker=all" in install and "--worker=all" in start and "--worker=all" in wait
  assert "--worker=0" in follow
  assert "git clone -q https://example.com/instructor_jax.git ~/instructor_jax" in remote(install)
  # The TPU images' Python 3.10 is too old for current JAX: a uv-made environment of 3.12 instead.
  assert ("python3 -m uv venv -q --python 3.12 ~/instructor_jax_venv && python3 -m uv pip install -q --python "
          f"{VENV_PY} -e '.[train]' 'jax[tpu]' && {VENV_PY} -c ") in remote(install)
  assert train_argv(remote(start)) == EXPECTED_TRAIN
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod"]


def test_local_copy_tars_the_tree_and_scps_it_to_every_worker(tmp_path):
  # A copy outside git takes the plain-tar path; the gin file must exist in it.
  shutil.copy(SCRIPT, tmp_path / "launch_tpu.sh")
  (tmp_path / "gin_configs").mkdir()
  (tmp_path / "gin_configs" / "run.gin").write_text("TRAIN_STEPS = 1\n")
  res = launch("--dry-run", "--name", "p", "--zone", "z", "--workdir", "gs://b/w", "--log-worker", "all",
               "--gin-file", str(tmp_path / "gin_configs" / "run.gin"), script=tmp_path / "launch_tpu.sh")
  assert res.returncode == 0, res.stderr
  cmds = commands(res.stdout)
  tar = next(c for c in cmds if c[0] == "tar")
  assert tar[1:5] == ["-czf", tar[2], "-C", str(tmp_path)] and "--exclude=.git" in tar
  scp = next(c for c in cmds if c[4:5] == ["scp"])
  assert scp[5:7] == [tar[2], "p:instructor_jax.tgz"] and "--worker=all" in scp
  ssh = [remote(c) for c in cmds if c[4:5] == ["ssh"]]
  (start,) = [r for r in ssh if "instructor_jax.train" in r]
  assert "--gin_file=gin_configs/run.gin" in train_argv(start)
  follow = [c for c in cmds if "tail -n +1 -F" in " ".join(c)]
  assert len(follow) == 1 and "--worker=all" in follow[0] and "hostname" in remote(follow[0])
  # No accelerator type: the dry run says creating would fail instead of printing a bad create.
  assert not any(c[4:5] == ["create"] for c in cmds) and "--accelerator-type" in res.stdout


def test_help_exits_zero():
  res = launch("--help")
  assert res.returncode == 0 and "--gin-binding" in res.stdout and "--dry-run" in res.stdout


@pytest.mark.parametrize("drop,message", [
  ("--name", "--name is required"),
  ("--workdir", "--workdir is required"),
  ("--zone", "--zone is required"),
])
def test_missing_required_flag_is_a_clear_error(drop, message):
  args = list(BASE)
  i = args.index(drop)
  del args[i:i + 2]
  res = launch("--dry-run", *args, "--gin-file", GINS[0])
  assert res.returncode != 0 and message in res.stderr and res.stdout == ""


@pytest.mark.parametrize("args,message", [
  ([], "at least one --gin-file"),
  (["--gin-file", "nope.gin", "--workdir", "/local/dir"], "expected a gs:// path"),
  (["--gin-file", "a.gin", "--spot", "--preemptible"], "exclusive"),
  (["--gin-file", "a.gin", "--bogus"], "unknown argument '--bogus'"),
  (["--gin-file"], "--gin-file expects a value"),
  (["--gin-file", GINS[0], "--python", "3.10"], "--python '3.10': expected a Python version >= 3.11"),
  (["--gin-file", GINS[0], "--relaunch", "x"], "--relaunch 'x': expected a number of relaunches"),
  (["--gin-file", GINS[0], "--relaunch", "2", "--detach"], "--relaunch needs the launcher to wait for the end"),
])
def test_bad_arguments_are_clear_errors(args, message):
  res = launch("--dry-run", *BASE, *args)
  assert res.returncode == 2 and message in res.stderr


def test_missing_local_gin_file_fails_before_touching_the_pod():
  res = launch("--dry-run", "--name", "p", "--zone", "z", "--workdir", "gs://b/w",
               "--gin-file", "gin_configs/runs/does_not_exist.gin")
  assert res.returncode == 2 and "no such file" in res.stderr


def test_passes_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not on PATH (apt-get install shellcheck; .ci/run tries to)")
  res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stdout


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stands in for gcloud: logs argv, answers describe with FAKE_STATE (or the next line of
# $HOME/states), else NOT_FOUND, and runs ssh --command in a local shell whose HOME plays every
# worker's home.
printf '%s\n' "$*" >> "$HOME/gcloud.log"
case $4 in
  describe)
    state=${FAKE_STATE:-NOT_FOUND}
    if [ -s "$HOME/states" ]; then state=$(head -n 1 "$HOME/states"); sed -i 1d "$HOME/states"; fi
    if [ "$state" != NOT_FOUND ]; then printf '%s\tv4-32\n' "$state"; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found" >&2; exit 1 ;;
  scp) cp "$5" "$HOME/instructor_jax.tgz" ;;
  ssh) for a; do case $a in --command=*) exec bash -c "${a#--command=}" ;; esac; done; exit 3 ;;
esac
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python3 on the worker, and for the environment's python (`uv venv` links it there):
# pip is a no-op, `uv pip` fails with FAKE_INSTALL_RC, training records its argv, takes FAKE_SLEEP s and
# exits with the next line of $HOME/rcs, else FAKE_RC.
[ "$1 $2" = "-m pip" ] && exit 0
if [ "$1 $2 $3" = "-m uv venv" ]; then for a; do dir=$a; done; mkdir -p "$dir/bin"; ln -s "$0" "$dir/bin/python"; exit; fi
[ "$1 $2 $3" = "-m uv pip" ] && { sleep "${FAKE_INSTALL_SLEEP:-0}"; exit "${FAKE_INSTALL_RC:-0}"; }
[ "$1" = -c ] && { echo "worker: Python 3.12.9, jax 0.10.2"; exit 0; }
[ "$2" = instructor_jax.train ] || exit 99
shift 2
printf '%s\0' "$@" > "$HOME/argv"
echo "step 1 loss 0.5 from $(pwd)"
sleep "${FAKE_SLEEP:-0}"
rc=${FAKE_RC:-0}
if [ -s "$HOME/rcs" ]; then rc=$(head -n 1 "$HOME/rcs"); sed -i 1d "$HOME/rcs"; fi
exit "$rc"
"""


def test_quoting_holds_under_bash_3_2_rules():
  """macOS ships bash 3.2, where quotes inside ${var//pattern/replacement} stay literal."""
  res = launch("--dry-run", *BASE, *TRAIN_FLAGS, env={"BASH_COMPAT": "32"})
  assert res.returncode == 0, res.stderr
  (start,) = [remote(c) for c in commands(res.stdout) if "setsid" in " ".join(c)]
  assert train_argv(start) == EXPECTED_TRAIN


NEEDS_TOOLS = pytest.mark.skipif(not all(shutil.which(t) for t in ["git", "tar", "setsid", "tail", "seq"]),
                                 reason="needs git, tar, setsid, tail and seq")

SAVING_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python3 on a worker: on SIGTERM it checkpoints (for SAVE_S seconds), then exits 75.
trap 'echo saving; sleep "$SAVE_S"; echo saved; exit 75' TERM
echo started
while :; do sleep 0.1; done
"""


@NEEDS_TOOLS
@pytest.mark.parametrize("save_s", [2, 0])
def test_documented_stop_waits_for_the_checkpoint_and_records_its_status(tmp_path, save_s):
  """`kill -TERM -- -PID` reaches the wrapper too: it must outlive python's save and record python's status."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "instructor_jax").mkdir(parents=True)
  bin_dir.mkdir()
  venv_python = home / "instructor_jax_venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  venv_python.write_text(SAVING_PYTHON)
  venv_python.chmod(0o755)
  res = launch("--dry-run", *BASE, "--gin-file", GINS[0])
  (start,) = [remote(c) for c in commands(res.stdout) if "setsid" in " ".join(c)]
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "SAVE_S": str(save_s)}
  subprocess.run([BASH, "-c", start], env=env, check=True, timeout=30)
  pid_file, rc_file, log = (home / f"instructor_jax_train.{x}" for x in ("pid", "rc", "log"))
  deadline = time.time() + 20
  while not (pid_file.exists() and "started" in log.read_text()):
    assert time.time() < deadline, "the wrapper did not start"
    time.sleep(0.1)
  pid = int(pid_file.read_text())
  try:
    os.killpg(pid, signal.SIGTERM)  # what print_attach_help tells the user to run
    if save_s:
      time.sleep(0.5)
      os.kill(pid, 0)  # still there, waiting on the save
      assert not rc_file.exists()
    while not rc_file.exists():
      assert time.time() < deadline + 10, log.read_text()
      time.sleep(0.1)
    assert rc_file.read_text().strip() == "75" and "saved" in log.read_text()
  finally:
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _fake_pod(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict]:
  """A git tree holding the launcher, a home for the workers, and fake gcloud / python3 on PATH."""
  tree, home, bin_dir = tmp_path / "tree", tmp_path / "home", tmp_path / "bin"
  for d in (tree / "gin_configs", home, bin_dir):
    d.mkdir(parents=True)
  for name, text in [("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  shutil.copy(SCRIPT, tree / "launch_tpu.sh")
  (tree / "gin_configs" / "run.gin").write_text("TRAIN_STEPS = 1\n")
  (tree / ".gitignore").write_text("ignored/\n")
  (tree / "ignored").mkdir()
  (tree / "ignored" / "big.bin").write_text("x")
  (tree / "gone.txt").write_text("x")
  git = ["git", "-C", str(tree)]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "gone.txt"], check=True)
  (tree / "gone.txt").unlink()  # tracked but deleted: must not break the tarball
  return tree, home, {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp_path)}


POD = ["--name", "p", "--zone", "z", "--accelerator-type", "v4-32", "--workdir", "gs://b/w", "--gin-file",
       "gin_configs/run.gin"]


def _gcloud_verbs(home: pathlib.Path) -> list[str]:
  return [line.split()[3] for line in (home / "gcloud.log").read_text().splitlines()]


@NEEDS_TOOLS
@pytest.mark.parametrize("fake_rc,fake_state", [(0, None), (3, None), (0, "PREEMPTED")])
def test_real_run_against_fake_gcloud_executes_the_remote_commands(tmp_path, fake_rc, fake_state):
  """A new TPU, a failing run, and a relaunch after preemption (the dead TPU is replaced)."""
  tree, home, env = _fake_pod(tmp_path)
  env = {**env, "FAKE_RC": str(fake_rc), **({"FAKE_STATE": fake_state} if fake_state else {})}
  res = launch(*POD, "--gin-binding", NASTY, "--delete-after",
               # A relaunch after preemption, as a fast restart: the new TPU still needs the install.
               *(["--skip-install"] if fake_state else []), script=tree / "launch_tpu.sh", env=env)

  assert (res.returncode == 0) == (fake_rc == 0), res.stderr
  assert "step 1 loss 0.5 from" in res.stdout and str(home / "instructor_jax") in res.stdout
  argv = (home / "argv").read_text().split("\0")[:-1]
  assert argv == ["--gin_file=gin_configs/run.gin", f"--gin_bindings={NASTY}", "--workdir=gs://b/w"]
  assert (home / "instructor_jax" / "gin_configs" / "run.gin").is_file()
  assert not (home / "instructor_jax" / "ignored").exists()
  assert f"training exited with status {fake_rc}" in res.stdout
  replaced = ["delete"] if fake_state else []
  looked = ["describe"] if fake_rc else []  # a failed run: was the TPU preempted?
  assert _gcloud_verbs(home) == ["describe", *replaced, "create", "scp", "ssh", "ssh", "ssh", "ssh", *looked, "delete"]
  assert "worker: Python 3.12.9, jax 0.10.2" in res.stdout  # what the install put in the environment
  assert ("was preempted; deleting it and creating it again as on-demand" in res.stderr) == bool(fake_state)
  assert ("installing anyway" in res.stderr) == bool(fake_state)
  # A second start while a run is alive is refused rather than fighting it for the TPU chips.
  live = subprocess.Popen(["sleep", "30"])
  try:
    (home / "instructor_jax_train.pid").write_text(f"{live.pid}\n")
    again = launch(*POD, script=tree / "launch_tpu.sh", env={**env, "FAKE_STATE": "READY"})
    assert again.returncode != 0 and "is still running" in again.stderr
  finally:
    live.kill()
    live.wait()


@pytest.mark.parametrize("binding, warned", [("MEDI_PATH='/data/medi.json'", True), ('MEDI_PATH = "medi.json"', True),
                                             ("MEDI_PATH='gs://b/medi.json'", False), ("TRAIN_STEPS = 10", False)])
def test_a_local_medi_path_is_warned_about(binding, warned):
  res = launch("--dry-run", *BASE, "--gin-file", GINS[0], "--gin-binding", binding)
  assert res.returncode == 0, res.stderr
  assert ("warning: MEDI_PATH" in res.stderr) == warned, res.stderr


@NEEDS_TOOLS
@pytest.mark.parametrize("state", [None, "PREEMPTED", "READY"])
def test_a_failed_install_with_delete_after_deletes_only_a_tpu_this_launch_created(tmp_path, state):
  tree, home, env = _fake_pod(tmp_path)
  env = {**env, "FAKE_INSTALL_RC": "1", **({"FAKE_STATE": state} if state else {})}
  res = launch(*POD, "--delete-after", script=tree / "launch_tpu.sh", env=env)
  assert res.returncode != 0 and not (home / "argv").exists()
  if state != "READY":  # created by this launch (replacing a preempted one), nothing started on it: deleted
    replaced = ["delete"] if state else []
    assert _gcloud_verbs(home) == ["describe", *replaced, "create", "scp", "ssh", "delete"]
    assert "training never started on p, which this launch created; deleting it" in res.stderr
  else:  # someone's existing TPU: left, and said so
    assert _gcloud_verbs(home) == ["describe", "scp", "ssh"]
    assert "warning: TPU p is left running (and billed); delete it when done: gcloud compute tpus" in res.stderr


def _interrupt(proc: subprocess.Popen, err_path: pathlib.Path, after: str, ready=lambda: True) -> None:
  """Ctrl-C, as a terminal sends it to the launcher's process group, once `after` is in its stderr."""
  deadline = time.time() + 30
  while after not in err_path.read_text() or not ready():
    assert time.time() < deadline and proc.poll() is None, err_path.read_text()
    time.sleep(0.1)
  time.sleep(0.5)
  os.killpg(proc.pid, signal.SIGINT)


def _start_launcher(tree: pathlib.Path, env: dict, err_path: pathlib.Path, *args: str) -> subprocess.Popen:
  with open(err_path, "w") as err:  # the child keeps its own copy of the file
    return subprocess.Popen([BASH, str(tree / "launch_tpu.sh"), *POD, *args], env=env, stdout=subprocess.PIPE,
                            stderr=err, text=True, start_new_session=True)


@NEEDS_TOOLS
def test_ctrl_c_during_the_install_deletes_the_tpu_the_launch_created(tmp_path):
  tree, home, env = _fake_pod(tmp_path)
  err_path = tmp_path / "launcher.err"
  proc = _start_launcher(tree, {**env, "FAKE_INSTALL_SLEEP": "20"}, err_path, "--delete-after")
  _interrupt(proc, err_path, "uv pip install")
  proc.communicate(timeout=30)
  assert proc.returncode == 130, err_path.read_text()
  assert _gcloud_verbs(home) == ["describe", "create", "scp", "ssh", "delete"]


@NEEDS_TOOLS
def test_a_second_ctrl_c_while_waiting_to_delete_leaves_the_tpu_and_says_so(tmp_path):
  tree, home, env = _fake_pod(tmp_path)
  err_path = tmp_path / "launcher.err"
  proc = _start_launcher(tree, {**env, "FAKE_SLEEP": "30"}, err_path, "--delete-after")
  try:
    _interrupt(proc, err_path, "streaming the log", ready=(home / "argv").exists)
    _interrupt(proc, err_path, "waiting for training to end on every worker")
    proc.communicate(timeout=30)
  finally:  # the fake training runs on in its own session, as a real one would
    pid = (home / "instructor_jax_train.pid").read_text().strip()
    subprocess.run(["pkill", "-KILL", "-s", pid], check=False)
  text = err_path.read_text()
  assert proc.returncode == 130, text
  assert "warning: TPU p is left running (and billed); delete it when done: gcloud compute tpus tpu-vm delete p" in text
  assert "delete" not in _gcloud_verbs(home)


@NEEDS_TOOLS
@pytest.mark.parametrize("delete_after", [False, True])
def test_ctrl_c_stops_only_the_log_stream(tmp_path, delete_after):
  """Ctrl-C reaches gcloud, which ends itself by SIGINT; the launcher must go on: return at once, or,
  with --delete-after, wait for training to end everywhere and then delete the TPU."""
  tree, home, env = _fake_pod(tmp_path)
  err_path = tmp_path / "launcher.err"
  proc = _start_launcher(tree, {**env, "FAKE_SLEEP": "4"}, err_path, *(["--delete-after"] if delete_after else []))
  _interrupt(proc, err_path, "streaming the log", ready=(home / "argv").exists)
  out, _ = proc.communicate(timeout=30)
  text = err_path.read_text()
  assert proc.returncode == 0, text
  if delete_after:
    assert "log stream stopped; waiting for training to end on every worker, then deleting p" in text
    assert "training exited with status 0" in out and _gcloud_verbs(home)[-1] == "delete"
  else:
    assert "log stream stopped; training goes on on p" in text
    assert _gcloud_verbs(home) == ["describe", "create", "scp", "ssh", "ssh", "ssh"]  # no wait, no delete
    assert "training finished" not in text and "failed" not in text


@NEEDS_TOOLS
def test_a_fast_restart_beside_a_live_run_starts_nothing(tmp_path):
  """--skip-install checks every worker before starting any: a worker still training must not leave
  the others started, waiting for it in jax.distributed.initialize()."""
  tree, home, env = _fake_pod(tmp_path)
  live = subprocess.Popen(["sleep", "30"])
  try:
    (home / "instructor_jax_train.pid").write_text(f"{live.pid}\n")
    res = launch(*POD, "--skip-install", script=tree / "launch_tpu.sh", env={**env, "FAKE_STATE": "READY"})
  finally:
    live.kill()
    live.wait()
  assert res.returncode != 0 and "is still running" in res.stderr
  assert _gcloud_verbs(home) == ["describe", "ssh"] and not (home / "argv").exists()


@NEEDS_TOOLS
@pytest.mark.parametrize("relaunch", [0, 1])
def test_a_preempted_run_is_relaunched_when_asked(tmp_path, relaunch):
  """Training ends with the TPU preempted (status 75: the preemption notice's checkpoint): with
  --relaunch the TPU is created again, installed and resumed; without, the launcher says to rerun."""
  tree, home, env = _fake_pod(tmp_path)
  (home / "states").write_text("NOT_FOUND\nPREEMPTED\n")  # the first look creates it; it is preempted later
  (home / "rcs").write_text("75\n0\n")
  res = launch(*POD, "--delete-after", "--relaunch", str(relaunch), script=tree / "launch_tpu.sh", env=env)
  once = ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh"]
  if relaunch:
    assert res.returncode == 0, res.stderr
    assert "TPU p was preempted; relaunch 1 of 1: creating it again, installing, resuming from gs://b/w" in res.stderr
    assert _gcloud_verbs(home) == [*once, "describe", "delete", "create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]
    assert "training exited with status 75" in res.stdout and "training exited with status 0" in res.stdout
  else:
    assert res.returncode != 0
    assert "TPU p was preempted; rerun the same command to resume from gs://b/w" in res.stderr
    assert _gcloud_verbs(home) == [*once, "describe", "delete"]
