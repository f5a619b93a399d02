"""Shared helpers for the embed-job tests: a tiny random model and small input files."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from instructor_jax.config import preset
from instructor_jax.embed_output import read_part
from instructor_jax.instructor import Instructor
from instructor_jax.model import InstructorModel
from instructor_jax.tokenization import Tokenizer

INSTRUCTION = "Represent the sentence for retrieval: "

_TOKENIZER = None


def tiny_model(seed: int = 0, mesh=None, max_seq_length: int = 64) -> Instructor:
  """A random tiny INSTRUCTOR (no torch needed) sharing one tokenizer across tests."""
  global _TOKENIZER
  if _TOKENIZER is None:
    _TOKENIZER = Tokenizer.from_pretrained(None)
  config = preset("tiny").replace(max_seq_length=max_seq_length)
  ids = jnp.ones((1, 8), jnp.int32)
  params = InstructorModel(config).init(jax.random.PRNGKey(seed), ids, ids, jnp.zeros((1,), jnp.int32))["params"]
  tokenizer = Tokenizer(_TOKENIZER.hf_tokenizer, max_seq_length)
  return Instructor(config, jax.device_get(params), tokenizer, source=f"random-tiny-{seed}", mesh=mesh)


def sentences(n: int, seed: int = 0) -> list[str]:
  """Texts of very different lengths (several buckets), deterministic."""
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "river", "mountain", "über", "naïve", "42", "x"]
  return [f"text {i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for i in range(n)]


def write_jsonl(path: str, records: list[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return path


def read_output(out_dir: str, fmt: str = "parquet") -> tuple[list, np.ndarray]:
  """All (ids, embeddings) of a finished job in part order, via its manifest."""
  with open(os.path.join(out_dir, "_manifest.json")) as f:
    manifest = json.load(f)
  ids, embs = [], []
  for part in manifest["parts"]:
    part_ids, part_emb = read_part(out_dir, part["part"], fmt)
    ids += part_ids
    embs.append(part_emb)
  return ids, np.concatenate(embs) if embs else np.zeros((0, 0))


def base_args(inputs: list[str], out_dir: str, *extra: str) -> list[str]:
  return ["--input", *inputs, "--output", out_dir, "--no-progress",
          "--batch-tokens", "256", "--rows-per-part", "16", *extra]
