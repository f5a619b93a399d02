"""Task-homogeneous global batches of MEDI triples for many hosts, resumable from the step alone.

Public API (what the trainer consumes):

  for step, task, batch in global_batches(path_or_builder, global_batch_size=1024,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count(), seed=0,
                                          start_step=restored_step, query_len=512, doc_len=512,
                                          length_buckets=(64, 128, 256)):
    ...

`batch` is this host's slice (global_batch_size // process_count rows) of step `step`'s global
batch, a dict of int32 numpy arrays, right-padded with 0 to lengths Lq <= query_len, Ld <= doc_len
(the smallest of `length_buckets` holding the global batch's longest query / document, else the
maximum; the same on every host):
  query_ids, query_mask [b, Lq]   pos_ids, pos_mask, neg_ids, neg_mask [b, Ld]
  query_n_instr, pos_n_instr, neg_n_instr [b]   (positions excluded from pooling)
Ids, masks and instruction lengths follow `tokenization.build_inputs` (the inference rule).
With `pack_length` the same triples come packed several texts to a row instead (`medi_packing`).

How a step is made, with no communication and no state but the step number:
  * task(s) = the task whose cumulative mixing rate brackets u(seed, s), a counter-based hash
    (splitmix64) of (seed, s); every host computes the same sequence.
  * k = how many times that task was drawn before s (a vectorised replay of the cheap task
    sequence, done once at start-up for `start_step`); epoch e = k // m, batch j = k % m, with
    m = n // global_batch_size batches per epoch of a task with n examples.
  * the global batch is examples perm(seed, task, e)[j*G : (j+1)*G]; host p takes rows
    [p*G/P, (p+1)*G/P). So resuming at s yields exactly what an uninterrupted run yields.
Epochs are per task: each task reshuffles when its own batches run out. Short tails: the last
n % G examples of each epoch's permutation are not used that epoch (a different tail every epoch).
A task with fewer than G examples cannot fill a single-task batch; it is dropped with a warning.

Every host holds the whole tokenised corpus (any example can land in its slice): untruncated ids
as flat uint16 arrays, tokenised once at start-up with SentencePiece (the HF tokenizer's ids,
tested, including HF's reading of "</s>"/"<extra_id_N>" strings), or memory-mapped from
`cache_dir` on restarts. Truncation to query_len/doc_len happens per batch, so one cache serves
every length. A MEDI TFDS builder is read through its seqio tasks (`medi_seqio`) instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from instructor_jax import medi_packing, tokenization
from instructor_jax.config import ConfigError

FIELDS = ("query", "pos", "neg")
_NO_TRUNCATION = 1 << 30
_REPLAY_CHUNK = 1 << 20
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Strings Hugging Face's T5 tokenizer reads as special tokens and SentencePiece as characters.
HF_SPECIAL = re.compile(r"</s>|<unk>|<pad>|<extra_id_(?:[0-9]|[1-9][0-9])>")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FieldArrays:
  """Untruncated token ids (with EOS) of one field of a task, flat, plus offsets and n_instr."""

  tokens: np.ndarray  # [total tokens], uint16 when the vocabulary fits
  offsets: np.ndarray  # [n + 1] int64
  n_instr: np.ndarray  # [n] int32, for the untruncated input

  def __len__(self) -> int:
    return len(self.n_instr)

  @classmethod
  def from_lists(cls, ids: Sequence[Sequence[int]], n_instr: Sequence[int]) -> "FieldArrays":
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(offsets[-1]))
    dtype = np.uint16 if flat.size == 0 or flat.max() < 1 << 16 else np.int32
    return cls(flat.astype(dtype), offsets, np.asarray(n_instr, np.int32))

  def pad(self, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask [len(rows), max_len] and n_instr, truncated exactly as `build_inputs(max_len)`."""
    ids = np.zeros((len(rows), max_len), np.int32)
    lengths = np.empty((len(rows),), np.int32)
    for r, i in enumerate(rows):
      start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
      # Truncating the untruncated ids == tokenising at max_len: pieces[:max_len-1] + EOS.
      n = min(stop - start - 1, max_len - 1)
      ids[r, :n] = self.tokens[start:start + n]
      ids[r, n] = tokenization.EOS_ID
      lengths[r] = n + 1
    mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
    n_instr = tokenization.instruction_lengths(self.n_instr[rows], max_len)
    return ids, mask, n_instr

  def truncated(self, rows: np.ndarray, max_len: int) -> list[np.ndarray]:
    """The ids of `rows` (int32, unpadded) truncated as `pad` truncates them: for packing."""
    out = []
    for i in rows:
      start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
      n = min(stop - start - 1, max_len - 1)
      out.append(np.append(self.tokens[start:start + n].astype(np.int32), np.int32(tokenization.EOS_ID)))
    return out


@dataclasses.dataclass(frozen=True)
class TaskArrays:
  """One MEDI task, tokenised: a FieldArrays per field (query, pos, neg)."""

  name: str
  fields: Mapping[str, FieldArrays]

  def __len__(self) -> int:
    return len(self.fields["query"])


def tokenize_task(name: str, triples: Sequence[Sequence[Any]], encode_fn: tokenization.EncodeFn,
                  instruction_cache: dict[str, int] | None = None, chunk: int = 4096) -> TaskArrays:
  """Tokenises (query, pos, neg) items with `build_inputs` (the inference rule), untruncated."""
  cache = instruction_cache if instruction_cache is not None else {}
  fields = {}
  for f, field in enumerate(FIELDS):
    ids, n_instr = [], []
    for start in range(0, len(triples), chunk):
      items = [t[f] for t in triples[start:start + chunk]]
      # A text whose instruction covers it whole (InstructionCoversTextError) is kept, pooled over
      # nothing, and counted at start-up by `truncation_report` with the texts left only their
      # instruction; inference refuses it, as 1.0.1 does.
      i, n = tokenization.build_inputs(encode_fn, items, _NO_TRUNCATION, cache, covered=[])
      ids += i
      n_instr += n
    fields[field] = FieldArrays.from_lists(ids, n_instr)
  return TaskArrays(name, fields)


def task_rates(sizes: Mapping[str, int], temperature: float = 1.0,
               cap: int | None = None) -> dict[str, float]:
  """Mixing rates ∝ min(size, cap) ** (1 / temperature), normalised (T5's capped/temperature mixing)."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  raw = {t: float(min(n, cap) if cap else n) ** (1.0 / temperature) for t, n in sizes.items()}
  total = sum(raw.values())
  if total <= 0:
    raise ValueError(f"no examples to mix: task sizes {dict(sizes)}.")
  return {t: r / total for t, r in raw.items()}


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """Counter-based hash (splitmix64 finaliser) on uint64 arrays; identical on every host."""
  with np.errstate(over="ignore"):
    z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


class BatchPlan:
  """Which task and which examples each global step uses; a pure function of (seed, step)."""

  def __init__(self, sizes: Mapping[str, int], global_batch_size: int, seed: int,
               rates: Mapping[str, float] | None = None):
    self.global_batch_size = global_batch_size
    self.seed = seed
    short = sorted(t for t, n in sizes.items() if n < global_batch_size)
    if short:
      log.warning("MEDI: dropping %d task(s) with fewer examples than the global batch (%d): %s",
                  len(short), global_batch_size, short[:20])
    self.tasks = sorted(t for t in sizes if t not in short)
    if not self.tasks:
      largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
      raise ConfigError(f"BATCH_SIZE {global_batch_size}: no MEDI task has that many examples, and every global batch "
                        f"comes from one task (largest: {', '.join(f'{t} {n}' for t, n in largest) or 'none'}); "
                        "lower BATCH_SIZE.")
    self.sizes = np.array([sizes[t] for t in self.tasks], np.int64)
    rates = rates if rates is not None else task_rates({t: sizes[t] for t in self.tasks})
    r = np.array([rates.get(t, 0.0) for t in self.tasks], np.float64)
    if r.sum() <= 0:
      raise ValueError(f"all mixing rates are zero for tasks {self.tasks[:10]}.")
    self.cum_rates = np.cumsum(r / r.sum())
    self.batches_per_epoch = self.sizes // global_batch_size
    self._key = _splitmix64(np.array([seed], np.uint64))[0]
    self._perms: dict[int, tuple[int, np.ndarray]] = {}

  def task_ids(self, start: int, stop: int) -> np.ndarray:
    """Task index (into self.tasks) of steps [start, stop)."""
    steps = np.arange(start, stop, dtype=np.uint64)
    u = (_splitmix64(steps ^ self._key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.minimum(np.searchsorted(self.cum_rates, u, side="right"), len(self.tasks) - 1)

  def draws_before(self, step: int) -> np.ndarray:
    """How many times each task was drawn in steps [0, step)."""
    counts = np.zeros(len(self.tasks), np.int64)
    for start in range(0, step, _REPLAY_CHUNK):
      counts += np.bincount(self.task_ids(start, min(step, start + _REPLAY_CHUNK)), minlength=len(self.tasks))
    return counts

  def permutation(self, task: int, epoch: int) -> np.ndarray:
    """The order of task `task`'s examples in its epoch `epoch`, identical on every host."""
    cached = self._perms.get(task)
    if cached is None or cached[0] != epoch:
      name_key = zlib.crc32(self.tasks[task].encode("utf-8"))
      rng = np.random.default_rng([self.seed, name_key, epoch])
      cached = (epoch, rng.permutation(int(self.sizes[task])))
      self._perms[task] = cached
    return cached[1]

  def global_indices(self, task: int, draw: int) -> np.ndarray:
    """Example indices (within the task) of the task's `draw`-th global batch."""
    epoch, j = divmod(draw, int(self.batches_per_epoch[task]))
    g = self.global_batch_size
    return self.permutation(task, epoch)[j * g:(j + 1) * g]


def host_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This host's contiguous share of a global batch (hosts' shares are disjoint and cover it)."""
  if len(indices) % process_count:
    raise ValueError(f"global batch of {len(indices)} does not split over {process_count} hosts.")
  local = len(indices) // process_count
  return indices[process_index * local:(process_index + 1) * local]


def bucket_length(need: int, max_len: int, buckets: Sequence[int]) -> int:
  """The smallest bucket below max_len that holds `need` tokens, else max_len."""
  return min((b for b in buckets if need <= b < max_len), default=max_len)


def padded_lengths(task: TaskArrays, rows: np.ndarray, query_len: int, doc_len: int,
                   buckets: Sequence[int]) -> tuple[int, int]:
  """(query, document) lengths to pad the global batch `rows` to: the smallest bucket that holds
  its longest query, and its longest positive or negative (after truncation to query_len/doc_len).

  Padding is masked everywhere, so without dropout the loss is that of padding to query_len/doc_len
  up to float rounding (dropout masks are drawn per padded shape); every host computes the lengths
  from the same global rows, so all hosts' slices have the same shapes. A row also needs room for its instruction plus EOS: `instruction_lengths` caps
  n_instr at the padded length, and an instruction that tokenises longer than the whole input must
  keep the n_instr it gets at query_len/doc_len (then nothing of that row is pooled either way).
  """
  out = []
  for fields, max_len in ((("query",), query_len), (("pos", "neg"), doc_len)):
    need = 1
    for field in fields:
      a = task.fields[field]
      lengths = a.offsets[rows + 1] - a.offsets[rows]  # with EOS
      need = max(need, int(np.max(np.maximum(lengths, a.n_instr[rows] + 1), initial=1)))
    out.append(bucket_length(min(need, max_len), max_len, buckets))
  return out[0], out[1]


def make_batch(task: TaskArrays, rows: np.ndarray, query_len: int, doc_len: int) -> dict[str, np.ndarray]:
  """The trainer's dict for the given example rows of one task."""
  out = {}
  for field in FIELDS:
    ids, mask, n_instr = task.fields[field].pad(rows, query_len if field == "query" else doc_len)
    out[f"{field}_ids"], out[f"{field}_mask"], out[f"{field}_n_instr"] = ids, mask, n_instr
  return out


def pad_batch_to(batch: dict[str, np.ndarray], query_len: int, doc_len: int) -> dict[str, np.ndarray]:
  """`batch` with its ids and masks right-padded with 0 to query_len / doc_len (the same batch)."""
  out = {}
  for key, x in batch.items():
    width = query_len if key.startswith("query") else doc_len
    out[key] = x if x.ndim == 1 else np.pad(x, ((0, 0), (0, width - x.shape[1])))
  return out


def iterate(tasks: Mapping[str, TaskArrays], plan: BatchPlan, *, process_index: int, process_count: int,
            start_step: int, query_len: int, doc_len: int, num_steps: int | None = None,
            length_buckets: Sequence[int] = (), pack_length: int = 0, shards: int = 1,
            chunks: int = 1) -> Iterator[tuple[int, str, dict[str, np.ndarray]]]:
  """(step, task name, this host's batch) from start_step on, forever or for num_steps.

  Each global batch is padded to `padded_lengths` over `length_buckets` (none: always query_len /
  doc_len), or with `pack_length` packed into rows of that many tokens over `shards` batch shards
  and `chunks` GradCache chunks (`medi_packing`; the same triples either way)."""
  draws = plan.draws_before(start_step)
  step, stop = start_step, None if num_steps is None else start_step + num_steps
  while stop is None or step < stop:
    chunk_stop = step + 4096 if stop is None else min(stop, step + 4096)
    for t in plan.task_ids(step, chunk_stop):
      name = plan.tasks[int(t)]
      rows = plan.global_indices(int(t), int(draws[t]))
      draws[t] += 1
      if pack_length:
        yield step, name, medi_packing.make_packed_batch(
            tasks[name], rows, shards=shards, process_index=process_index, process_count=process_count,
            query_len=query_len, doc_len=doc_len, pack_length=pack_length, chunks=chunks)
      else:
        lengths = padded_lengths(tasks[name], rows, query_len, doc_len, length_buckets)
        yield step, name, make_batch(tasks[name], host_slice(rows, process_index, process_count), *lengths)
      step += 1


def with_hf_special_tokens(encode_fn: tokenization.EncodeFn) -> tokenization.EncodeFn:
  """`encode_fn`, except that texts holding "</s>", "<pad>", "<unk>" or "<extra_id_N>" are encoded
  by the inference tokenizer, which reads them as special tokens (SentencePiece spells them out)."""
  hf: list[tokenization.Tokenizer] = []

  def encode(texts: Sequence[str]) -> list[list[int]]:
    texts = list(texts)
    out = [list(x) for x in encode_fn(texts)]
    special = [i for i, t in enumerate(texts) if HF_SPECIAL.search(t)]
    if special:
      if not hf:  # loaded on first need: most corpora never hit this
        hf.append(tokenization.Tokenizer.from_pretrained(None))
      for i, ids in zip(special, hf[0].encode_pieces([texts[i] for i in special])):
        out[i] = ids
    return out

  return encode


def sentencepiece_encode_fn(model_file: str | None = None) -> tokenization.EncodeFn:
  """SentencePiece on the T5 vocabulary with HF's special-token reading: HF's ids, ~7x faster here."""
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=model_file or os.path.join(tokenization.VOCAB_DIR, "spiece.model"))
  return with_hf_special_tokens(lambda texts: sp.encode(list(texts)))


_PARTS = ("tokens", "offsets", "n_instr")


VALIDATION_FILE = "validation.txt"  # the MEDI file's validation summary, shown again on every cached load


def save_tasks(tasks: Mapping[str, TaskArrays], directory: str, validation: str | None = None) -> None:
  """Writes tokenised tasks as .npy files; the directory appears atomically (hosts may race)."""
  # Not the pid alone: hosts in containers that share the cache over NFS can have the same pid.
  tmp = f"{directory}.tmp{os.getpid()}.{secrets.token_hex(4)}"
  os.makedirs(tmp)
  try:
    if validation is not None:
      with open(os.path.join(tmp, VALIDATION_FILE), "w", encoding="utf-8") as f:
        f.write(validation)
    for i, task in enumerate(tasks.values()):
      for field in FIELDS:
        for part in _PARTS:
          np.save(os.path.join(tmp, f"{i:05d}.{field}.{part}.npy"), getattr(task.fields[field], part))
    with open(os.path.join(tmp, "tasks.json"), "w", encoding="utf-8") as f:
      json.dump(list(tasks), f)
    try:
      os.rename(tmp, directory)
    except OSError:
      if not os.path.isfile(os.path.join(directory, "tasks.json")):
        raise
      # else another host got there first; its copy is identical
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a half-written copy otherwise


def load_saved_tasks(directory: str) -> dict[str, TaskArrays]:
  """Tasks written by `save_tasks`, memory-mapped (pages are shared and read on demand)."""
  with open(os.path.join(directory, "tasks.json"), encoding="utf-8") as f:
    names = json.load(f)
  load = lambda i, field, part: np.load(os.path.join(directory, f"{i:05d}.{field}.{part}.npy"), mmap_mode="r")
  return {name: TaskArrays(name, {f: FieldArrays(*(load(i, f, p) for p in _PARTS)) for f in FIELDS})
          for i, name in enumerate(names)}


def _cache_key(path: str) -> str:
  """Identifies a MEDI file's tokenisation: the file (path, size, mtime), the vocabulary files, and what
  decides the arrays from them: the code (which records are kept: medi_records.py; the rule:
  tokenization.py; the special-token handling and the layout: this file) and the tokenizer libraries."""
  from instructor_jax import medi_records
  st = os.stat(path)
  digest = hashlib.sha1()
  sources = [os.path.join(tokenization.VOCAB_DIR, n) for n in sorted(os.listdir(tokenization.VOCAB_DIR))]
  for source in sources + [medi_records.__file__, tokenization.__file__, __file__]:
    with open(source, "rb") as f:
      digest.update(f.read())
  for library in ("sentencepiece", "tokenizers"):  # SentencePiece; HF's, for texts with special-token strings
    try:
      digest.update(f"{library} {importlib.metadata.version(library)}".encode())
    except importlib.metadata.PackageNotFoundError:
      pass
  key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()}"
  return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_tasks(path_or_builder: Any, encode_fn: tokenization.EncodeFn | None = None,
               log_fn: Callable[[str], None] = print, cache_dir: str | None = None) -> dict[str, TaskArrays]:
  """Tokenised tasks from a MEDI file / manual dir (no TensorFlow) or a built MEDI TFDS builder.

  With `cache_dir` (and the default SentencePiece encoder) the tokenised corpus is saved there on
  first use and memory-mapped afterwards, so restarts skip the read and the tokenisation.
  """
  if not isinstance(path_or_builder, str):
    from instructor_jax import medi_seqio  # TensorFlow only on this path.
    return medi_seqio.load_tasks_from_builder(path_or_builder)
  from instructor_jax import medi_paths, medi_records
  path = medi_paths.resolve_medi_file(path_or_builder)
  cached = os.path.join(cache_dir, f"medi_tokens_{_cache_key(path)}") if cache_dir and encode_fn is None else None
  if cached and os.path.isfile(os.path.join(cached, "tasks.json")):
    log_fn(f"{path}: using the tokenised cache {cached}")
    validation = os.path.join(cached, VALIDATION_FILE)
    if os.path.isfile(validation):  # what was skipped, and why, holds for every run on this file
      with open(validation, encoding="utf-8") as f:
        log_fn(f.read())
    return load_saved_tasks(cached)
  grouped, report = medi_records.read_medi(path, log_fn)
  encode_fn = encode_fn or sentencepiece_encode_fn()
  cache: dict[str, int] = {}
  tasks = {name: tokenize_task(name, [(r.query, r.pos, r.neg) for r in recs], encode_fn, cache)
           for name, recs in grouped.items()}
  if cached:
    try:
      save_tasks(tasks, cached, report.summary())
    except OSError as e:  # a cache is an optimisation: a read-only or full disk must not end the run
      log_fn(f"warning: cannot write the tokenised MEDI cache in {cache_dir} ({e.strerror or e}); going on without "
             "it, so a restart tokenises MEDI again. The trainer keeps it under $INSTRUCTOR_JAX_CACHE "
             "(~/.cache/instructor_jax by default): point that at a writable folder.")
  return tasks


def truncation_report(tasks: Mapping[str, TaskArrays], query_len: int, doc_len: int) -> str | None:
  """How much truncation to query_len / doc_len cuts, and which texts keep nothing but their
  instruction (only EOS is pooled then, as in 1.0.1: a degenerate example that still trains)."""
  cut = {"query": [0, 0], "doc": [0, 0]}  # [truncated, total]
  eos_only: dict[str, int] = {}
  covered = 0  # of those, texts whose instruction covers them whole, EOS included: nothing pooled
  for name, task in tasks.items():
    for field, arrays in task.fields.items():
      max_len = query_len if field == "query" else doc_len
      lengths = np.diff(arrays.offsets)  # with EOS
      kept = np.minimum(lengths, max_len)
      n = tokenization.instruction_lengths(arrays.n_instr, max_len)
      kind = "query" if field == "query" else "doc"
      cut[kind][0] += int(np.sum(lengths > max_len))
      cut[kind][1] += len(lengths)
      bad = int(np.sum((n > 0) & (n >= kept - 1)))
      if bad:
        eos_only[name] = eos_only.get(name, 0) + bad
      covered += int(np.sum((n > 0) & (n >= kept)))
  if not cut["query"][0] and not cut["doc"][0] and not eos_only:
    return None
  share = {k: 100 * a / max(b, 1) for k, (a, b) in cut.items()}
  out = (f"truncation: {share['query']:.1f}% of queries exceed query_len {query_len}, {share['doc']:.1f}% of "
         f"documents exceed doc_len {doc_len}")
  if eos_only:
    worst = sorted(eos_only.items(), key=lambda kv: -kv[1])[:3]
    out += (f"; {sum(eos_only.values())} texts keep only their instruction (pooling sees EOS alone), most in "
            + ", ".join(f"{t} ({c})" for t, c in worst) + ": raise the lengths if that is not intended")
    if covered:
      out += (f"; {covered} of them pool nothing, not even EOS, their instruction's last word merging with "
              "the text (inference refuses such a text)")
  return out + "."


def corpus_fingerprint(tasks: Mapping[str, TaskArrays]) -> np.ndarray:
  """int32 [task count, example count, 4 words of a SHA-1 of every task's name, size and texts' token
  counts]: what the hosts of a run compare (`check_same_corpus`)."""
  digest = hashlib.sha1()
  for name in sorted(tasks):
    digest.update(json.dumps([name, len(tasks[name])]).encode())
    for field in FIELDS:  # token counts, not the tokens (far fewer bytes): enough to tell another tokenizer
      digest.update(np.ascontiguousarray(tasks[name].fields[field].offsets, np.int64).tobytes())
  examples = min(sum(len(t) for t in tasks.values()), np.iinfo(np.int32).max)
  return np.concatenate([[len(tasks), examples], np.frombuffer(digest.digest()[:16], np.int32)]).astype(np.int32)


def check_same_corpus(tasks: Mapping[str, TaskArrays], allgather: Callable[[np.ndarray], np.ndarray]) -> None:
  """ConfigError unless every process of a run read the same corpus. Each host draws the batches alone
  from its own copy, so hosts that read different files (or tokenised them differently) would train
  on mismatched slices unnoticed. `allgather`: this process's fingerprint -> every process's, one row
  each (jax.experimental.multihost_utils.process_allgather)."""
  rows = np.asarray(allgather(corpus_fingerprint(tasks))).reshape(-1, 6)
  differ = [p for p in range(1, len(rows)) if not np.array_equal(rows[p], rows[0])]
  if differ:
    says = lambda p: f"process {p} has {rows[p][0]} tasks, {rows[p][1]} examples"  # noqa: E731
    raise ConfigError(f"MEDI differs between the processes of this run: {says(0)}, " + ", ".join(map(says, differ[:5]))
                      + " (equal counts: other task names, or other token counts). Every host must read the same "
                      f"MEDI file: check MEDI_PATH on process(es) {differ[:20]}, and delete their tokenised cache "
                      "($INSTRUCTOR_JAX_CACHE/medi_tokens, ~/.cache/instructor_jax by default).")


def global_batches(path_or_builder: Any, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, seed: int = 0, start_step: int = 0, query_len: int = 512,
                   doc_len: int = 512, temperature: float = 1.0, rate_cap: int | None = None,
                   num_steps: int | None = None, tasks: Mapping[str, TaskArrays] | None = None,
                   encode_fn: tokenization.EncodeFn | None = None, cache_dir: str | None = None,
                   log_fn: Callable[[str], None] = print,
                   length_buckets: Sequence[int] = (), pack_length: int = 0, shards: int = 1,
                   chunks: int = 1) -> Iterator[tuple[int, str, dict[str, np.ndarray]]]:
  """(step, task name, this host's slice of the step's single-task global batch), from start_step.

  `path_or_builder`: a MEDI .json/.jsonl file, a directory holding one (the TFDS manual dir), or
  a MEDI TFDS builder (read per task through the seqio tasks). `tasks` skips loading (reuse
  `load_tasks` output across calls); `cache_dir` keeps the tokenised corpus between runs (see
  `load_tasks`). Mixing: rates ∝ min(n, rate_cap) ** (1 / temperature). `length_buckets`: pad each
  global batch only to the smallest of these lengths that holds its longest text (`padded_lengths`),
  instead of always to query_len / doc_len. `pack_length` > 0: pack each global batch's texts into
  rows of that many tokens instead (>= query_len and doc_len), per block of triples of each of the
  `shards` batch shards (data x fsdp), for `chunks` GradCache chunks, in the layout of `medi_packing`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  for name, value, least in (("global_batch_size", global_batch_size, 1), ("seed", seed, 0),
                             ("start_step", start_step, 0), ("query_len", query_len, 2), ("doc_len", doc_len, 2)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
      raise ValueError(f"global_batches({name}={value!r}): expected an int >= {least}.")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of process_count "
                     f"{process_count} (every host takes an equal slice).")
  if pack_length and (pack_length < max(query_len, doc_len) or global_batch_size % (shards * chunks)
                      or shards % process_count):
    raise ValueError(f"global_batches(pack_length={pack_length}): needs pack_length >= query_len ({query_len}) and "
                     f"doc_len ({doc_len}), global_batch_size ({global_batch_size}) a multiple of shards ({shards}) "
                     f"x chunks ({chunks}), and shards a multiple of process_count ({process_count}).")
  tasks = tasks if tasks is not None else load_tasks(path_or_builder, encode_fn, log_fn, cache_dir)
  if process_index == 0 and (report := truncation_report(tasks, query_len, doc_len)):
    log_fn(report)
  sizes = {name: len(t) for name, t in tasks.items()}
  plan = BatchPlan(sizes, global_batch_size, seed, task_rates(
      {t: n for t, n in sizes.items() if n >= global_batch_size} or sizes, temperature, rate_cap))
  return iterate(tasks, plan, process_index=process_index, process_count=process_count,
                 start_step=start_step, query_len=query_len, doc_len=doc_len, num_steps=num_steps,
                 length_buckets=length_buckets, pack_length=pack_length, shards=shards, chunks=chunks)
