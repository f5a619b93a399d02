"""Resolves a model source to config + parameters: Hub id, HF/ST dir, t5x checkpoint, orbax checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

from instructor_jax.config import InstructorConfig
from instructor_jax.hf_format import CheckpointError, load_hf_directory, transformer_dir


@dataclasses.dataclass
class LoadedModel:
  config: InstructorConfig
  params: Any
  tokenizer_dir: str | None  # None: the bundled T5 vocabulary
  description: str
  model_dir: str | None = None  # a sentence-transformers source's root (prompts, modules)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
T5_VOCAB_ROWS = 32128  # the T5 SentencePiece vocabulary's 32100 pieces, padded to a multiple of 128


def load_tokenizer(loaded: LoadedModel, max_seq_length: int):
  """The model's tokenizer (`tokenization.Tokenizer`), refused where it cannot be the model's own."""
  from instructor_jax.tokenization import Tokenizer
  where = loaded.tokenizer_dir
  if where is not None and os.path.exists(os.path.join(where, "tokenizer_config.json")) and not any(
      os.path.exists(os.path.join(where, f)) for f in ("tokenizer.json", "spiece.model")):
    # transformers would build a vocabulary of the special tokens alone from the config: every word
    # would be <unk>, and all embeddings nearly the same.
    raise CheckpointError(f"{where}: tokenizer_config.json without tokenizer.json or spiece.model (a partial copy?); "
                          "copy one of them from the model's source.")
  rows = loaded.config.encoder.vocab_size
  if where is not None and not any(os.path.exists(os.path.join(where, f)) for f in _TOKENIZER_FILES):
    # A model saved without its tokenizer (T5EncoderModel.save_pretrained alone): the bundled T5
    # vocabulary is right for t5/GTR/INSTRUCTOR weights, whose embedding table has its 32128 rows, and
    # wrong for any other (mT5, a resized vocabulary), whose embeddings would be silently meaningless.
    if rows != T5_VOCAB_ROWS:
      raise CheckpointError(f"{where}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}), and the embedding table has "
                            f"{rows} rows, not the standard T5 vocabulary's {T5_VOCAB_ROWS}; copy the tokenizer files "
                            "that came with these weights into the directory.")
    warnings.warn(f"{where}: no tokenizer files; using the standard T5 vocabulary bundled with instructor_jax (that of "
                  "t5, GTR and INSTRUCTOR checkpoints, and of this model's 32128-row embedding table).", stacklevel=3)
  tokenizer = Tokenizer.from_pretrained(where, max_seq_length)
  pieces = len(tokenizer.hf_tokenizer)
  if pieces > rows:
    raise CheckpointError(f"{where or 'the bundled T5 vocabulary'}: the tokenizer has {pieces} pieces but the model's "
                          f"embedding table {rows} rows, so ids from {rows} on would read outside it (NaN "
                          "embeddings); use the tokenizer files that came with these weights.")
  return tokenizer


# Hub repositories of sentence-transformers models also hold ONNX / OpenVINO exports (several times
# the model's size) and often the same weights twice (.safetensors and .bin): fetch only what loads.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
_HUB_SKIP = ["onnx/*", "openvino/*"]


def source_prompts(loaded: LoadedModel) -> tuple[dict[str, str], str | None]:
  """Named prompts and the default prompt name of a sentence-transformers source (none elsewhere):
  what an export carries over, since sentence-transformers applies the default prompt when encode
  is given none, so dropping it would change that model's embeddings."""
  path = os.path.join(loaded.model_dir or "", "config_sentence_transformers.json")
  if loaded.model_dir is None or not os.path.exists(path):
    return {}, None
  with open(path, encoding="utf-8") as f:
    st_config = json.load(f)
  return dict(st_config.get("prompts") or {}), st_config.get("default_prompt_name")


def _bin_patterns(local: str) -> list[str]:
  """Torch .bin weights still needed: the root's and each module folder's, where no safetensors exist."""
  import json
  patterns = []
  if not any(os.path.exists(os.path.join(local, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
    patterns.append("pytorch_model*.bin")
  modules_path = os.path.join(local, "modules.json")
  if os.path.exists(modules_path):
    with open(modules_path) as f:
      for module in json.load(f):
        folder = module.get("path") or ""
        if folder and not os.path.exists(os.path.join(local, folder, "model.safetensors")):
          patterns.append(f"{folder}/*.bin")
  return patterns


def resolve_hub_id(name: str, revision: str | None = None) -> str:
  """Downloads (or finds in the cache) a Hub repository's model files; respects HF_HUB_OFFLINE.

  Safetensors are preferred: torch `.bin` weights are fetched only for folders that have none.
  """
  from huggingface_hub import snapshot_download
  try:
    local = snapshot_download(name, revision=revision, allow_patterns=_HUB_FILES, ignore_patterns=_HUB_SKIP)
    bins = _bin_patterns(local)
    if bins:
      local = snapshot_download(name, revision=revision, allow_patterns=bins, ignore_patterns=_HUB_SKIP)
    return local
  except Exception as e:  # offline, unknown repo, no network: all end up here
    legacy = legacy_st_cache_dir(name)
    # modules.json is written last by sentence-transformers 2.x: without it the copy may be partial.
    if revision is None and os.path.isfile(os.path.join(legacy, "modules.json")):
      warnings.warn(f"{name!r} could not be fetched from the Hugging Face Hub ({type(e).__name__}); using the copy "
                    f"that sentence-transformers 2.x / InstructorEmbedding downloaded to {legacy}.", stacklevel=4)
      return legacy
    if os.path.isfile(os.path.join(legacy, "modules.json")):  # there, but it has no revision to match
      legacy_note = (f"the sentence-transformers 2.x copy at {legacy} is not used for a --revision / revision= "
                     "request (it records no revision); drop the revision to use it")
    else:
      legacy_note = f"nor is there a sentence-transformers 2.x copy at {legacy}"
    raise CheckpointError(
        f"{name!r} is not a local path (no directory {os.path.abspath(name)}) and could not be fetched from "
        f"the Hugging Face Hub ({type(e).__name__}: {e}); {legacy_note}. If you are offline, download it once "
        "with network access (it is then cached), or pass a local directory.") from e


def looks_like_hub_id(name: str) -> bool:
  """'owner/name' (what is not a local directory and has this form is fetched from the Hub)."""
  return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def legacy_st_cache_dir(name: str) -> str:
  """Where sentence-transformers 2.x (and so InstructorEmbedding 1.0.1) kept a Hub model: users moving
  from it have hkunlp/instructor-* there rather than in the Hub cache."""
  home = os.getenv("SENTENCE_TRANSFORMERS_HOME")
  if home is None:
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    home = os.path.join(os.path.expanduser(torch_home), "sentence_transformers")
  return os.path.join(home, name.replace("/", "_"))


def detect_kind(path: str) -> str:
  """'hf', 't5x' or 'orbax' for an existing local (or gs://) directory; raises for anything else."""
  from instructor_jax import orbax_io, t5x_format
  if path.startswith("gs://"):
    # The t5x reader reports an unreachable bucket or a missing 'checkpoint' with the real cause.
    return "orbax" if orbax_io.is_orbax_checkpoint(path) else "t5x"
  _refuse_module_folder(path)
  if os.path.exists(os.path.join(transformer_dir(path), "config.json")):
    return "hf"
  if t5x_format.is_t5x_checkpoint(path):
    return "t5x"
  if orbax_io.is_orbax_checkpoint(path) or _orbax_step_dir(path) is not None:
    return "orbax"
  if os.path.exists(os.path.join(path, ".train.lock")) or os.path.isdir(os.path.join(path, "checkpoints")):
    raise CheckpointError(
        f"{path} is a training workdir without a finished checkpoint yet (the trainer saves every "
        "TrainConfig.checkpoint_every steps and at the last step; a run that failed before its first save "
        "leaves none). Wait for the first checkpoint, or pass a model that has one.")
  listing = sorted(os.listdir(path))[:12]
  raise CheckpointError(
      f"{path}: unknown checkpoint layout (contains {listing}). Expected one of: a sentence-transformers / "
      "transformers directory (config.json + model.safetensors, sharded safetensors with an index, or "
      "pytorch_model.bin); a t5x checkpoint directory (a msgpack 'checkpoint' file + zarr arrays); an orbax "
      "checkpoint (a training workdir, its checkpoints/ directory, or one <step>/ directory).")


def _refuse_module_folder(path: str) -> None:
  """A module folder of a sentence-transformers directory (`2_Dense/`, `1_Pooling/`, an old layout's
  `0_Transformer/`) is not a model: loaded alone it would lose the other modules, the projection included."""
  folder = os.path.abspath(path)  # "." and "./" too: their name is the directory's own
  parent, name = os.path.dirname(folder), os.path.basename(folder)
  modules_path = os.path.join(parent, "modules.json")
  if not os.path.isfile(modules_path):
    return
  try:
    with open(modules_path) as f:
      modules = json.load(f)
    listed = {os.path.normpath(m.get("path") or ""): m.get("type", "") for m in modules}
  except (OSError, ValueError, AttributeError, TypeError):  # not a modules.json we can read: not our concern here
    return
  if name in listed:
    kind = listed[name].rsplit(".", 1)[-1] or "a"
    raise CheckpointError(f"{path} is the {kind} module folder of the sentence-transformers directory {parent} "
                          f"(its modules.json lists it); pass {parent}, the whole model.")


def _orbax_step_dir(path: str) -> tuple[str, int] | None:
  """(checkpoints dir, step) when `path` is itself one step directory, e.g. WORKDIR/checkpoints/1000."""
  from instructor_jax import orbax_io
  name = os.path.basename(os.path.normpath(path))
  if name.isdigit() and os.path.isdir(os.path.join(path, orbax_io.PARAMS_ITEM)):
    return os.path.dirname(os.path.normpath(path)), int(name)
  return None


def _load_t5x(path: str, max_distance: int | None, step: int | None) -> LoadedModel:
  from instructor_jax import t5x_format
  distance = t5x_format.DEFAULT_MAX_DISTANCE if max_distance is None else int(max_distance)
  config, params, directory = t5x_format.load_t5x_checkpoint(path, max_distance=distance, step=step)
  # t5x checkpoints carry no tokenizer; GTR/T5 all use the standard T5 SentencePiece vocabulary.
  return LoadedModel(config, params, None, f"t5x:{directory}")


def _load_orbax(path: str, step: int | None) -> LoadedModel:
  from instructor_jax import orbax_io
  step_dir = _orbax_step_dir(path)
  if step_dir is not None:
    if step is not None and step != step_dir[1]:
      raise CheckpointError(f"{path} is the checkpoint of step {step_dir[1]}, but step={step} was requested.")
    path, step = step_dir
  try:
    config, params = orbax_io.restore_params(path, step=step)
  except orbax_io.OrbaxCheckpointError as e:
    raise CheckpointError(str(e)) from e
  used = step if step is not None else orbax_io.latest_step(path)
  return LoadedModel(config, params, None, f"orbax:{orbax_io.checkpoint_dir(path)}@{used}")


def load_source(name_or_path: str, revision: str | None = None, *, step: int | None = None,
                max_distance: int | None = None) -> LoadedModel:
  """Config, float32 parameters (nested dict of NumPy arrays) and tokenizer location.

  `step` picks a step of an orbax workdir or a t5x model directory (default: the latest);
  `max_distance` overrides the relative-attention max distance of t5x checkpoints (default 128).
  """
  path = os.path.expanduser(str(name_or_path))
  is_local_dir = os.path.isdir(path)
  if is_local_dir or path.startswith("gs://"):
    kind = detect_kind(path)
    if max_distance is not None and kind != "t5x":
      raise CheckpointError(f"{path}: max_distance (convert --max-distance) applies to t5x checkpoints only; a {kind} checkpoint "
                            "stores its own (config.json / model_config).")
    if step is not None and kind == "hf":
      raise CheckpointError(f"{path}: step (convert --step) applies to orbax and t5x checkpoints, not to a transformers "
                            "directory.")
    if kind == "hf":
      config, params = load_hf_directory(path)
      return LoadedModel(config, params, transformer_dir(path), f"hf:{os.path.abspath(path)}", path)
    if kind == "t5x":
      return _load_t5x(path, max_distance, step)
    return _load_orbax(path, step)
  if os.path.exists(path):
    raise CheckpointError(f"{path} is a file; pass the model directory that contains it.")
  if looks_like_hub_id(name_or_path):
    if step is not None or max_distance is not None:
      raise CheckpointError(f"{name_or_path}: step / max_distance do not apply to Hugging Face Hub models.")
    local = resolve_hub_id(name_or_path, revision)
    config, params = load_hf_directory(local)
    return LoadedModel(config, params, transformer_dir(local), f"hub:{name_or_path}", local)
  raise CheckpointError(f"{name_or_path!r}: no such directory, and not a Hub id of the form 'owner/name'.")
