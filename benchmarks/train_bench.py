"""Train-step benchmark: our sharded JAX step vs a plain PyTorch INSTRUCTOR-loss step, same shapes.

Both take B triples (query, positive, hard negative) of `length` tokens, run one concatenated
encoder pass over 3B rows, INSTRUCTOR's loss at tau 0.01, AdamW; bf16 compute on GPU
(torch: autocast), float32 on CPU. Token ids are random: FLOPs do not depend on the text.
"""

from __future__ import annotations

import os
import re
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


def _torch_step(cfg: InstructorConfig, export_dir: str, batch: int, length: int, checkpointing: bool = False):
  import torch
  import torch.nn.functional as F
  from safetensors.torch import load_file
  from transformers import T5EncoderModel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  enc = T5EncoderModel.from_pretrained(export_dir).to(dev).train()
  if checkpointing:  # what a PyTorch user does when the batch does not fit
    enc.gradient_checkpointing_enable()
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


def _jax_step(cfg: InstructorConfig, params, batch: int, length: int, remat: str = "none", grad_cache_chunks: int = 1,
              xla_options: dict | None = None, fused_attention: bool = False, scan_layers: bool = False,
              dropout: str = "all"):
  """Our jitted, donating train step on a data-parallel mesh over every local device (compiled ahead of time).

  `xla_options` are added to the trainer's own compiler options (TrainConfig.xla_options).
  `dropout`: "all" (the model's rate everywhere, INSTRUCTOR's recipe), "none" (dropout 0), or
  "hidden" (attention_dropout_rate 0: the other dropouts stay). `fused_attention` (with "none" or
  "hidden", which drop no attention weights): attention on a fused kernel, forward and backward
  (cuDNN's on a GPU, XLA's elsewhere), rather than the einsums. Apart, they measure what the dropout
  masks cost and what the einsums' [B, H, L, L] tensors cost."""
  import jax
  from instructor_jax import sharding as shd
  from instructor_jax import train_step as ts
  from instructor_jax.optim import OptimConfig, make_optimizer
  from instructor_jax.xla_options import train_compiler_options
  cfg = cfg.with_encoder(remat_policy=remat, scan_layers=scan_layers)
  if dropout == "none":
    cfg = cfg.with_encoder(dropout_rate=0.0)
  elif dropout == "hidden":
    cfg = cfg.with_encoder(attention_dropout_rate=0.0)
  if fused_attention:
    assert dropout != "all", "the fused kernels have no attention dropout"
    cfg = cfg.with_encoder(attention_impl="cudnn" if jax.default_backend() == "gpu" else "dot_product_attention")
  mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=1, tensor=1))
  tx, schedule = make_optimizer(OptimConfig(learning_rate=2e-5, warmup_fraction=0.0), total_steps=1000)
  state = ts.init_state(cfg, tx, mesh, params=params)
  step_fn = ts.make_train_step(cfg, tx, schedule, mesh, loss="instructor", temperature=0.01,
                               grad_cache_chunks=grad_cache_chunks, compiler_options=train_compiler_options(xla_options))
  data = shd.global_batch(_random_triples(batch, length, cfg.encoder.vocab_size), mesh)
  compiled = step_fn.lower(state, data).compile()
  holder = {"state": state, "memory": _memory(compiled, batch)}

  def step():
    holder["state"], metrics = compiled(holder["state"], data)
    return metrics["loss"]

  step.memory = holder["memory"]
  return step, lambda x: float(jax.device_get(x))


def _memory(compiled, batch: int) -> dict:
  """XLA's memory analysis of the compiled step, and a lower bound on the batch that fits here.

  Parameters, optimizer state and the batch are the arguments (the state is donated, so outputs
  reuse them); XLA's temp buffers are activations, which grow with the batch, plus batch-independent
  gradient and update buffers. Charging all of temp to the batch overstates the cost per triple,
  so (free memory) / (temp per triple) is a lower bound on the largest batch whenever the compiled
  batch itself fits; one compile instead of one per candidate batch.
  """
  import jax
  out = {}
  try:
    m = compiled.memory_analysis()
    out = {"temp_gib": m.temp_size_in_bytes / 2 ** 30, "argument_gib": m.argument_size_in_bytes / 2 ** 30}
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit and m.temp_size_in_bytes:
      per_triple = m.temp_size_in_bytes / batch
      out["device_gib"] = limit / 2 ** 30
      out["max_batch_at_least"] = int((limit - m.argument_size_in_bytes) // per_triple) // 8 * 8
  except Exception as e:  # memory analysis is best effort: not every backend/JAX provides it
    out["memory_error"] = f"{type(e).__name__}: {e}"[:200]
  return out


def _time(step, sync, steps: int, warmup: int) -> tuple[float, float]:
  """(seconds per timed step, seconds of the first step: its one-off costs, e.g. cuBLAS/XLA autotuning
  and allocator growth; JAX's ahead-of-time compile is counted before, in `setup_s`)."""
  t = time.perf_counter()
  sync(step())
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    sync(step())
  t = time.perf_counter()
  out = None
  for _ in range(steps):
    out = step()
  sync(out)
  return (time.perf_counter() - t) / steps, first


# name -> (framework, options); "@B" after a name overrides the triples per step for that row.
VARIANTS = {
    "pytorch": ("torch", {}),
    "pytorch-ckpt": ("torch", {"checkpointing": True}),
    "jax": ("jax", {}),
    "jax-save_dots": ("jax", {"remat": "save_dots"}),
    "jax-full": ("jax", {"remat": "full"}),
    # On one H200 the full-remat step's XLA temp was 94.8 GiB at 256 triples, far above what full
    # remat should keep (BENCHMARKS.md): is the latency-hiding scheduler (on for GPU training,
    # xla_options.py) moving recomputation early? Same step with it off; on a CPU it changes nothing.
    "jax-full-nolhs": ("jax", {"remat": "full", "xla_options": {"xla_gpu_enable_latency_hiding_scheduler": False}}),
    # Full remat at dropout 0, attention on cuDNN's fused kernel (forward and backward; XLA's on a
    # CPU): what the einsums' [B, H, L, L] float32 tensors cost. A different recipe from the others.
    "jax-full-fused-nodrop": ("jax", {"remat": "full", "dropout": "none", "fused_attention": True}),
    "jax-gc4": ("jax", {"remat": "save_dots", "grad_cache_chunks": 4}),
    # The layers as one scan (T5Config.scan_layers): remat recomputes one layer per backward
    # iteration, whatever the scheduler does; with save_dots_no_batch only attention is recomputed,
    # if the projections' outputs fit (the way past full remat's 3/4 ceiling at 256 triples).
    "jax-full-scan": ("jax", {"remat": "full", "scan_layers": True}),
    "jax-dotsnb-scan": ("jax", {"remat": "save_dots_no_batch", "scan_layers": True}),
    # On one H200 (2026-11-28) recomputing only attention ran no faster than full remat (28.5% MFU
    # against 28.2%), so the recomputed matmuls are not what holds the step back. These split what
    # else might: the same step at dropout 0 with the einsum attention (what the dropout masks
    # cost), and at dropout 0 on cuDNN's fused attention (what the einsums' [B, H, L, L] float32
    # logits, softmax and weights cost on top).
    "jax-dotsnb-scan-nodrop": ("jax", {"remat": "save_dots_no_batch", "scan_layers": True, "dropout": "none"}),
    "jax-dotsnb-scan-fused-nodrop": ("jax", {"remat": "save_dots_no_batch", "scan_layers": True, "dropout": "none",
                                             "fused_attention": True}),
    # The recipe a user can train fast with: every dropout but the attention weights'
    # (attention_dropout_rate 0), attention on cuDNN's fused kernel.
    "jax-dotsnb-scan-fused-noattndrop": ("jax", {"remat": "save_dots_no_batch", "scan_layers": True,
                                                 "dropout": "hidden", "fused_attention": True}),
}
DEFAULT_VARIANTS = "pytorch,jax,jax-save_dots"


def parse_variants(spec: str, batch: int) -> list[tuple[str, list[int]]]:
  """`name[@B1|B2...]` items: the batches to try in order, the next only if the previous ran out of memory."""
  out = []
  for item in spec.split(","):
    name, _, b = item.strip().partition("@")
    if name not in VARIANTS:
      raise SystemExit(f"--train-variants: unknown variant {name!r}; expected one of {sorted(VARIANTS)} "
                       "(optionally @BATCH, or @B1|B2 to fall back to B2 when B1 runs out of memory)")
    try:
      batches = [int(x) for x in b.split("|")] if b else [batch]
    except ValueError:
      raise SystemExit(f"--train-variants: {item!r}: expected NAME@BATCH or NAME@B1|B2 with integer batches") from None
    out.append((name, batches))
  return out


_OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory", re.IGNORECASE)


def train_section(cfg: InstructorConfig, params, export_dir: str, batch: int, length: int,
                  matmul: dict, quick: bool, variants: str = DEFAULT_VARIANTS, on_row=None) -> list[dict]:
  """One row per variant (errors such as out-of-memory are rows too); `on_row(rows)` after each.

  MFU is against the larger of JAX's and torch's matmul peaks measured in the same run (one
  denominator for every row), and, where the device is known, against its data-sheet bf16 peak.
  A row marked "running" is saved before each variant, so a run cut short says where it stopped.
  """
  import jax
  from instructor_jax.train_outputs import peak_flops
  from run import matmul_flops_per_token
  _, train_flops = matmul_flops_per_token(cfg.encoder, length)
  measured_peak = max(matmul.get("jax_tflops", 0.0), matmul.get("torch_tflops", 0.0)) * 1e12
  spec_peak = peak_flops(str(jax.devices()[0].device_kind)) if jax.default_backend() != "cpu" else None
  rows: list[dict] = []
  attempts = []  # (name, batch, batches left to fall back to)
  for name, batches in parse_variants(variants, batch):
    attempts.append((name, batches[0], batches[1:]))
  while attempts:
    name, b, fallbacks = attempts.pop(0)
    framework, options = VARIANTS[name]
    tokens = 3 * b * length
    # Big batches: one warm-up step and three timed ones (a step of 256 triples is seconds).
    steps, warmup = (2, 2) if quick else ((3, 1) if b >= 128 else (5, 2))
    row = {"impl": name, "batch": b, "length": length}
    rows.append(dict(row, status="running", started=time.strftime("%H:%M:%S")))
    if on_row:
      on_row(rows)
    print(f"{time.strftime('%H:%M:%S')} train {name} @ {b} x {length}", flush=True)
    _reset_torch_peak()
    start, error, step, sync = time.perf_counter(), None, None, None
    try:
      if framework == "torch":
        step, sync = _torch_step(cfg, export_dir, b, length, **options)
      else:
        step, sync = _jax_step(cfg, params, b, length, **options)
        row.update(step.memory)
      row["setup_s"] = time.perf_counter() - start  # model build, and for JAX the ahead-of-time compile
      seconds, row["first_step_s"] = _time(step, sync, steps, warmup)
      row.update(_peak_memory(framework))
    except Exception as e:  # out of memory at this batch is a result, not a crash
      error = f"{type(e).__name__}: {e}"[:300]
    # Outside the except block: its traceback would keep the failed step's activations alive.
    step = sync = None
    _free_memory()
    if error is not None:
      rows[-1] = dict(row, error=error, tok_s=float("nan"), step_s=float("nan"))
      if fallbacks and _OOM.search(error):
        attempts.insert(0, (name, fallbacks[0], fallbacks[1:]))
    else:
      row.update(step_s=seconds, tok_s=tokens / seconds)
      if measured_peak:
        row["mfu"] = train_flops * tokens / seconds / measured_peak
      if spec_peak:
        row["mfu_spec"] = train_flops * tokens / seconds / spec_peak
      rows[-1] = row
    if on_row:
      on_row(rows)
  return rows


def _reset_torch_peak() -> None:
  try:
    import torch
    if torch.cuda.is_available():
      torch.cuda.reset_peak_memory_stats()
  except ImportError:
    pass


def _peak_memory(framework: str) -> dict:
  """Peak device memory: torch's for this variant; JAX's allocator peak over the process so far."""
  import jax
  if framework == "torch":
    import torch
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30} if torch.cuda.is_available() else {}
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"jax_peak_gib_so_far": stats["peak_bytes_in_use"] / 2 ** 30} if "peak_bytes_in_use" in stats else {}


def _free_memory() -> None:
  """Drops one variant's buffers before the next is built, so the variants do not share memory."""
  import gc
  gc.collect()
  try:
    import torch
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  except ImportError:
    pass
