"""`Instructor`: the user-facing model, a drop-in for `InstructorEmbedding.INSTRUCTOR`."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Generator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructor_jax.config import InstructorConfig, canonical_dtype
from instructor_jax.encode_batches import BatchSpec, PlannedBatch, planned_batches
from instructor_jax.model import InstructorModel, with_compute_dtype_weights
from instructor_jax.t5 import attention_kernel, fused_attention_compiles
from instructor_jax.tokenization import DEFAULT_BUCKETS, Batch, PackedBatch, Tokenizer

def local_data_mesh(device: str | None = None) -> Mesh:
  """A 1-D mesh over this host's devices (or those `device` names); embedding batches are split along it.

  `device` takes sentence-transformers' spellings: "cpu", "cuda" / "gpu", "tpu", and ":N" for one
  device of that kind ("cuda:1"); None (or "") is every local device of JAX's default backend."""
  if not device:
    devices = jax.local_devices()
  else:
    kind, _, index = str(device).partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(kind.lower(), kind.lower())
    try:
      devices = jax.local_devices(backend=platform)
    except RuntimeError as e:
      raise ValueError(f"device={device!r}: JAX has no {platform!r} backend here ({e}); available: "
                       f"{sorted({d.platform for d in jax.devices()} | {'cpu'})}.") from None
    if index:
      if not index.isdigit() or int(index) >= len(devices):
        raise ValueError(f"device={device!r}: expected an index below {len(devices)} after ':'.")
      devices = [devices[int(index)]]
  return Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class Instructor:
  """INSTRUCTOR embedding model: `Instructor.from_pretrained(src).encode([[instr, text], ...])`."""

  def __init__(self, config: InstructorConfig, params: Any, tokenizer: Tokenizer,
               source: str | None = None, mesh: Mesh | None = None, prompts: dict[str, str] | None = None,
               default_prompt_name: str | None = None):
    self.mesh = mesh or local_data_mesh()
    self.config = config.with_encoder(dtype=canonical_dtype(config.encoder.dtype))  # "bf16" -> "bfloat16"
    platform = self.mesh.devices.flat[0].platform
    if self.config.encoder.dtype == "float16" and platform == "cpu" and jax.default_backend() != "cpu":
      # The model picks its CPU float16 form (matmuls widened to float32) from the default backend.
      raise ValueError(f"dtype float16 on a CPU mesh while JAX's default backend is {jax.default_backend()}: "
                       "use the accelerator's devices, or float32/bfloat16 on the CPU.")
    if self.config.encoder.attention_impl == "auto" and platform != jax.default_backend():
      # The model resolves "auto" from the default backend while tracing; other devices get XLA's kernel.
      self.config = self.config.with_encoder(attention_impl="dot_product_attention")
    self.tokenizer = tokenizer
    self.source = source
    # A sentence-transformers source's named prompts, kept for save_pretrained (as `convert` keeps
    # them); encode takes its instructions from the [instruction, text] pairs, not from these.
    self.prompts = dict(prompts or {})
    self.default_prompt_name = default_prompt_name
    self._replicated = NamedSharding(self.mesh, P())
    self._rows = NamedSharding(self.mesh, P("data"))
    self._rows2d = NamedSharding(self.mesh, P("data", None))
    self.params = jax.device_put(params, self._replicated)  # float32: what save_pretrained writes
    self._forward_params: tuple[Any, Any, list] | None = None

  # ---- loading and saving ------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, name_or_path: str, dtype: str = "float32", max_seq_length: int | None = None,
                      device: str | None = None, revision: str | None = None, step: int | None = None,
                      max_distance: int | None = None) -> "Instructor":
    """Loads a Hub id, a sentence-transformers/HF directory, a t5x checkpoint or a training workdir.

    `device` ("cpu", "cuda", "cuda:1", "tpu"; default: every local device) is where it computes, as
    `InstructorEmbedding.INSTRUCTOR(name, device=...)`. `revision` (Hub), `step` (a workdir's or t5x
    directory's step; default the latest) and `max_distance` (t5x) go to `sources.load_source`."""
    from instructor_jax.sources import load_source, load_tokenizer, source_prompts
    mesh = local_data_mesh(device)  # before loading: a wrong device fails fast
    loaded = load_source(name_or_path, revision, step=step, max_distance=max_distance)
    config = loaded.config.with_encoder(dtype=canonical_dtype(dtype))
    if max_seq_length is not None:
      config = config.replace(max_seq_length=int(max_seq_length))
    tokenizer = load_tokenizer(loaded, config.max_seq_length)
    prompts, default_prompt_name = source_prompts(loaded)
    if default_prompt_name:
      # sentence-transformers' encode prepends it to every text; 1.0.1's, which this one follows, does not.
      warnings.warn(f"{loaded.description}: the model's default prompt {default_prompt_name!r} "
                    f"({prompts.get(default_prompt_name, '')!r}) is not applied by encode, which takes instructions "
                    f"as [instruction, text] pairs (InstructorEmbedding 1.0.1); pass "
                    f"[[model.prompts[{default_prompt_name!r}], text], ...] to embed as sentence-transformers' encode "
                    "does by default.", stacklevel=2)
    return cls(config, loaded.params, tokenizer, source=loaded.description, mesh=mesh, prompts=prompts,
               default_prompt_name=default_prompt_name)

  def save_pretrained(self, directory: str, dtype: str = "float32", prompts: dict[str, str] | None = None,
                      **export_kwargs: Any) -> None:
    """Writes a sentence-transformers directory (also loadable by transformers and InstructorEmbedding).

    The source's named prompts and default prompt name (`self.prompts`, `self.default_prompt_name`)
    are written too, with `prompts` added over them, as `convert --prompt` does. `export_kwargs` go
    to `export.save_sentence_transformers` (max_shard_bytes, instructor_embedding_compat,
    default_prompt_name).
    """
    from instructor_jax.export import save_sentence_transformers
    export_kwargs.setdefault("default_prompt_name", self.default_prompt_name)
    save_sentence_transformers(directory, self.config, jax.device_get(self.params), self.tokenizer.hf_tokenizer,
                               dtype=dtype, prompts={**self.prompts, **(prompts or {})}, source=self.source,
                               **export_kwargs)

  # ---- inference ---------------------------------------------------------------------------------

  def forward_params(self) -> Any:
    """The weights the forward pass reads: matmul weights already in the compute dtype.

    Same numbers as casting `self.params` at every use, as the model does (bit-identical on CPU,
    tested; on GPU XLA may pick a different GEMM kernel for a cast-then-dot than for a bf16 dot).
    In bf16 it saves the casts on every call for half a float32 copy of device memory. Rebuilt
    when the compute dtype or any leaf of `self.params` changes (in-place edits included).
    """
    dtype = self.config.encoder.dtype
    if dtype == "float32":
      return self.params
    leaves = jax.tree.leaves(self.params)
    key = (dtype, tuple(id(x) for x in leaves))
    if self._forward_params is None or self._forward_params[0] != key:
      cast = jax.jit(functools.partial(with_compute_dtype_weights, dtype=dtype), out_shardings=self._replicated)
      # The leaves are kept with the key, so their ids cannot be reused while the key lives.
      self._forward_params = (key, cast(self.params), leaves)
    return self._forward_params[1]

  @property
  def attention_kernel(self) -> str:
    """The attention kernel inference asks for: the config's `attention_impl`, "auto" resolved for these devices.

    "xla" (the einsums) where a fused kernel cannot run (float16 on a CPU). A cuDNN refusal under
    "auto", rare on the GPUs "auto" picks it for, is warned about when the model is compiled."""
    enc = self.config.encoder
    device = self.mesh.devices.flat[0]
    if enc.attention_impl != "tpu_flash" and not fused_attention_compiles(enc.dtype, device.platform):
      return "xla"
    return attention_kernel(enc.attention_impl, enc.dtype, device)

  def get_sentence_embedding_dimension(self) -> int:
    """Size of the embeddings `encode` returns (sentence-transformers' name)."""
    return self.config.embedding_dim

  @property
  def max_seq_length(self) -> int:
    return self.config.max_seq_length

  @max_seq_length.setter
  def max_seq_length(self, value: int) -> None:
    self.config = self.config.replace(max_seq_length=int(value))
    self.tokenizer.max_seq_length = int(value)

  def embed_batch_async(self, batch: Batch) -> jax.Array:
    """Dispatches one batch and returns the (not yet fetched) device array, for pipelining."""
    ids, mask, n = (jax.device_put(x, s) for x, s in
                    ((batch.ids, self._rows2d), (batch.mask, self._rows2d), (batch.n_instr, self._rows)))
    # The config (compute dtype) is part of the cache key, so changing it never reuses stale code.
    return _compiled(self.config, self.mesh)(self.forward_params(), ids, mask, n)

  def embed_packed_async(self, batch: PackedBatch) -> jax.Array:
    """Dispatches one packed batch; returns [rows, texts per row, E] (not yet fetched)."""
    arrays = [jax.device_put(x, self._rows2d) for x in
              (batch.ids, batch.mask, batch.n_instr, batch.segments, batch.offsets)]
    return _compiled_packed(self.config, self.mesh)(self.forward_params(), *arrays)

  def encode(self, sentences: Sequence[Any] | str, batch_size: int = 32, show_progress_bar: bool = False,
             output_value: str = "sentence_embedding", convert_to_numpy: bool = True,
             convert_to_tensor: bool = False, device: Any = None, normalize_embeddings: bool = False,
             max_seq_length: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
             pack: bool = True, pack_length: int = 128) -> np.ndarray:
    """Embeddings [N, E] float32 for strings or `[instruction, text]` pairs, in input order.

    Texts of up to `pack_length` tokens are packed several to a row (`pack=True`, the default):
    attention and pooling stay within each text and T5 has no absolute positions, so the results
    equal unpacked ones to float rounding while padding almost vanishes. A packed batch is
    `batch_size` rows of `pack_length` tokens; longer texts go through length buckets. The last batch
    of each kind is padded only to the next power of two (times the device count) that holds it, so a
    call with a few texts costs a few rows. On an
    accelerator the input is tokenised and padded a chunk ahead on a worker thread (`encode_batches`).
    """
    # InstructorEmbedding.INSTRUCTOR.encode's arguments: `device` is ignored (the model's devices are
    # used: from_pretrained(device=...)), `convert_to_numpy` is always true; anything we cannot honour
    # is an error, not a no-op.
    if output_value != "sentence_embedding" or convert_to_tensor:
      raise ValueError(f"encode(output_value={output_value!r}, convert_to_tensor={convert_to_tensor}) is not "
                       "supported: only sentence embeddings as a NumPy array are returned.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"encode(batch_size={batch_size!r}): expected a positive int (texts per batch).")
    single = isinstance(sentences, str)
    items = [sentences] if single else list(sentences)
    if (len(items) == 2 and all(isinstance(x, str) for x in items) and items[0].lstrip().startswith("Represent")
        and items[0].rstrip().endswith(":")):
      warnings.warn("encode() got two plain strings, the first of which looks like an instruction: they are "
                    "embedded as two texts without instruction (as InstructorEmbedding does). For one "
                    "instructed text pass [[instruction, text]].", stacklevel=2)
    max_len = self.max_seq_length if max_seq_length is None else max_seq_length
    ndev = self.mesh.devices.size
    spec = BatchSpec(rows=-(-batch_size // ndev) * ndev, batch_size=batch_size,
                     pack_length=min(pack_length, max_len) if pack else 0, buckets=tuple(buckets), max_len=max_len,
                     devices=ndev)
    out = np.zeros((len(items), self.config.embedding_dim), np.float32)
    batches = planned_batches(lambda chunk: self.tokenizer.tokenize(chunk, max_len), items, spec,
                              self.mesh.devices.flat[0].platform)
    self._run_pipelined(batches, out, show_progress_bar)
    if normalize_embeddings and not self.config.normalize:
      out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out[0] if single else out

  def _run_pipelined(self, batches: Generator[PlannedBatch, None, None], out: np.ndarray,
                     show_progress_bar: bool) -> None:
    """Dispatches batch k + 1 before fetching batch k, so host work overlaps device work."""
    progress = None
    if show_progress_bar:
      from tqdm.auto import tqdm
      progress = tqdm(total=len(out), desc="Texts", unit="text")
    pending = None
    try:
      for rows, batch in batches:
        result = (self.embed_packed_async(batch) if isinstance(batch, PackedBatch)
                  else self.embed_batch_async(batch))
        if pending is not None:
          self._fetch(*pending, out, progress)
        pending = (rows, result)
      if pending is not None:
        self._fetch(*pending, out, progress)
    finally:
      batches.close()  # stops its worker now, not when a kept traceback lets go of the generator
      if progress is not None:
        progress.close()

  @staticmethod
  def _fetch(rows: list[list[int]], result: jax.Array, out: np.ndarray, progress: Any) -> None:
    scatter_embeddings(rows, result, out)
    if progress is not None:
      progress.update(sum(len(r) for r in rows))


def scatter_embeddings(rows: list[list[int]], result: jax.Array, out: np.ndarray) -> None:
  """Writes row r's text slot s (or row r itself, unpacked) to its item's place in `out`."""
  emb = np.asarray(result, np.float32)
  for r, items in enumerate(rows):
    for s, i in enumerate(items):
      out[i] = emb[r, s] if emb.ndim == 3 else emb[r]


@functools.lru_cache(maxsize=16)
def _compiled(config: InstructorConfig, mesh: Mesh):
  rows2d = NamedSharding(mesh, P("data", None))
  rows = NamedSharding(mesh, P("data"))

  def forward(params, ids_BL, mask_BL, n_instr_B):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # kernels that run per shard find the mesh
      return InstructorModel(config).apply({"params": params}, ids_BL, mask_BL, n_instr_B)

  return jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), rows2d, rows2d, rows), out_shardings=rows2d)


@functools.lru_cache(maxsize=16)
def _compiled_packed(config: InstructorConfig, mesh: Mesh):
  rows2d = NamedSharding(mesh, P("data", None))

  def forward(params, ids_BL, mask_BL, n_instr_BS, segments_BL, offsets_BL):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return InstructorModel(config).apply({"params": params}, ids_BL, mask_BL, n_instr_BS,
                                           segments_BL=segments_BL, offsets_BL=offsets_BL)

  return jax.jit(forward, in_shardings=(NamedSharding(mesh, P()),) + (rows2d,) * 5,
                 out_shardings=NamedSharding(mesh, P("data", None, None)))
