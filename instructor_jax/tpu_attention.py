"""T5 attention through the Pallas TPU flash-attention kernel: position bias and segment ids inside it.

Shape key as in t5.py (B batch, L length, H heads, K head dim). The kernel (jax.experimental.pallas
.ops.tpu.flash_attention) takes an additive bias [B, H, L, L], which carries T5's relative-position
bias and gets a gradient (so `rel_embedding` trains), and segment ids, which carry both padding and
packed rows: a query attends only to keys of its own segment. Padding positions form segment 0
and attend to each other; nothing reads them (real queries never see a padding key, pooling skips
them), so the embeddings equal the masked-softmax path to float rounding.

It has no dropout, and its key blocks are multiples of 128 tokens, so it applies only where
`applies()` says; elsewhere t5.py keeps the XLA paths. A pallas_call is not partitioned by XLA, so
under a mesh the kernel runs per shard through shard_map: the batch split over the mesh's data and
fsdp axes, heads over tensor, as in the sharding rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the kernel's key blocks must be multiples of 128 tokens
BATCH_MESH_AXES, HEADS_MESH_AXIS = ("data", "fsdp"), "tensor"


def applies(length: int, deterministic: bool, attention_dropout: float) -> bool:
  """True where the kernel computes exactly what the model asks: no attention dropout, L % 128 == 0."""
  return length % BLOCK == 0 and (deterministic or attention_dropout == 0.0)


def _block_sizes(length: int):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b = min(BLOCK, length)
  return fa.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b, block_k_major_dkv=b,
                       block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b, block_q_dq=b)


def _local(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, bias_HLL: jax.Array,
           segments_BL: jax.Array) -> jax.Array:
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  B, L, H, _ = q_BLHK.shape
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BLHK, k_BLHK, v_BLHK))
  # float32 bias, as the XLA path adds it to float32 logits.
  bias_BHLL = jnp.broadcast_to(bias_HLL.astype(jnp.float32)[None], (B, H, L, L))
  out_BHLK = fa.flash_attention(q, k, v, bias_BHLL, fa.SegmentIds(q=segments_BL, kv=segments_BL),
                                sm_scale=1.0, block_sizes=_block_sizes(L))
  return out_BHLK.transpose(0, 2, 1, 3)


def flash_attention_BLHK(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, bias_HLL: jax.Array,
                         segments_BL: jax.Array) -> jax.Array:
  """Attention output [B, L, H, K] (no 1/sqrt(K) scaling, as T5); `segments_BL`: 0 padding, 1.. texts."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _local(q_BLHK, k_BLHK, v_BLHK, bias_HLL, segments_BL)
  batch = tuple(a for a in mesh.axis_names if a in BATCH_MESH_AXES and mesh.shape[a] > 1) or None
  heads = HEADS_MESH_AXIS if mesh.shape.get(HEADS_MESH_AXIS, 1) > 1 else None
  spec_BLHK = P(batch, None, heads, None)
  return jax.shard_map(_local, mesh=mesh, in_specs=(spec_BLHK,) * 3 + (P(heads, None, None), P(batch, None)),
                       out_specs=spec_BLHK, check_vma=False)(q_BLHK, k_BLHK, v_BLHK, bias_HLL, segments_BL)
