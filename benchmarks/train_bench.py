"""Train-step benchmark: our sharded JAX step vs a plain PyTorch INSTRUCTOR-loss step, same shapes.

Both take B triples (query, positive, hard negative) of `length` tokens, run one concatenated
encoder pass over 3B rows, INSTRUCTOR's loss at tau 0.01, AdamW; bf16 compute on GPU
(torch: autocast), float32 on CPU. Token ids are random: FLOPs do not depend on the text.
"""

from __future__ import annotations

import os
import time

import numpy as np

from instructor_jax.config import InstructorConfig

N_INSTR = 8  # instruction tokens excluded from pooling, as with a typical MEDI instruction


def _random_triples(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for part in ("query", "pos", "neg"):
    out[f"{part}_ids"] = rng.integers(2, vocab, size=(batch, length), dtype=np.int32)
    out[f"{part}_mask"] = np.ones((batch, length), np.int32)
    out[f"{part}_n_instr"] = np.full((batch,), N_INSTR, np.int32)
  return out


def _torch_step(cfg: InstructorConfig, export_dir: str, batch: int, length: int):
  import torch
  import torch.nn.functional as F
  from safetensors.torch import load_file
  from transformers import T5EncoderModel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  enc = T5EncoderModel.from_pretrained(export_dir).to(dev).train()
  dense = torch.nn.Linear(cfg.encoder.d_model, cfg.embedding_dim, bias=False).to(dev)
  dense.weight.data.copy_(load_file(os.path.join(export_dir, "2_Dense", "model.safetensors"))["linear.weight"])
  opt = torch.optim.AdamW(list(enc.parameters()) + list(dense.parameters()), lr=2e-5)
  data = {k: torch.tensor(v, device=dev) for k, v in _random_triples(batch, length, cfg.encoder.vocab_size).items()}
  ids = torch.cat([data[f"{p}_ids"] for p in ("query", "pos", "neg")]).long()
  mask = torch.cat([data[f"{p}_mask"] for p in ("query", "pos", "neg")])
  pool = mask.clone().float()
  pool[:, :N_INSTR] = 0
  targets = torch.zeros(batch, dtype=torch.long, device=dev)

  def step():
    with torch.autocast(device_type="cuda" if dev == "cuda" else "cpu", dtype=torch.bfloat16, enabled=dev == "cuda"):
      hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden.float() * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)
    q, p, n = F.normalize(dense(pooled), dim=-1).split(batch)
    term1 = torch.cat([(q * p).sum(-1, keepdim=True), q @ n.T], dim=1) / 0.01
    term2 = (p @ q.T) / 0.01
    loss = F.cross_entropy(term1, targets) + F.cross_entropy(term2, torch.arange(batch, device=dev))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def sync(x):
    return float(x.detach().cpu())

  return step, sync


def _jax_step(cfg: InstructorConfig, params, batch: int, length: int, remat: str = "none"):
  """Our jitted, donating train step on a data-parallel mesh over every local device."""
  import jax
  from instructor_jax import sharding as shd
  from instructor_jax import train_step as ts
  from instructor_jax.optim import OptimConfig, make_optimizer
  cfg = cfg.with_encoder(remat_policy=remat)
  mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=1, tensor=1))
  tx, schedule = make_optimizer(OptimConfig(learning_rate=2e-5, warmup_fraction=0.0), total_steps=1000)
  state = ts.init_state(cfg, tx, mesh, params=params)
  step_fn = ts.make_train_step(cfg, tx, schedule, mesh, loss="instructor", temperature=0.01)
  data = shd.global_batch(_random_triples(batch, length, cfg.encoder.vocab_size), mesh)
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], data)
    return metrics["loss"]

  return step, lambda x: float(jax.device_get(x))


def _time(step, sync, steps: int) -> float:
  sync(step())  # compile / warm-up
  sync(step())
  t = time.perf_counter()
  out = None
  for _ in range(steps):
    out = step()
  sync(out)
  return (time.perf_counter() - t) / steps


def train_section(cfg: InstructorConfig, params, export_dir: str, batch: int, length: int,
                  matmul: dict, quick: bool) -> list[dict]:
  from run import matmul_flops_per_token
  _, train_flops = matmul_flops_per_token(cfg.encoder, length)
  tokens = 3 * batch * length
  steps = 2 if quick else 10
  rows = []
  variants = [("pytorch", lambda: _torch_step(cfg, export_dir, batch, length), "torch_tflops"),
              ("instructor_jax", lambda: _jax_step(cfg, params, batch, length), "jax_tflops"),
              ("instructor_jax+remat", lambda: _jax_step(cfg, params, batch, length, "save_dots"), "jax_tflops")]
  for impl, make, peak_key in variants:
    try:
      step, sync = make()
      seconds = _time(step, sync, steps)
    except Exception as e:  # out of memory at this batch is a result, not a crash
      rows.append({"impl": impl, "batch": batch, "length": length, "error": f"{type(e).__name__}: {e}"[:300],
                   "tok_s": float("nan"), "step_s": float("nan")})
      continue
    row = {"impl": impl, "batch": batch, "length": length, "step_s": seconds, "tok_s": tokens / seconds}
    if peak_key in matmul:
      row["mfu"] = train_flops * tokens / seconds / (matmul[peak_key] * 1e12)
    rows.append(row)
  return rows
