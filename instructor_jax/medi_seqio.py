"""seqio over the MEDI TFDS builder: the T5 vocabulary, tokenising preprocessors, a task per MEDI
task and a size-weighted mixture.

    data_dir = ...  # where medi_tfds.Medi was prepared
    names = register_medi_tasks(data_dir)                      # "medi.<split>" for every task ('-' as '_')
    register_medi_mixture("medi", data_dir, temperature=2.0)   # rates ∝ min(n, cap) ** (1 / T)
    ds = seqio.get_mixture_or_task("medi").get_dataset(sequence_lengths(64, 256), split="train")

Every example then has, for field in query/pos/neg: `{field}_ids` (int32, with EOS, truncated to
the field's length, padded with 0), `{field}_mask` and `{field}_n_instr` (int32 scalar), plus
`task_name` and `index` (position in the MEDI file). Tokenisation calls
`tokenization.build_inputs` with the seqio vocabulary's `encode` (a `tf.numpy_function` over
batches of examples), so the instruction rule has one implementation shared with inference.
With `sequence_length=None` ids are neither truncated nor padded (and no mask is added).
A seqio mixture samples *examples* across tasks (and keeps only the output features); for
training, `medi_batches.global_batches` draws whole global batches from one task, with the same
rates (`medi_batches.task_rates`) and the same tokenisation (`load_tasks_from_builder`).
"""

from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from instructor_jax import medi_batches, medi_tfds, tokenization

FIELDS = medi_batches.FIELDS
VOCAB_PATH = os.path.join(tokenization.VOCAB_DIR, "spiece.model")
TASK_PREFIX = "medi."
_TOKENIZE_BATCH = 256


@functools.lru_cache(maxsize=None)
def medi_vocabulary() -> seqio.SentencePieceVocabulary:
  """The T5 SentencePiece vocabulary (32000 pieces, pad 0, EOS 1, unk 2); no sentinel extra ids."""
  return seqio.SentencePieceVocabulary(VOCAB_PATH, extra_ids=0)


def vocabulary_encode_fn(vocabulary: seqio.Vocabulary) -> tokenization.EncodeFn:
  """`build_inputs`' encode function over a seqio vocabulary (ids without EOS).

  The vocabulary spells out "</s>", "<pad>", "<extra_id_0>"... where HF's tokenizer (inference)
  reads special tokens; those rare texts go to HF so the ids stay equal.
  """
  return medi_batches.with_hf_special_tokens(lambda texts: [vocabulary.encode(t) for t in texts])


def sequence_lengths(query_len: int, doc_len: int) -> dict[str, int]:
  """seqio sequence_length: queries and documents (pos, neg) have separate maxima."""
  return {f"{f}_{k}": query_len if f == "query" else doc_len for f in FIELDS for k in ("ids", "mask")}


def _field_len(sequence_length: Mapping[str, int] | None, field: str) -> int:
  if sequence_length is None or sequence_length.get(f"{field}_ids") is None:
    return medi_batches._NO_TRUNCATION  # pylint: disable=protected-access
  return int(sequence_length[f"{field}_ids"])


def tokenize_triples(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None,
                     vocabulary: seqio.Vocabulary | None = None) -> tf.data.Dataset:
  """Adds `{field}_ids` (with EOS, truncated) and `{field}_n_instr` by the inference rule."""
  encode_fn = vocabulary_encode_fn(vocabulary or medi_vocabulary())
  cache: dict[str, int] = {}
  lengths = [_field_len(sequence_length, f) for f in FIELDS]

  def tokenize_np(*columns: np.ndarray) -> list[np.ndarray]:
    out = []
    for f, max_len in enumerate(lengths):
      items = [(i.decode("utf-8"), t.decode("utf-8")) for i, t in zip(columns[2 * f], columns[2 * f + 1])]
      ids, n_instr = tokenization.build_inputs(encode_fn, items, max_len, cache, covered=[])  # as medi_batches
      out += [np.fromiter((t for x in ids for t in x), np.int32), np.array([len(x) for x in ids], np.int64),
              np.array(n_instr, np.int32)]
    return out

  def tokenize_batch(ex: dict) -> dict:
    columns = [ex[f"{f}_{part}"] for f in FIELDS for part in ("instruction", "text")]
    flat = tf.numpy_function(tokenize_np, columns, [tf.int32, tf.int64, tf.int32] * len(FIELDS), stateful=False)
    out = {k: v for k, v in ex.items() if not k.endswith(("_instruction", "_text"))}
    for f, field in enumerate(FIELDS):
      values, row_lengths, n_instr = flat[3 * f:3 * f + 3]
      values.set_shape([None])
      row_lengths.set_shape([None])
      out[f"{field}_ids"] = tf.RaggedTensor.from_row_lengths(values, row_lengths)
      out[f"{field}_n_instr"] = tf.ensure_shape(n_instr, [None])
    return out

  # Batched so the Python call (and the instruction cache) is amortised over many examples.
  return dataset.batch(_TOKENIZE_BATCH).map(tokenize_batch, num_parallel_calls=1).unbatch()


def pad_triples(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
  """Pads `{field}_ids` to the field's length and adds `{field}_mask` (no-op without lengths)."""
  if sequence_length is None:
    return dataset

  def pad(ex: dict) -> dict:
    ex = dict(ex)
    for field in FIELDS:
      length = _field_len(sequence_length, field)
      ids = ex[f"{field}_ids"]
      n = tf.shape(ids)[0]
      ex[f"{field}_ids"] = tf.ensure_shape(tf.pad(ids, [[0, length - n]]), [length])
      ex[f"{field}_mask"] = tf.cast(tf.range(length) < n, tf.int32)
    return ex

  return dataset.map(pad, num_parallel_calls=tf.data.AUTOTUNE)


def output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
  """ids on the T5 vocabulary (EOS comes from the rule, not seqio), masks and n_instr.

  All are output features because a seqio mixture keeps only those.
  """
  vocabulary = vocabulary or medi_vocabulary()
  plain = seqio.PassThroughVocabulary(size=0)
  out = {}
  for f in FIELDS:
    out[f"{f}_ids"] = seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
    out[f"{f}_mask"] = seqio.Feature(plain, add_eos=False, dtype=tf.int32, required=False)
    out[f"{f}_n_instr"] = seqio.Feature(plain, add_eos=False, dtype=tf.int32, rank=0)
  return out


def _register(name: str, source: seqio.DataSource) -> None:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, output_features=output_features(),
                         preprocessors=[tokenize_triples, pad_triples])


def _builder(data_dir: str) -> tfds.core.DatasetBuilder:
  return medi_tfds.Medi(data_dir=data_dir)


def seqio_task_names(splits: Mapping[str, str]) -> dict[str, str]:
  """{MEDI task: seqio task name}: `medi.` + its split name, with `-` (TFDS allows it, seqio does not) as `_`.

  Decided over all splits at once, so a name never depends on which tasks are registered: split
  names without `-` keep theirs, and a `-` name whose `_` form is taken gets a `_2`, `_3`, ... suffix.
  """
  out, used = {}, set()
  for task, split in sorted(splits.items(), key=lambda kv: ("-" in kv[1], kv[1])):
    base = TASK_PREFIX + split.replace("-", "_")
    name, k = base, 2
    while name in used:
      name, k = f"{base}_{k}", k + 1
    used.add(name)
    out[task] = name
  return out


def register_medi_tasks(data_dir: str, tasks: Sequence[str] | None = None) -> dict[str, str]:
  """Registers a seqio task per MEDI task of a prepared builder; {MEDI task: seqio task name}."""
  splits = medi_tfds.task_splits(_builder(data_dir))
  unknown = sorted(set(tasks or ()) - set(splits))
  if unknown:
    raise ValueError(f"{data_dir}: MEDI tasks {unknown[:10]} are not in the prepared dataset "
                     f"(it has {len(splits)} tasks, e.g. {sorted(splits)[:5]}).")
  all_names = seqio_task_names(splits)
  names = {}
  for task in sorted(tasks or splits):
    names[task] = all_names[task]
    source = seqio.TfdsDataSource(f"medi:{medi_tfds.Medi.VERSION}", tfds_data_dir=data_dir,
                                  splits={"train": splits[task]})
    _register(names[task], source)
  return names


def register_medi_mixture(name: str, data_dir: str, *, temperature: float = 1.0, cap: int | None = None,
                          tasks: Sequence[str] | None = None) -> dict[str, float]:
  """A mixture of the MEDI tasks with rates ∝ min(n, cap) ** (1 / temperature); returns the rates."""
  builder = _builder(data_dir)
  names = register_medi_tasks(data_dir, tasks)
  splits = medi_tfds.task_splits(builder)
  sizes = {t: builder.info.splits[splits[t]].num_examples for t in names}
  rates = medi_batches.task_rates(sizes, temperature, cap)
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(names[t], rates[t]) for t in names])
  return rates


def load_tasks_from_builder(builder: tfds.core.DatasetBuilder) -> dict[str, medi_batches.TaskArrays]:
  """Untruncated token ids of every task through its seqio task, in MEDI file order (by `index`)."""
  data_dir = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))  # <root>/medi/<version>
  out = {}
  for task, seqio_name in register_medi_tasks(data_dir).items():
    ds = seqio.get_mixture_or_task(seqio_name).get_dataset(None, split="train", shuffle=False)
    rows = sorted(tfds.as_numpy(ds), key=lambda ex: int(ex["index"]))
    out[task] = medi_batches.TaskArrays(task, {
        f: medi_batches.FieldArrays.from_lists([r[f"{f}_ids"] for r in rows], [r[f"{f}_n_instr"] for r in rows])
        for f in FIELDS})
  return out
