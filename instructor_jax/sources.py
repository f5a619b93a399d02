"""Resolves a model source (Hub id, HF/sentence-transformers dir, ...) to config + parameters."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from instructor_jax.config import InstructorConfig
from instructor_jax.hf_format import CheckpointError, load_hf_directory


@dataclasses.dataclass
class LoadedModel:
  config: InstructorConfig
  params: Any
  tokenizer_dir: str | None  # None: the bundled T5 vocabulary
  description: str


def resolve_hub_id(name: str, revision: str | None = None) -> str:
  """Downloads (or finds in the cache) a Hub repository; respects HF_HUB_OFFLINE."""
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(name, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*/*"])
  except Exception as e:  # offline, unknown repo, no network: all end up here
    raise CheckpointError(
        f"{name!r} is not a local path and could not be fetched from the Hugging Face Hub "
        f"({type(e).__name__}: {e}). If you are offline, download it once with network access "
        "(it is then cached), or pass a local directory.") from e


def load_source(name_or_path: str, revision: str | None = None) -> LoadedModel:
  """Config, float32 parameters (nested dict of NumPy arrays) and tokenizer location."""
  path = os.path.expanduser(str(name_or_path))
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "config.json")):
      config, params = load_hf_directory(path)
      return LoadedModel(config, params, path, f"hf:{os.path.abspath(path)}")
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; expected a sentence-transformers / transformers "
        "directory (config.json + model.safetensors or pytorch_model.bin).")
  if os.path.exists(path):
    raise CheckpointError(f"{path} is a file; pass the model directory that contains it.")
  if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
    local = resolve_hub_id(name_or_path, revision)
    config, params = load_hf_directory(local)
    return LoadedModel(config, params, local, f"hub:{name_or_path}")
  raise CheckpointError(f"{name_or_path!r}: no such directory, and not a Hub id of the form 'owner/name'.")
