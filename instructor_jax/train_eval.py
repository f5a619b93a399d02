"""STS evaluation inside the training loop: the model being trained, on the training mesh.

With `TrainConfig.eval_sts_path` set, every checkpoint's record in metrics.jsonl (and TensorBoard)
also carries `eval_sts_spearman` and `eval_sts_pearson` (x100) of the parameters that checkpoint
saves, so the best checkpoint can be picked without a separate job. Every host reads the same
file and holds the same (small) token arrays; the embeddings are computed by one jitted call per
chunk of rows, sharded like a training batch, and come back replicated. Texts are cut at the
run's `doc_len`: `python -m instructor_jax.evaluate --max-seq-length DOC_LEN` gives the same
numbers on a saved checkpoint (to float rounding).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from instructor_jax import evaluate, sharding as shd, tokenization
from instructor_jax.config import ConfigError, InstructorConfig
from instructor_jax.model import InstructorModel

CHUNK_ROWS = 256  # texts per jitted call (rounded up to the number of batch shards)


class StsEval:
  """Spearman/Pearson of cosine vs gold score on one STS file, for parameters on `mesh`."""

  def __init__(self, path: str, config: InstructorConfig, mesh: jax.sharding.Mesh, param_shardings: Any,
               instruction: str, max_len: int, encode_fn: tokenization.EncodeFn):
    self.pairs, self.gold = evaluate.read_sts(path)
    self.texts = texts = list(dict.fromkeys(t for pair in self.pairs for t in pair))
    try:
      ids, n_instr = tokenization.build_inputs(encode_fn, [[instruction, t] if instruction else t for t in texts],
                                               max_len)
    except tokenization.InstructionCoversTextError as e:
      raise ConfigError(f"TrainConfig.eval_instruction on {path}, text {texts[e.index]!r:.80}: {e.detail()}") from None
    length = min(max_len, -(-max(len(x) for x in ids) // 8) * 8)  # the longest text, not max_len, sets the cost
    shards = shd.batch_size_multiple(mesh)
    self.chunk = -(-min(CHUNK_ROWS, len(texts)) // shards) * shards
    rows = -(-len(texts) // self.chunk) * self.chunk
    self.ids = np.zeros((rows, length), np.int32)
    self.mask = np.zeros((rows, length), np.int32)
    for i, x in enumerate(ids):
      self.ids[i, :len(x)], self.mask[i, :len(x)] = x, 1
    self.n_instr = np.zeros((rows,), np.int32)
    self.n_instr[:len(texts)] = n_instr
    model = InstructorModel(config)

    def embed(params, ids, mask, n_instr):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
        return model.apply({"params": params}, ids, mask, n_instr, deterministic=True)

    rows2d, rows1d = shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh, 1)
    self._shardings = (rows2d, rows2d, rows1d)
    self._embed = jax.jit(embed, in_shardings=(param_shardings, *self._shardings),
                          out_shardings=shd.replicated(mesh))

  def __call__(self, params: Any) -> dict[str, float]:
    chunks = []
    for start in range(0, len(self.n_instr), self.chunk):
      # Every host holds the whole array, so each device's rows are a slice of it.
      arrays = [jax.make_array_from_callback((self.chunk,) + x.shape[1:], sharding,
                                             lambda idx, x=x[start:start + self.chunk]: x[idx])
                for x, sharding in zip((self.ids, self.mask, self.n_instr), self._shardings)]
      chunks.append(self._embed(params, *arrays))
    emb = np.concatenate([np.asarray(jax.device_get(c), np.float64) for c in chunks])[:len(self.texts)]
    scores = evaluate.sts_scores(dict(zip(self.texts, evaluate.unit_rows(emb))), self.pairs, self.gold)
    return {f"eval_sts_{name}": value for name, value in scores.items()}
