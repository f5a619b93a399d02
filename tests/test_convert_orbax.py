"""Orbax params checkpoints: export -> restore onto an 8-device mesh -> identical embeddings."""

import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from instructor_jax import Instructor, orbax_io
from instructor_jax.config import preset
from instructor_jax.convert import main as convert_main
from instructor_jax.model import InstructorModel
from instructor_jax.sources import load_source
from instructor_jax.tokenization import Tokenizer

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_instructor")
ITEMS = [["Represent the Science title:", "3D ActionSLAM: wearable person tracking"],
         ["Represent the question for retrieving documents:", "who wrote the origin of species?"],
         "a plain sentence", "another one, somewhat longer than the first plain sentence"]


def _leaves_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _mesh():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_config_round_trip():
  for name in ("tiny", "gtr-xxl"):
    cfg = preset(name).with_encoder(feed_forward="gated-gelu").replace(max_seq_length=128, normalize=False)
    assert orbax_io.config_from_dict(orbax_io.config_to_dict(cfg)) == cfg
  with pytest.warns(UserWarning, match="future_field"):
    orbax_io.config_from_dict({**orbax_io.config_to_dict(preset("tiny")), "future_field": 1})


def test_attention_dropout_rate_is_saved_only_when_set():
  """None (dropout_rate) is left out, so releases without the field read the config without a warning."""
  assert "attention_dropout_rate" not in orbax_io.config_to_dict(preset("tiny"))["encoder"]
  cfg = preset("tiny").with_encoder(attention_dropout_rate=0.0)
  assert orbax_io.config_to_dict(cfg)["encoder"]["attention_dropout_rate"] == 0.0
  assert orbax_io.config_from_dict(orbax_io.config_to_dict(cfg)) == cfg
  assert (cfg.encoder.attention_dropout, preset("tiny").encoder.attention_dropout) == (0.0, 0.1)
  for field, value in (("attention_dropout_rate", 1.0), ("dropout_rate", -0.1), ("dropout_rate", None)):
    with pytest.raises(ValueError, match=re.escape(f"T5Config.{field}={value!r}; expected a number with 0 <= rate < 1")):
      preset("tiny").with_encoder(**{field: value})


def test_export_restore_sharded_identical_embeddings(tmp_path):
  ref = Instructor.from_pretrained(TINY)
  expected = ref.encode(ITEMS)
  ckpt = str(tmp_path / "orbax")
  assert convert_main([TINY, ckpt, "--to", "orbax"]) == 0
  assert orbax_io.latest_step(ckpt) == 0

  mesh = _mesh()
  params_np = jax.device_get(ref.params)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params_np)
  # Embedding split over the vocabulary, a kernel split over its output: nothing whole on one device.
  shardings["token_embedder"]["embedding"] = NamedSharding(mesh, P(("data", "model"), None))
  shardings["encoder"]["layers_0"]["mlp"]["wi"]["kernel"] = NamedSharding(mesh, P(None, "model"))
  cfg, params = orbax_io.restore_params(ckpt, shardings=shardings)
  assert cfg == ref.config.with_encoder(dtype="float32")
  emb = params["token_embedder"]["embedding"]
  assert emb.sharding == shardings["token_embedder"]["embedding"]
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 8, emb.shape[1])
  _leaves_equal(params, params_np)

  # Embeddings computed with the sharded parameters, on the mesh.
  batch = Tokenizer.from_pretrained(TINY)(ITEMS, buckets=None, rows=8)
  forward = jax.jit(lambda p, i, m, n: InstructorModel(cfg).apply({"params": p}, i, m, n))
  rows = NamedSharding(mesh, P("data"))
  inputs = [jax.device_put(x, rows) for x in (batch.ids, batch.mask, batch.n_instr)]
  got = np.asarray(forward(params, *inputs))[: len(ITEMS)]
  diff = float(np.abs(got - expected).max())
  print(f"[parity] orbax export -> sharded restore on 8-device mesh: max|diff| = {diff:.3g}")
  assert diff <= 1e-6

  # And through the public API (host restore, then the model's own placement).
  again = Instructor.from_pretrained(ckpt).encode(ITEMS)
  assert float(np.abs(again - expected).max()) <= 1e-6


def _training_checkpoints(workdir, params, cfg, steps):
  """What the trainer writes: params + model_config + its own items, async, in WORKDIR/checkpoints."""
  mngr = orbax_io.checkpoint_manager(os.path.join(workdir, "checkpoints"), max_to_keep=3)
  for step in steps:
    scaled = jax.tree.map(lambda x: x * (1 + step), params)
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(scaled),
        model_config=ocp.args.JsonSave(orbax_io.config_to_dict(cfg)),
        opt_state=ocp.args.StandardSave({"mu": scaled, "count": np.int32(step)}),
        train_meta=ocp.args.JsonSave({"step": step, "data_position": 17})))
  mngr.wait_until_finished()
  mngr.close()


def test_training_workdir_restore_params_only(tmp_path, caplog):
  loaded = load_source(TINY)
  workdir = str(tmp_path / "workdir")
  _training_checkpoints(workdir, loaded.params, loaded.config, steps=(10, 20))
  caplog.clear()
  assert orbax_io.checkpoint_dir(workdir) == os.path.join(workdir, "checkpoints")
  assert orbax_io.checkpoint_dir(os.path.join(workdir, "checkpoints")) == os.path.join(workdir, "checkpoints")
  assert orbax_io.latest_step(workdir) == 20 and orbax_io.all_steps(workdir) == [10, 20]
  with caplog.at_level(logging.WARNING):
    cfg, params = orbax_io.restore_params(workdir)
  # Reading params out of a training checkpoint is routine: no warnings about the items it skips.
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert cfg == loaded.config
  _leaves_equal(params, jax.tree.map(lambda x: x * 21, loaded.params))
  _, params10 = orbax_io.restore_params(workdir, step=10)
  _leaves_equal(params10, jax.tree.map(lambda x: x * 11, loaded.params))
  with pytest.raises(orbax_io.OrbaxCheckpointError, match=r"no step 15.*\[10, 20\]"):
    orbax_io.restore_params(workdir, step=15)
  # Sources: the workdir, its checkpoints dir and one step dir all resolve.
  assert load_source(workdir).description.endswith("@20")
  assert load_source(workdir, step=10).description.endswith("@10")
  step_src = load_source(os.path.join(workdir, "checkpoints", "10"))
  _leaves_equal(step_src.params, params10)
  assert step_src.tokenizer_dir is None


def test_missing_items_and_empty_dirs(tmp_path):
  empty = tmp_path / "empty_ckpts"
  empty.mkdir()
  assert orbax_io.latest_step(str(empty)) is None
  with pytest.raises(orbax_io.OrbaxCheckpointError, match="no finished checkpoint"):
    orbax_io.restore_params(str(empty))
  with pytest.raises(orbax_io.OrbaxCheckpointError, match="no such directory"):
    orbax_io.restore_params(str(tmp_path / "nope"))
  mngr = orbax_io.checkpoint_manager(str(tmp_path / "no_config"), async_save=False)
  mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.ones(3, np.float32)})))
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(orbax_io.OrbaxCheckpointError, match="'model_config' is missing"):
    orbax_io.restore_params(str(tmp_path / "no_config"))
  orbax_io.save_params(str(tmp_path / "p"), {"w": np.ones(3, np.float32)}, preset("tiny"), step=0)
  with pytest.raises(orbax_io.OrbaxCheckpointError, match="already exists.*--overwrite"):
    orbax_io.save_params(str(tmp_path / "p"), {"w": np.ones(3, np.float32)}, preset("tiny"), step=0)
  orbax_io.save_params(str(tmp_path / "p"), {"w": np.full(3, 2, np.float32)}, preset("tiny"), step=0, overwrite=True)
  assert orbax_io.restore_params(str(tmp_path / "p"))[1]["w"].tolist() == [2, 2, 2]
  # A later step there would shadow step 0 for every reader (and orbax would skip the save).
  orbax_io.save_params(str(tmp_path / "q"), {"w": np.ones(3, np.float32)}, preset("tiny"), step=5)
  for overwrite in (False, True):
    with pytest.raises(orbax_io.OrbaxCheckpointError, match=r"holds checkpoint steps \[5\]"):
      orbax_io.save_params(str(tmp_path / "q"), {"w": np.ones(3, np.float32)}, preset("tiny"), step=0,
                           overwrite=overwrite)
  assert orbax_io.all_steps(str(tmp_path / "q")) == [5]


def test_a_step_whose_parameter_data_is_gone_is_one_clear_error(tmp_path):
  import shutil
  loaded = load_source(TINY)
  orbax_io.save_params(str(tmp_path / "ckpt"), loaded.params, loaded.config, step=0)
  data = [p for p in (tmp_path / "ckpt" / "0" / "params").iterdir() if p.is_dir()]
  assert data
  for p in data:
    shutil.rmtree(p)
  with pytest.raises(orbax_io.OrbaxCheckpointError, match=r"the parameters of step 0 cannot be read .*Copy the"):
    orbax_io.restore_params(str(tmp_path / "ckpt"))
