"""TFDS builder for MEDI: one split per MEDI task, built from a manually downloaded file.

    builder = medi_tfds.Medi(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR))

`DIR` (by default `<data_dir>/downloads/manual`) holds `medi-data.json` (or `medi-data.jsonl`, the
hard-negative release, or any single MEDI .json/.jsonl file). The file is validated and streamed
once into per-task JSONL files in `<download_dir>/medi_by_task` (by default under
`<data_dir>/downloads`), each removed once its split is written; a failed prepare starts again from
the MEDI file, so what it left there is of no use and the next prepare clears it. Each MEDI task
becomes its own split, so reading one task never scans the others. Split names are the task names
where those are TFDS-safe, else derived from them (`split_names`); the original names are in
`builder.info.metadata["tasks"]` ({split: task}) and in each example's `task_name`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from instructor_jax import medi_paths, medi_records
from instructor_jax.config import MissingPathError

_SPLIT_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_ALNUM = re.compile(r"[A-Za-z0-9]")


def split_names(tasks: list[str]) -> dict[str, str]:
  """{task: split name}: TFDS-safe, unique (ignoring case), stable, never the reserved `all`.

  A task name of [A-Za-z0-9_-] with a letter or digit is its own split name (unless it is `all`, or
  one that differs from it only in case sorts before it). Other names have every other character
  replaced by `_`, or, with no ASCII letter or digit at all ("日本", "-", "!!!": TFDS refuses such a
  split), become `task_` + 8 hex digits of the name's SHA-1; `_2`, `_3`, ... is added where the
  result is taken.
  """
  out, used = {}, set()
  for task in sorted(tasks):  # valid names first, so that they never lose theirs to a renamed one
    if not _SPLIT_CHARS.search(task) and _ALNUM.search(task) and task.lower() not in used and task.lower() != "all":
      out[task] = task
      used.add(task.lower())
  for task in sorted(set(tasks) - set(out)):
    base = _SPLIT_CHARS.sub("_", task)
    if not _ALNUM.search(base):
      base = "task_" + hashlib.sha1(task.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    base = base + "_task" if base.lower() == "all" else base
    name, k = base, 2
    while name.lower() in used:
      name, k = f"{base}_{k}", k + 1
    used.add(name.lower())
    out[task] = name
  return {task: out[task] for task in sorted(tasks)}


class Medi(tfds.core.GeneratorBasedBuilder):
  """MEDI (INSTRUCTOR's Multitask Embeddings Data with Instructions), one split per task."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One split per MEDI task; invalid records skipped and counted."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download MEDI (medi-data.json, ~2.6 GB, from the INSTRUCTOR project: "
      "https://github.com/xlang-ai/instructor-embedding, 'MEDI data') or its hard-negative release, "
      "and place the .json (or a .jsonl with one record per line) in the manual directory "
      "(`tfds.download.DownloadConfig(manual_dir=...)`, default <data_dir>/downloads/manual).")

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = {f"{field}_{part}": text for field in medi_records.FIELDS for part in ("instruction", "text")}
    features.update(task_name=text, index=np.int64)
    return self.dataset_info_from_configs(
        description="MEDI: query/positive/negative [instruction, text] triples from 330 tasks.",
        features=tfds.features.FeaturesDict(features),
        homepage="https://instructor-embedding.github.io/",
        citation="@inproceedings{INSTRUCTOR, title={One Embedder, Any Task: Instruction-Finetuned "
                 "Text Embeddings}, author={Su, Hongjin and others}, booktitle={Findings of ACL}, year={2023}}",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    path = medi_paths.resolve_medi_file(os.fspath(dl_manager.manual_dir))
    shard_dir = os.path.join(os.fspath(dl_manager.download_dir), "medi_by_task")
    report = medi_records.ValidationReport(path)
    shards = write_task_shards(path, shard_dir, report)
    print(report.summary())
    names = split_names(list(shards))
    self.info.metadata["tasks"] = {names[t]: t for t in shards}
    self.info.metadata["validation"] = {"valid": report.valid, "skipped": dict(report.skipped),
                                        "first_skipped": report.examples}
    return {names[t]: self._generate_examples(shard) for t, shard in shards.items()}

  def _generate_examples(self, shard: str) -> Iterator[tuple[int, dict]]:
    try:
      with open(shard, encoding="utf-8") as f:
        for line in f:
          r = medi_records.MediRecord(*json.loads(line))
          example = {f"{field}_{part}": getattr(r, field)[k] for field in medi_records.FIELDS
                     for k, part in enumerate(("instruction", "text"))}
          yield r.index, dict(example, task_name=r.task, index=r.index)
    finally:  # read once (TFDS writes a split from one pass): the staging copy is as large as MEDI
      os.remove(shard)
      if not os.listdir(os.path.dirname(shard)):
        os.rmdir(os.path.dirname(shard))


def write_task_shards(path: str, shard_dir: str, report: medi_records.ValidationReport) -> dict[str, str]:
  """Streams the valid records of `path` once into one JSONL shard per task; {task: shard path}."""
  shutil.rmtree(shard_dir, ignore_errors=True)  # what a failed prepare left behind
  os.makedirs(shard_dir)
  files: dict[str, Any] = {}
  shards: dict[str, str] = {}
  try:
    for r in medi_records.iter_medi(path, report):
      if r.task not in files:
        shards[r.task] = os.path.join(shard_dir, f"{len(shards):05d}.jsonl")
        files[r.task] = open(shards[r.task], "w", encoding="utf-8")
      files[r.task].write(json.dumps(list(r), ensure_ascii=False) + "\n")
  finally:
    for f in files.values():
      f.close()
  return {t: shards[t] for t in sorted(shards)}


def task_splits(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  """{task name: split name} of a prepared MEDI builder."""
  if not builder.is_prepared():
    data_dir = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))  # <data_dir>/medi/<version>
    hint = ""
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
      hint = (f" {data_dir} is itself a prepared dataset's folder: pass the data_dir above it, "
              f"{os.path.dirname(os.path.dirname(data_dir))}.")
    raise MissingPathError(
        f"{builder.data_dir}: MEDI is not prepared in data_dir {data_dir} (no dataset_info.json).{hint} Prepare it "
        f"once with medi_tfds.Medi(data_dir={data_dir!r}).download_and_prepare(download_config="
        "tfds.download.DownloadConfig(manual_dir=DIR)), DIR holding medi-data.json (by default "
        f"{os.path.join(data_dir, 'downloads', 'manual')}), or pass the data_dir it was prepared in.")
  tasks = builder.info.metadata.get("tasks") if builder.info.metadata else None
  if not tasks:
    raise ValueError(f"{builder.data_dir}: no MEDI task table in the dataset metadata; was this "
                     "builder prepared with instructor_jax.medi_tfds.Medi?")
  return {task: split for split, task in tasks.items()}
