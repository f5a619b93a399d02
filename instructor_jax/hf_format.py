"""Hugging Face / sentence-transformers names and layouts <-> our t5x-named parameter tree.

Pure NumPy: nothing here imports torch, so loading a safetensors directory needs no PyTorch.
Torch Linear weights are [out, in]; our kernels are [in, out] (t5x), hence the transposes.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from instructor_jax import torch_zip
from instructor_jax.config import InstructorConfig, T5Config

Params = dict[str, Any]

_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as an INSTRUCTOR/GTR encoder; the message says what to do."""


def t5_config_from_hf(hf: Mapping[str, Any], source: str) -> T5Config:
  """Reads a transformers T5 `config.json` dict; refuses anything that is not a T5 encoder."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type == "umt5":
    raise CheckpointError(
        f"{source}: model_type='umt5' has a separate relative-position-bias table in every layer; this "
        "encoder shares one table across layers (T5 / mT5 / GTR / INSTRUCTOR) and would silently ignore "
        "the others. Use a T5 or mT5 checkpoint.")
  if model_type not in ("t5", "mt5"):
    raise CheckpointError(
        f"{source}: model_type={model_type!r} (architectures={archs}); expected a T5 encoder "
        "(model_type 't5', e.g. T5EncoderModel as in hkunlp/instructor-* or sentence-transformers/gtr-t5-*). "
        "Decoder-only models (GPT-style) and non-T5 encoder-decoders cannot be used; a T5 "
        "encoder-decoder (T5ForConditionalGeneration, e.g. t5-base) is fine: its decoder is dropped.")
  ff = hf.get("feed_forward_proj", "relu")
  if ff == "relu":
    kind = "relu"
  elif ff in ("gated-gelu", "gated-gelu_new"):
    kind = "gated-gelu"
  else:
    raise CheckpointError(f"{source}: feed_forward_proj={ff!r} is not supported; expected 'relu' "
                          "(T5 v1.0) or 'gated-gelu' (T5 v1.1).")
  missing = [k for k in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers") if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: config.json lacks {missing}; a T5 config.json names vocab_size, d_model, "
                          "num_heads, d_kv, d_ff and num_layers. Restore the file from the model's release.")
  return T5Config(
      vocab_size=int(hf["vocab_size"]),
      d_model=int(hf["d_model"]),
      num_heads=int(hf["num_heads"]),
      d_kv=int(hf["d_kv"]),
      d_ff=int(hf["d_ff"]),
      num_layers=int(hf["num_layers"]),
      feed_forward=kind,
      relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
      dropout_rate=float(hf.get("dropout_rate", 0.1)),
  )


def hf_config_from_t5(cfg: T5Config, dtype: str = "float32") -> dict[str, Any]:
  """A transformers `config.json` for T5EncoderModel with this architecture."""
  return {
      "architectures": ["T5EncoderModel"],
      "model_type": "t5",
      "vocab_size": cfg.vocab_size,
      "d_model": cfg.d_model,
      "d_kv": cfg.d_kv,
      "d_ff": cfg.d_ff,
      "num_layers": cfg.num_layers,
      "num_heads": cfg.num_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": "relu" if cfg.feed_forward == "relu" else "gated-gelu",
      "is_encoder_decoder": False,
      "use_cache": False,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def _mlp_names(cfg: T5Config) -> tuple[str, ...]:
  return ("wi", "wo") if cfg.feed_forward == "relu" else ("wi_0", "wi_1", "wo")


def hf_name_map(cfg: T5Config) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (our parameter path, transpose?) for every encoder tensor."""
  names: dict[str, tuple[tuple[str, ...], bool]] = {
      "shared.weight": (("token_embedder", "embedding"), False),
      "encoder.final_layer_norm.weight": (("encoder", "encoder_norm", "scale"), False),
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
          (("encoder", "relpos_bias", "rel_embedding"), True),
  }
  for i in range(cfg.num_layers):
    block, layer = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
    for hf, ours in _ATTN.items():
      names[f"{block}.0.SelfAttention.{hf}.weight"] = (layer + ("attention", ours, "kernel"), True)
    names[f"{block}.0.layer_norm.weight"] = (layer + ("pre_attention_layer_norm", "scale"), False)
    names[f"{block}.1.layer_norm.weight"] = (layer + ("pre_mlp_layer_norm", "scale"), False)
    for w in _mlp_names(cfg):
      names[f"{block}.1.DenseReluDense.{w}.weight"] = (layer + ("mlp", w, "kernel"), True)
  return names


def _set(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def expected_shapes(cfg: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our parameter path -> shape, for the encoder part of the tree."""
  D, I, F = cfg.d_model, cfg.inner_dim, cfg.d_ff
  shapes = {
      ("token_embedder", "embedding"): (cfg.vocab_size, D),
      ("encoder", "encoder_norm", "scale"): (D,),
      ("encoder", "relpos_bias", "rel_embedding"): (cfg.num_heads, cfg.relative_attention_num_buckets),
  }
  for i in range(cfg.num_layers):
    layer = ("encoder", f"layers_{i}")
    for name in ("query", "key", "value"):
      shapes[layer + ("attention", name, "kernel")] = (D, I)
    shapes[layer + ("attention", "out", "kernel")] = (I, D)
    shapes[layer + ("pre_attention_layer_norm", "scale")] = (D,)
    shapes[layer + ("pre_mlp_layer_norm", "scale")] = (D,)
    for w in _mlp_names(cfg):
      shapes[layer + ("mlp", w, "kernel")] = (F, D) if w == "wo" else (D, F)
  return shapes


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: T5Config, source: str) -> Params:
  """Builds the encoder parameter tree (float32) from HF-named tensors, checking every shape."""
  tensors = dict(tensors)
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
  dropped = sorted({k.split(".")[0] for k in tensors if k.startswith(("decoder.", "lm_head."))})
  if dropped:
    warnings.warn(f"{source}: encoder-decoder checkpoint; dropping the {' and '.join(dropped)} weights "
                  "(only the encoder is used for embeddings).", stacklevel=2)
  shapes = expected_shapes(cfg)
  name_map = hf_name_map(cfg)
  # An encoder tensor the config does not account for (an extra layer, a per-layer bias table)
  # would otherwise be dropped silently and give wrong embeddings.
  unexpected = sorted(k for k in tensors if k.startswith("encoder.") and k not in name_map
                      and k != "encoder.embed_tokens.weight")
  if unexpected:
    raise CheckpointError(f"{source}: encoder tensor(s) {unexpected[:4]} are not part of the architecture in "
                          f"config.json ({cfg.num_layers} layers, feed_forward={cfg.feed_forward}); the "
                          "config and the weights disagree.")
  params: Params = {}
  for hf_name, (path, transpose) in name_map.items():
    if hf_name not in tensors:
      raise CheckpointError(f"{source}: tensor {hf_name!r} is missing; the checkpoint does not match its "
                            f"config.json ({cfg.num_layers} layers, feed_forward={cfg.feed_forward}).")
    value = np.asarray(tensors[hf_name], dtype=np.float32)
    value = value.T if transpose else value
    if value.shape != shapes[path]:
      raise CheckpointError(f"{source}: tensor {hf_name!r} has shape {tuple(np.shape(tensors[hf_name]))}; "
                            f"config.json implies {shapes[path][::-1] if transpose else shapes[path]}.")
    _set(params, path, np.ascontiguousarray(value))
  return params


def hf_tensors_from_params(params: Params, cfg: T5Config) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, float32 array) one tensor at a time, so exports can stream."""
  for hf_name, (path, transpose) in hf_name_map(cfg).items():
    value = np.asarray(_get(params, path), dtype=np.float32)
    yield hf_name, np.ascontiguousarray(value.T if transpose else value)


def hf_tensor_sizes(params: Params, cfg: T5Config, itemsize: int) -> list[tuple[str, int]]:
  """(HF name, bytes at `itemsize` bytes per element) in `hf_tensors_from_params` order, copying nothing."""
  return [(name, int(np.prod(np.shape(_get(params, path)))) * itemsize) for name, (path, _) in hf_name_map(cfg).items()]


def load_state_file(path: str) -> dict[str, np.ndarray]:
  """Reads one `.safetensors` or torch `.bin` file into float32 NumPy arrays (torch not needed for either)."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except Exception as e:  # bf16 tensors cannot be read by the numpy backend
      if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
      return _load_safetensors_via_flax(path)
  if path.endswith((".bin", ".pt", ".pth")):
    return {k: np.asarray(v, dtype=np.float32) for k, v in _load_torch_file(path).items()}
  raise CheckpointError(f"{path}: unknown weight file type; expected .safetensors or .bin.")


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
  """A torch `.bin` state dict: read without torch where possible, else with torch (weights only)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file.")
  try:
    return torch_zip.load(path)
  except torch_zip.Unsupported as e:
    reason = e
  try:
    import torch
  except ImportError:
    if reason.damaged:
      raise CheckpointError(f"{path}: a damaged torch checkpoint: {reason}. Download or copy it again.") from None
    raise CheckpointError(f"{path}: cannot be read without PyTorch: {reason}. Install torch "
                          "(`pip install instructor_jax[torch]`) or convert the file to safetensors.") from None
  try:
    # weights_only: never run arbitrary pickled code from a downloaded checkpoint.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: not a readable torch state dict ({reason}; torch.load: {str(e)[:300]}).") from e
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.layout == torch.strided
                                            for v in state.values()):
    raise CheckpointError(f"{path}: expected a flat {{name: dense tensor}} state dict.")
  return {k: v.float().numpy() for k, v in state.items()}


def _load_safetensors_via_flax(path: str) -> dict[str, np.ndarray]:
  from safetensors.flax import load_file
  return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(path).items()}


def load_hf_weights(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a transformers model directory: single or sharded safetensors, or `.bin`."""
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index_path = os.path.join(directory, index_name)
    if os.path.exists(index_path):
      with open(index_path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors: dict[str, np.ndarray] = {}
      for shard in shards:
        shard_path = os.path.join(directory, shard)
        if not os.path.exists(shard_path):
          raise CheckpointError(f"{index_path} names shard {shard!r}, which is missing from {directory}.")
        tensors.update(load_state_file(shard_path))
      return tensors
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(directory, name)):
      return load_state_file(os.path.join(directory, name))
  raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found; "
                        "expected a transformers / sentence-transformers model directory.")


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from e


def _modules(directory: str) -> list[dict[str, Any]]:
  modules_path = os.path.join(directory, "modules.json")
  return _read_json(modules_path) if os.path.exists(modules_path) else []


def transformer_dir(directory: str) -> str:
  """Where the T5's config, weights and tokenizer are: the root, or (older sentence-transformers
  layout) the folder of the Transformer module named in modules.json, e.g. `0_Transformer/`."""
  if os.path.exists(os.path.join(directory, "config.json")):
    return directory
  for module in _modules(directory):
    folder = module.get("path") or ""
    if module.get("type", "").endswith("Transformer") and os.path.exists(os.path.join(directory, folder, "config.json")):
      return os.path.join(directory, folder)
  return directory


# sentence-transformers' legacy boolean pooling keys and the mode each names.
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def pooling_modes(cfg: Mapping[str, Any]) -> list[str]:
  """The pooling modes a Pooling `config.json` means, read as sentence-transformers reads it: its
  `pooling_mode` (a name or a list; newer versions), else the legacy keys set true, else mean."""
  mode = cfg.get("pooling_mode")
  if mode is not None:
    return [mode] if isinstance(mode, str) else list(mode)
  return [name for key, name in _LEGACY_POOLING_KEYS.items() if cfg.get(key)] or ["mean"]


# The module pipeline this package computes, by class name (sentence-transformers moved its modules
# between packages over versions; the class name stayed): the T5, mean pooling, at most one bias-free
# projection, normalisation.
_STAGES = (("Transformer", "T5", "INSTRUCTOR_Transformer"), ("Pooling", "INSTRUCTOR_Pooling"), ("Dense",),
           ("Normalize",))


def _check_modules(directory: str) -> None:
  """Refuses a modules.json whose pipeline is not Transformer, Pooling, [Dense], [Normalize] in that
  order: any other module (a LayerNorm, a second Dense, ...) would be skipped, and the embeddings
  would silently differ from sentence-transformers'."""
  modules = _modules(directory)
  expected = "Transformer, Pooling, then optionally one Dense (no bias, identity activation) and Normalize"
  stage = 0
  for i, module in enumerate(modules):
    kind = str(module.get("type") or "?").rsplit(".", 1)[-1]
    if kind == "instructor":
      # InstructorEmbedding 1.0.1 saves through sentence-transformers 2.2.2, which records the class's
      # module, "InstructorEmbedding.instructor", for its Transformer (first) and Pooling alike.
      kind = "Transformer" if i == 0 else "Pooling" if "Pooling" in str(module.get("path")) else kind
    ahead = [j for j in range(stage, len(_STAGES)) if kind in _STAGES[j]]
    if not ahead or (stage < 2 and ahead[0] != stage):  # the Transformer and Pooling stages are not optional
      raise CheckpointError(
          f"{directory}/modules.json: module {i} ({module.get('path') or '.'}) is {module.get('type')!r}, where this "
          f"package computes {expected}; loading it without that module would change its embeddings. Use "
          "sentence-transformers for this model, or remove the module if it is really not needed.")
    stage = ahead[0] + 1
  if modules and stage < 2:
    raise CheckpointError(f"{directory}/modules.json: no Pooling module after the Transformer; this package computes "
                          f"{expected}.")
  _check_pooling(directory)


def _check_pooling(directory: str) -> None:
  """Refuses a sentence-transformers Pooling module that is not mean pooling (the only kind loaded)."""
  for module in _modules(directory):
    if not module.get("type", "").endswith("Pooling"):
      continue
    path = os.path.join(directory, module.get("path") or "", "config.json")
    if not os.path.exists(path):
      continue
    modes = pooling_modes(_read_json(path))
    if modes != ["mean"]:
      raise CheckpointError(f"{path}: pooling {modes}; INSTRUCTOR and GTR use mean pooling alone, which is all "
                            "this package implements: loading this model would change its embeddings.")


def _find_dense_dir(directory: str) -> str | None:
  """The sentence-transformers Dense module directory named in modules.json, if any."""
  for module in _modules(directory):
    if module.get("type", "").endswith("Dense"):
      dense_dir = os.path.join(directory, module["path"])
      if not os.path.isdir(dense_dir):
        raise CheckpointError(f"{directory}/modules.json lists the Dense module {module['path']!r}, but {dense_dir} "
                              "does not exist (a partial copy?); copy the whole model directory again.")
      return dense_dir
  return None


def _load_dense(dense_dir: str) -> np.ndarray:
  cfg_path = os.path.join(dense_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{cfg_path}: missing; a sentence-transformers Dense module has a config.json (in_features, "
                          "out_features, bias, activation_function) beside its weights. Copy the whole model "
                          "directory again.")
  cfg = _read_json(cfg_path)
  activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
  if cfg.get("bias", False) or not activation.endswith("Identity"):
    raise CheckpointError(f"{dense_dir}/config.json: Dense with bias={cfg.get('bias')} and activation "
                          f"{activation!r}; INSTRUCTOR/GTR use a bias-free identity projection.")
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(dense_dir, name)
    if os.path.exists(path):
      state = load_state_file(path)
      if "linear.weight" not in state:
        raise CheckpointError(f"{path}: expected tensor 'linear.weight', found {sorted(state)}.")
      weight = state["linear.weight"]
      if weight.shape != (cfg["out_features"], cfg["in_features"]):
        raise CheckpointError(f"{path}: linear.weight has shape {weight.shape}; config.json says "
                              f"[{cfg['out_features']}, {cfg['in_features']}].")
      return np.ascontiguousarray(np.asarray(weight, np.float32).T)
  raise CheckpointError(f"{dense_dir}: no model.safetensors or pytorch_model.bin for the Dense layer.")


def _tokenizer_max_length(t5_dir: str) -> int | None:
  """`model_max_length` of the directory's tokenizer_config.json, unless absent or transformers' "no
  limit" placeholder (int(1e30))."""
  path = os.path.join(t5_dir, "tokenizer_config.json")
  if not os.path.exists(path):
    return None
  value = _read_json(path).get("model_max_length")
  return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def load_hf_directory(directory: str) -> tuple[InstructorConfig, Params]:
  """Reads a sentence-transformers (hkunlp/instructor-*, gtr-t5-*) or plain T5 directory."""
  _check_modules(directory)
  t5_dir = transformer_dir(directory)
  config_path = os.path.join(t5_dir, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{directory}: no config.json; expected a transformers / sentence-transformers "
                          "T5 model directory (or a t5x / orbax checkpoint for the other loaders).")
  t5 = t5_config_from_hf(_read_json(config_path), config_path)
  params = params_from_hf(load_hf_weights(t5_dir), t5, t5_dir)
  max_len = None
  st_cfg_path = os.path.join(t5_dir, "sentence_bert_config.json")
  if os.path.exists(st_cfg_path):
    st_cfg = _read_json(st_cfg_path)
    # 1.0.1 lowercases instruction and text for such a model; no INSTRUCTOR/GTR checkpoint is one,
    # and embedding it without lowercasing would be silently different.
    if st_cfg.get("do_lower_case"):
      raise CheckpointError(f"{st_cfg_path}: do_lower_case is true; instructor_jax does not lowercase inputs. "
                            "Set it to false if the model was trained on cased text, or lowercase your "
                            "instructions and texts yourself and set it to false.")
    max_len = st_cfg.get("max_seq_length")
  # sentence-transformers 6 no longer writes max_seq_length there: it keeps the tokenizer's
  # model_max_length, which is where it reads the length from (as older versions did without one).
  max_len = int(max_len or _tokenizer_max_length(t5_dir) or 512)
  dense_dir = _find_dense_dir(directory)
  projection_dim = None
  if dense_dir is not None:
    kernel = _load_dense(dense_dir)
    if kernel.shape[0] != t5.d_model:
      raise CheckpointError(f"{dense_dir}: projection input size {kernel.shape[0]} != d_model {t5.d_model}.")
    params["projection_layer"] = {"kernel": kernel}
    projection_dim = kernel.shape[1]
  modules = _modules(directory)  # no modules.json: a plain T5 directory, normalised like GTR
  if not os.path.exists(os.path.join(directory, "modules.json")):
    # Legitimate (a t5-base to train from), but also what a partial copy of an INSTRUCTOR/GTR
    # directory looks like, whose embeddings would then silently lose the 768-wide projection.
    warnings.warn(f"{directory}: a plain transformers T5 directory (no modules.json), loaded without a projection: "
                  f"embeddings are the mean-pooled, normalised {t5.d_model}-wide hidden states. hkunlp/instructor-* and "
                  "GTR are sentence-transformers directories (modules.json, 2_Dense/); if this is part of one, "
                  "pass the whole directory.", stacklevel=3)
  normalize = not modules or any(m.get("type", "").endswith("Normalize") for m in modules)
  cfg = InstructorConfig(encoder=t5, projection_dim=projection_dim, max_seq_length=max_len, normalize=normalize)
  return cfg, params
