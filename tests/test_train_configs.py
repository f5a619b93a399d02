"""Every shipped gin file parses, starts with its command, and the paper recipe has the paper's values."""

import pathlib

import gin
import pytest

from instructor_jax import train, train_launch

GIN = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
ALL_FILES = sorted(GIN.rglob("*.gin"))


def load(files, bindings=()):
  gin.clear_config()
  train_launch.parse_gin([str(f) for f in files], list(bindings))
  return train_launch.GIN_TRAIN_CONFIG(), train_launch.GIN_OPTIM_CONFIG(), train_launch.GIN_MESH_CONFIG()


def test_every_gin_file_starts_with_the_command_that_runs_it():
  assert {p.parent.name for p in ALL_FILES} == {"models", "runs", "meshes"} and len(ALL_FILES) >= 10
  for path in ALL_FILES:
    head = path.read_text().split("\n\n")[0]
    assert head.startswith("# ") and ("python -m instructor_jax.train" in head or "launch_tpu.sh" in head), path


def test_paper_recipe():
  cfg, optim, mesh = load([GIN / "runs" / "instructor_medi.gin"])
  assert (cfg.model, cfg.init_checkpoint) == ("gtr-large", "sentence-transformers/gtr-t5-large")
  assert (cfg.train_steps, cfg.batch_size, cfg.query_len, cfg.doc_len) == (20000, 4, 512, 512)
  assert (cfg.loss, cfg.temperature, cfg.dropout_rate, cfg.dtype) == ("instructor", 0.01, 0.1, "bfloat16")
  assert (optim.name, optim.learning_rate, optim.warmup_fraction, optim.final_lr_fraction) == ("adamw", 2e-5, 0.1, 0.0)
  assert cfg.medi_path is None  # must be given: the error message says how


@pytest.mark.parametrize("model", sorted(p.name for p in (GIN / "models").glob("*.gin")))
@pytest.mark.parametrize("mesh", [None] + sorted(p.name for p in (GIN / "meshes").glob("*.gin")))
def test_runs_combine_with_models_and_meshes(model, mesh):
  files = [GIN / "runs" / "instructor_medi.gin", GIN / "models" / model] + ([GIN / "meshes" / mesh] if mesh else [])
  cfg, _, mesh_cfg = load(files, ["MEDI_PATH = '/data/medi.json'", "TRAIN_STEPS = 7", "INIT_CHECKPOINT = None"])
  assert (cfg.medi_path, cfg.train_steps, cfg.init_checkpoint) == ("/data/medi.json", 7, None)
  assert cfg.model == ("tiny" if model == "tiny.gin" else "gtr-" + model[4:-4])
  if mesh:
    assert cfg.batch_size >= 256 and cfg.batch_size % mesh_cfg.fsdp == 0


def test_quickstart_macros_override_from_the_command_line():
  cfg, optim, mesh = load([GIN / "runs" / "quickstart_cpu.gin"], ["BATCH_SIZE = 32", "TRAIN_STEPS = 10"])
  assert (cfg.model, cfg.batch_size, cfg.train_steps, cfg.medi_path) == ("tiny", 32, 10, "data/medi_sample.jsonl")


def test_missing_gin_file_and_missing_medi_path_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such.gin"):
    train_launch.parse_gin([str(tmp_path / "no_such.gin")], [])
  with pytest.raises(ValueError, match="MEDI_PATH"):
    next(iter(train.batches(train.TrainConfig(), 0, 1, shards=1)))


def test_a_mistyped_macro_binding_is_refused():
  """gin ignores a macro nobody reads: TRAIN_STEP=5 would silently train the file's 300 steps."""
  load([GIN / "runs" / "quickstart_cpu.gin"], ["TRAIN_STEP = 5", "BATCH_SIZE = 32"])
  operative = gin.operative_config_str()
  train_launch.check_macros_used(["BATCH_SIZE = 32", "TrainConfig.log_every = 3"], operative)  # read: fine
  with pytest.raises(train.ConfigError, match=r"'TRAIN_STEP = 5': no configuration reads the macro TRAIN_STEP .*TRAIN_STEPS"):
    train_launch.check_macros_used(["TRAIN_STEP = 5"], operative)


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "1"}, False),  # a bare salloc shell: one process, no job step
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False), ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, True), ({}, False)])
def test_multiprocess_launch_detection(monkeypatch, env, expected):
  for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert train_launch._in_multiprocess_launch() is expected


QUICKSTART = str(GIN / "runs" / "quickstart_cpu.gin")


@pytest.mark.parametrize("args, message", [
    (["--gin_file=gin_configs/runs/quickstart.gin"], "--gin_file gin_configs/runs/quickstart.gin: no such file"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=TrainConfig.batchsize = 8"],
     "gin: Configurable 'TrainConfig' doesn't have a parameter named 'batchsize'"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=TrainConfig.loss = 'infonce'"], "TrainConfig.loss='infonce'; expected"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=TrainConfig.model = 'gtr-medium'"],
     "Unknown model preset 'gtr-medium'"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=MEDI_PATH = '/no/such/medi.jsonl'"], "/no/such/medi.jsonl: no such"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=TrainConfig.xla_options = {'xla_foo_bar': True}"],
     "no compiler option 'xla_foo_bar'"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=TRAIN_STEP = 5"], "no configuration reads the macro TRAIN_STEP"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=MEDI_PATH = data/medi.jsonl"], "a string value needs quotes"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=OptimConfig.learning_rate = -1.0"],
     "OptimConfig.learning_rate=-1.0; expected a number in [0, inf)"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=TrainConfig.attention_impl = 'cudnn'",
      "--gin_bindings=TrainConfig.dtype = 'bfloat16'", "--gin_bindings=TrainConfig.dropout_rate = 0.0"],
     "TrainConfig.attention_impl 'cudnn' runs on GPUs only, and this mesh is on CPU"),
    # Every global batch is one task's: a batch larger than every task is a setting mistake.
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=BATCH_SIZE = 2000"],
     "BATCH_SIZE 2000: no MEDI task has that many examples"),
    ([f"--gin_file={QUICKSTART}", "--gin_bindings=INIT_CHECKPOINT = 'nobody/no-such-model'"],
     "'nobody/no-such-model' is not a local path"),  # offline in tests: the Hub download fails
])
def test_cli_reports_setting_mistakes_in_one_line(tmp_path, capsys, args, message):
  """As embed, convert and evaluate do: `error: ...` naming the setting, status 2, no traceback."""
  gin.clear_config()
  assert train.main([*args, f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_a_users_gin_file_can_include_the_shipped_runs(tmp_path, capsys):
  """Includes resolve against the shipped gin_configs/ too; one that resolves nowhere is a one-line error."""
  mine = tmp_path / "cfg" / "mine.gin"
  mine.parent.mkdir()
  mine.write_text("include 'runs/quickstart_cpu.gin'\nTRAIN_STEPS = 7\n")
  gin.clear_config()
  train_launch.parse_gin([str(mine)], [])
  assert train_launch.GIN_TRAIN_CONFIG().train_steps == 7
  (tmp_path / "cfg" / "broken.gin").write_text("include 'runs/no_such_run.gin'\n")
  gin.clear_config()
  assert train.main([f"--gin_file={tmp_path / 'cfg' / 'broken.gin'}", f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: gin: ") and "runs/no_such_run.gin" in err and "Traceback" not in err, err


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / "afile").write_text("x")
  gin.clear_config()
  assert train.main([f"--gin_file={QUICKSTART}", f"--workdir={tmp_path / 'afile'}"]) == 2
  assert "--workdir " + str(tmp_path / "afile") + " is a file; expected a directory" in capsys.readouterr().err


def test_a_gs_workdir_without_its_writers_is_a_one_line_error(tmp_path, capsys, monkeypatch):
  from instructor_jax import train_outputs
  importable = {"google.cloud.storage": False, "tensorflow": True, "gcsfs": False}
  monkeypatch.setattr(train_outputs, "_importable", lambda module: importable[module])
  gin.clear_config()
  assert train.main([f"--gin_file={QUICKSTART}", "--workdir=gs://my-bucket/run"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: --workdir gs://my-bucket/run: writing the metrics and "
                                                 "TensorBoard events to gs:// needs google-cloud-storage, not"), err
  importable.update({"google.cloud.storage": True, "tensorflow": False})
  with pytest.raises(train.ConfigError, match="needs tensorflow or gcsfs, not installed"):
    train_outputs.check_remote_workdir("gs://my-bucket/run")
  importable["gcsfs"] = True
  train_outputs.check_remote_workdir("gs://my-bucket/run")
  importable.update({k: False for k in importable})
  train_outputs.check_remote_workdir(str(tmp_path))  # local workdirs need neither


def test_a_mesh_that_gives_a_process_no_rows_of_its_own_is_refused_before_building(monkeypatch, capsys, tmp_path):
  """Two processes whose devices all sit on the tensor axis would hold the same rows: refused at start-up
  (it used to be a traceback at step 1, after the model was loaded and MEDI read)."""
  import jax
  from instructor_jax import sharding as shd
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=-1))
  shd.check_host_rows(mesh, 16)  # one process: its devices hold every row
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"process 0 has 8 rows of the global batch but its devices hold 16"):
    shd.check_host_rows(mesh, 16)
  with pytest.raises(ValueError, match=r"the global batch \(15\) does not divide among 2 processes"):
    shd.check_host_rows(mesh, 15)
  gin.clear_config()
  args = [f"--gin_file={QUICKSTART}", f"--workdir={tmp_path / 'w'}", "--gin_bindings=MeshConfig.data = 1",
          "--gin_bindings=MeshConfig.tensor = -1"]
  assert train.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: BATCH_SIZE 16 on mesh {'data': 1, 'fsdp': 1, 'tensor': 8}: process 0 has 8 rows"), err


def test_a_missing_remote_medi_file_is_a_one_line_error_before_the_model_is_built(tmp_path, capsys, monkeypatch):
  from etils import epath
  from instructor_jax import medi_paths
  monkeypatch.setattr(medi_paths, "_remote", lambda p: epath.Path(str(p).replace("gs://bucket", str(tmp_path))))
  monkeypatch.setattr(train, "build_state", lambda *a: pytest.fail("the model was built"))
  gin.clear_config()
  assert train.main([f"--gin_file={QUICKSTART}", "--gin_bindings=MEDI_PATH = 'gs://bucket/medi-data.json'",
                     f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: gs://bucket/medi-data.json: no such MEDI file") and "Traceback" not in err, err
