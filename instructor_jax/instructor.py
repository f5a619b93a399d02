"""`Instructor`: the user-facing model, a drop-in for `InstructorEmbedding.INSTRUCTOR`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructor_jax.config import InstructorConfig
from instructor_jax.model import InstructorModel
from instructor_jax.tokenization import DEFAULT_BUCKETS, Batch, Tokenizer, bucket_length, pad_batch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def canonical_dtype(dtype: str) -> str:
  if str(dtype) not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(set(DTYPES.values()))}.")
  return DTYPES[str(dtype)]


def local_data_mesh() -> Mesh:
  """A 1-D mesh over this host's devices; embedding batches are split along it."""
  devices = np.array(jax.local_devices())
  return Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class Instructor:
  """INSTRUCTOR embedding model: `Instructor.from_pretrained(src).encode([[instr, text], ...])`."""

  def __init__(self, config: InstructorConfig, params: Any, tokenizer: Tokenizer,
               source: str | None = None, mesh: Mesh | None = None):
    self.config = config
    self.tokenizer = tokenizer
    self.source = source
    self.mesh = mesh or local_data_mesh()
    self._replicated = NamedSharding(self.mesh, P())
    self._rows = NamedSharding(self.mesh, P("data"))
    self._rows2d = NamedSharding(self.mesh, P("data", None))
    self.params = jax.device_put(params, self._replicated)

  # ---- loading and saving ------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, name_or_path: str, dtype: str = "float32", max_seq_length: int | None = None,
                      **source_kwargs: Any) -> "Instructor":
    """Loads a Hub id, a sentence-transformers/HF directory, a t5x checkpoint or a training workdir."""
    from instructor_jax.sources import load_source
    loaded = load_source(name_or_path, **source_kwargs)
    config = loaded.config.with_encoder(dtype=canonical_dtype(dtype), dropout_rate=loaded.config.encoder.dropout_rate)
    if max_seq_length is not None:
      config = config.replace(max_seq_length=int(max_seq_length))
    tokenizer = Tokenizer.from_pretrained(loaded.tokenizer_dir, config.max_seq_length)
    return cls(config, loaded.params, tokenizer, source=loaded.description)

  def save_pretrained(self, directory: str, dtype: str = "float32", prompts: dict[str, str] | None = None,
                      **export_kwargs: Any) -> None:
    """Writes a sentence-transformers directory (also loadable by transformers and InstructorEmbedding).

    `export_kwargs` go to `export.save_sentence_transformers` (max_shard_bytes, instructor_embedding_compat).
    """
    from instructor_jax.export import save_sentence_transformers
    save_sentence_transformers(directory, self.config, jax.device_get(self.params), self.tokenizer.hf_tokenizer,
                               dtype=dtype, prompts=prompts, source=self.source, **export_kwargs)

  # ---- inference ---------------------------------------------------------------------------------

  @property
  def max_seq_length(self) -> int:
    return self.config.max_seq_length

  @max_seq_length.setter
  def max_seq_length(self, value: int) -> None:
    self.config = self.config.replace(max_seq_length=int(value))
    self.tokenizer.max_seq_length = int(value)

  def embed_batch(self, batch: Batch) -> np.ndarray:
    """Embeds one padded batch whose row count is a multiple of the local device count."""
    return np.asarray(jax.device_get(self.embed_batch_async(batch)), np.float32)

  def embed_batch_async(self, batch: Batch) -> jax.Array:
    """Dispatches one batch and returns the (not yet fetched) device array, for pipelining."""
    ids, mask, n = (jax.device_put(x, s) for x, s in
                    ((batch.ids, self._rows2d), (batch.mask, self._rows2d), (batch.n_instr, self._rows)))
    # The config (compute dtype) is part of the cache key, so changing it never reuses stale code.
    return _compiled(self.config, self.mesh)(self.params, ids, mask, n)

  def encode(self, sentences: Sequence[Any] | str, batch_size: int = 32, show_progress_bar: bool = False,
             convert_to_numpy: bool = True, max_seq_length: int | None = None,
             buckets: Sequence[int] = DEFAULT_BUCKETS, **unused: Any) -> np.ndarray:
    """Embeddings [N, E] float32 for strings or `[instruction, text]` pairs, in input order."""
    single = isinstance(sentences, str)
    items = [sentences] if single else list(sentences)
    max_len = max_seq_length or self.max_seq_length
    ids, n_instr = self.tokenizer.tokenize(items, max_len)
    # Longest first, like sentence-transformers: batches of similar length waste little padding.
    order = np.argsort([-len(x) for x in ids], kind="stable")
    ndev = self.mesh.devices.size
    rows = -(-batch_size // ndev) * ndev
    out = np.zeros((len(items), self.config.embedding_dim), np.float32)
    starts = range(0, len(items), batch_size)
    if show_progress_bar:
      from tqdm.auto import tqdm
      starts = tqdm(starts, desc="Batches")
    pending = None  # (row indices, device array): fetch batch k only after dispatching k + 1
    for start in starts:
      idx = order[start:start + batch_size]
      chunk = [ids[i] for i in idx]
      length = bucket_length(max(len(x) for x in chunk), buckets, max_len)
      dispatched = (idx, self.embed_batch_async(pad_batch(chunk, [n_instr[i] for i in idx], length, rows)))
      if pending is not None:
        out[pending[0]] = np.asarray(pending[1])[: len(pending[0])]
      pending = dispatched
    if pending is not None:
      out[pending[0]] = np.asarray(pending[1])[: len(pending[0])]
    return out[0] if single else out


@functools.lru_cache(maxsize=16)
def _compiled(config: InstructorConfig, mesh: Mesh):
  rows2d = NamedSharding(mesh, P("data", None))
  rows = NamedSharding(mesh, P("data"))

  def forward(params, ids_BL, mask_BL, n_instr_B):
    return InstructorModel(config).apply({"params": params}, ids_BL, mask_BL, n_instr_B)

  return jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), rows2d, rows2d, rows), out_shardings=rows2d)
