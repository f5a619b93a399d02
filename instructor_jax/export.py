"""Writes a sentence-transformers directory (PyTorch serving) from our parameter tree.

The directory loads in sentence-transformers (`SentenceTransformer(dir).encode(texts,
prompt=instruction)`, with `include_prompt: false` so the instruction is excluded from pooling),
in plain `transformers.T5EncoderModel` (+ the pooling rule in README.md), and its tokenizer files
load in transformers 4.x as well as 5.x.

Weights are written shard by shard: each shard's tensors are produced one at a time from the
(float32) tree, so peak extra host memory is one shard, never a second copy of the model.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Iterator, Mapping

import numpy as np

from instructor_jax.config import InstructorConfig, canonical_dtype
from instructor_jax.hf_format import hf_config_from_t5, hf_tensor_sizes, hf_tensors_from_params

# Above this many bytes the weights are split into shards with an index (transformers' layout).
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_FILE_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                         "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")
# Runtime state that transformers 5 writes into tokenizer_config.json; meaningless in a saved model.
_TOKENIZER_RUNTIME_KEYS = ("is_local", "local_files_only", "name_or_path")


def _np_dtype(dtype: str) -> np.dtype:
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype={dtype!r}; expected one of {EXPORT_DTYPES}.")
  if dtype == "bfloat16":
    import ml_dtypes  # a JAX dependency: NumPy's bfloat16
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Greedy, order-preserving split of (name, nbytes) into shards of at most max_shard_bytes.

  A single tensor larger than the limit gets a shard of its own.
  """
  shards: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes:
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards


def write_safetensors(directory: str, tensors: Iterator[tuple[str, np.ndarray]], sizes: list[tuple[str, int]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes `model.safetensors`, or shards + `model.safetensors.index.json`; returns the file names.

  `sizes` lists every (name, nbytes) that `tensors` will yield, in order, so the shard count is
  known before the first byte is written; only one shard's tensors are alive at a time.
  """
  from safetensors.numpy import save_file
  total = sum(n for _, n in sizes)
  shards = plan_shards(sizes, max_shard_bytes) if total > max_shard_bytes else [[n for n, _ in sizes]]
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map: dict[str, str] = {}
  stream = iter(tensors)
  for file_name, shard in zip(names, shards):
    batch: dict[str, np.ndarray] = {}
    for expected in shard:
      name, value = next(stream)
      if name != expected:
        raise RuntimeError(f"tensor stream out of order: got {name!r}, planned {expected!r}.")
      batch[name] = value
      weight_map[name] = file_name
    # "format": "pt" is what transformers checks before loading a safetensors file.
    save_file(batch, os.path.join(directory, file_name), metadata={"format": "pt"})
    del batch
  if len(shards) > 1:
    _write_json(os.path.join(directory, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  return names


def _encoder_tensors(params: Mapping[str, Any], config: InstructorConfig,
                     dtype: np.dtype) -> tuple[Iterator[tuple[str, np.ndarray]], list[tuple[str, int]]]:
  sizes = hf_tensor_sizes(params, config.encoder, dtype.itemsize)
  stream = ((name, np.ascontiguousarray(value.astype(dtype, copy=False)))
            for name, value in hf_tensors_from_params(params, config.encoder))
  return stream, sizes


def _clear_weights(directory: str) -> None:
  """Removes weight files of an earlier export (the root's and the module folders'), so no stale
  shard, index or `2_Dense/pytorch_model.bin` can shadow the new ones or outlive a projection."""
  for folder in ("", "2_Dense"):
    for pattern in _WEIGHT_FILE_PATTERNS:
      for path in glob.glob(os.path.join(directory, folder, pattern)):
        os.remove(path)


def save_tokenizer(directory: str, hf_tokenizer: Any, max_seq_length: int) -> None:
  """Tokenizer files that load in transformers 5 and 4.x (InstructorEmbedding 1.0.1's stack)."""
  hf_tokenizer.save_pretrained(directory)
  vocab_file = getattr(hf_tokenizer, "vocab_file", None)
  spiece = os.path.join(directory, "spiece.model")
  # transformers 5 writes only tokenizer.json; slow (SentencePiece) tokenizers need spiece.model.
  if vocab_file and os.path.isfile(vocab_file) and not os.path.exists(spiece):
    shutil.copyfile(vocab_file, spiece)
  config_path = os.path.join(directory, "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    tok_cfg = json.load(f)
  extra = tok_cfg.pop("extra_special_tokens", None)
  # transformers 5 writes a *list* here; 4.x reads `extra_special_tokens` as a dict of named
  # tokens and fails on a list. 4.x's name for the list is `additional_special_tokens`.
  if isinstance(extra, list):
    basic = {tok_cfg.get(k) for k in ("eos_token", "pad_token", "unk_token", "bos_token")}
    additional = [t if isinstance(t, str) else t.get("content") for t in extra]
    tok_cfg["additional_special_tokens"] = [t for t in additional if t not in basic]
  elif isinstance(extra, dict) and extra:
    tok_cfg["extra_special_tokens"] = extra
  for key in _TOKENIZER_RUNTIME_KEYS:
    tok_cfg.pop(key, None)
  tok_cfg["model_max_length"] = int(max_seq_length)
  _write_json(config_path, tok_cfg)


def _modules(config: InstructorConfig) -> list[dict[str, Any]]:
  kinds = [("", "Transformer"), ("1_Pooling", "Pooling")]
  if config.projection_dim is not None:
    kinds.append(("2_Dense", "Dense"))
  if config.normalize:
    kinds.append(("3_Normalize", "Normalize"))
  return [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
          for i, (path, kind) in enumerate(kinds)]


def _pooling_config(d_model: int, instructor_embedding_compat: bool) -> dict[str, Any]:
  config = {"word_embedding_dimension": d_model, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False}
  if not instructor_embedding_compat:
    # The INSTRUCTOR contract: the instruction (ST's prompt) is encoded but not pooled.
    # InstructorEmbedding 1.0.1 builds its pooling with Pooling(**config) and rejects this key.
    config["include_prompt"] = False
  return config


def _save_dense(directory: str, config: InstructorConfig, params: Mapping[str, Any], dtype: np.dtype,
                with_torch_bin: bool) -> None:
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  kernel = np.asarray(params["projection_layer"]["kernel"], np.float32)
  _write_json(os.path.join(directory, "config.json"), {
      "in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]), "bias": False,
      "activation_function": "torch.nn.modules.linear.Identity"})
  weight = np.ascontiguousarray(kernel.T.astype(dtype))  # torch Linear weight is [out, in]
  save_file({"linear.weight": weight}, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  if with_torch_bin:
    # sentence-transformers 2.2.2 (under InstructorEmbedding 1.0.1) reads only 2_Dense/pytorch_model.bin.
    import torch
    torch_dtype = getattr(torch, "bfloat16" if dtype.name == "bfloat16" else dtype.name)
    tensor = torch.from_numpy(np.ascontiguousarray(kernel.T)).to(torch_dtype)
    torch.save({"linear.weight": tensor}, os.path.join(directory, "pytorch_model.bin"))


def _package_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("instructor_jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def _pooling_note(instructor_embedding_compat: bool) -> str:
  if not instructor_embedding_compat:
    return ("The instruction is passed as `prompt=`; `1_Pooling/config.json` has `include_prompt: false`, so\n"
            "it is encoded but excluded from the mean, as in INSTRUCTOR.")
  return ("This export uses the InstructorEmbedding 1.0.1 layout (`INSTRUCTOR(PATH).encode([[instruction, text]])`):\n"
          "its pooling config cannot carry `include_prompt`, so with sentence-transformers >= 2.4 call\n"
          "`model.set_pooling_include_prompt(False)` after loading, then pass the instruction as `prompt=`.")


def _readme(config: InstructorConfig, dtype: str, prompts: Mapping[str, str], source: str | None,
            instructor_embedding_compat: bool) -> str:
  enc = config.encoder
  prompt_lines = "".join(f"- `{k}`: {v!r}\n" for k, v in prompts.items()) or "- (none)\n"
  return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, instructor, gtr, t5]
---
# INSTRUCTOR / GTR embedding model (exported by instructor_jax)

Source: `{source or 'unknown'}`. Weights: {dtype}.
T5 {'v1.0 (ReLU)' if enc.feed_forward == 'relu' else 'v1.1 (gated-GELU)'} encoder: {enc.num_layers} layers,
d_model {enc.d_model}, {enc.num_heads} heads x d_kv {enc.d_kv}, d_ff {enc.d_ff}; mean pooling over the
text tokens; {'projection to ' + str(config.projection_dim) if config.projection_dim else 'no projection'};
{'L2-normalised' if config.normalize else 'not normalised'}. Max sequence length {config.max_seq_length}.

## Use

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("PATH")
emb = model.encode(["3D ActionSLAM: wearable person tracking"], prompt="Represent the Science title:")
```

{_pooling_note(instructor_embedding_compat)}
InstructorEmbedding 1.0.1 pools a one-token instruction (its `n <= 1 -> 0` rule) and strips each
text; sentence-transformers does neither, so compare the two with instructions of two or more
tokens and texts stripped of leading and trailing whitespace.

Plain transformers: `T5EncoderModel.from_pretrained("PATH")` on `instruction + text`, mean of the
last hidden state over the positions after the instruction's tokens (its token count without
EOS), then `2_Dense` (`linear.weight`, no bias) and L2 normalisation.

Named prompts (`prompt_name=`):
{prompt_lines}"""


def save_sentence_transformers(directory: str, config: InstructorConfig, params: Mapping[str, Any], hf_tokenizer: Any,
                               dtype: str = "float32", prompts: Mapping[str, str] | None = None,
                               source: str | None = None,
                               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                               instructor_embedding_compat: bool = False,
                               default_prompt_name: str | None = None) -> list[str]:
  """Writes the sentence-transformers directory; returns the weight file names of the encoder.

  `default_prompt_name` (one of `prompts`) is the prompt sentence-transformers applies when
  `encode` is given none.

  `instructor_embedding_compat` writes the layout that InstructorEmbedding 1.0.1 (sentence-transformers
  2.2.2) can load: no `include_prompt` key in the pooling config (that stack masks the instruction
  itself) and a torch `2_Dense/pytorch_model.bin` next to the safetensors file.
  """
  directory = os.path.expanduser(directory)  # as every reader of a path here does
  dtype = canonical_dtype(dtype)
  np_dtype = _np_dtype(dtype)
  if instructor_embedding_compat and config.projection_dim is not None:
    try:
      import torch  # noqa: F401
    except ImportError as e:
      raise ValueError("the InstructorEmbedding 1.0.1 layout needs PyTorch to write 2_Dense/pytorch_model.bin "
                       "(pip install torch).") from e
  prompts = dict(prompts or {})
  if default_prompt_name is not None and default_prompt_name not in prompts:
    raise ValueError(f"default_prompt_name={default_prompt_name!r} is not one of the prompts {sorted(prompts)}.")
  os.makedirs(directory, exist_ok=True)
  _clear_weights(directory)
  _write_json(os.path.join(directory, "config.json"), hf_config_from_t5(config.encoder, dtype))
  stream, sizes = _encoder_tensors(params, config, np_dtype)
  files = write_safetensors(directory, stream, sizes, max_shard_bytes)
  _write_json(os.path.join(directory, "modules.json"), _modules(config))
  _write_json(os.path.join(directory, "sentence_bert_config.json"),
              {"max_seq_length": int(config.max_seq_length), "do_lower_case": False})
  os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
  _write_json(os.path.join(directory, "1_Pooling", "config.json"), _pooling_config(config.encoder.d_model,
                                                                                 instructor_embedding_compat))
  if config.projection_dim is not None:
    _save_dense(os.path.join(directory, "2_Dense"), config, params, np_dtype, instructor_embedding_compat)
  if config.normalize:
    os.makedirs(os.path.join(directory, "3_Normalize"), exist_ok=True)
  _write_json(os.path.join(directory, "config_sentence_transformers.json"), {
      "__version__": {"instructor_jax": _package_version()}, "model_type": "SentenceTransformer",
      "prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine"})
  save_tokenizer(directory, hf_tokenizer, config.max_seq_length)
  with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
    f.write(_readme(config, dtype, prompts, source, instructor_embedding_compat))
  return files
