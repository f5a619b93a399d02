"""TFDS builder for MEDI: one split per MEDI task, built from a manually downloaded file.

    builder = medi_tfds.Medi(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR))

`DIR` holds `medi-data.json` (or `medi-data.jsonl`, the hard-negative release, or any single
MEDI .json/.jsonl file). The file is validated and streamed once into per-task shards, and each
MEDI task becomes its own split, so reading one task never scans the others. Split names are the
task names with characters outside [A-Za-z0-9_-] replaced by `_`; the original names are in
`builder.info.metadata["tasks"]` ({split: task}) and in each example's `task_name`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from instructor_jax import medi_records

_SPLIT_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def split_names(tasks: list[str]) -> dict[str, str]:
  """{task: split name}: TFDS-safe (\\w and -), unique, never the reserved `all`."""
  out, used = {}, set()
  for task in sorted(tasks):
    base = _SPLIT_CHARS.sub("_", task) or "task"
    base = base + "_task" if base.lower() == "all" else base
    name, k = base, 2
    while name.lower() in used:
      name, k = f"{base}_{k}", k + 1
    used.add(name.lower())
    out[task] = name
  return out


class Medi(tfds.core.GeneratorBasedBuilder):
  """MEDI (INSTRUCTOR's Multitask Embeddings Data with Instructions), one split per task."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One split per MEDI task; invalid records skipped and counted."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download MEDI (medi-data.json, ~2.6 GB, from the INSTRUCTOR project: "
      "https://github.com/xlang-ai/instructor-embedding, 'MEDI data') or its hard-negative release, "
      "and place the .json (or a .jsonl with one record per line) in the manual directory "
      "(`tfds.download.DownloadConfig(manual_dir=...)`, default ~/tensorflow_datasets/downloads/manual).")

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
    path = medi_records.resolve_medi_file(os.fspath(dl_manager.manual_dir))
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
    with open(shard, encoding="utf-8") as f:
      for line in f:
        r = medi_records.MediRecord(*json.loads(line))
        example = {f"{field}_{part}": getattr(r, field)[k] for field in medi_records.FIELDS
                   for k, part in enumerate(("instruction", "text"))}
        yield r.index, dict(example, task_name=r.task, index=r.index)


def write_task_shards(path: str, shard_dir: str, report: medi_records.ValidationReport) -> dict[str, str]:
  """Streams the valid records of `path` once into one JSONL shard per task; {task: shard path}."""
  os.makedirs(shard_dir, exist_ok=True)
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
  tasks = builder.info.metadata.get("tasks") if builder.info.metadata else None
  if not tasks:
    raise ValueError(f"{builder.data_dir}: no MEDI task table in the dataset metadata; was this "
                     "builder prepared with instructor_jax.medi_tfds.Medi?")
  return {task: split for split, task in tasks.items()}
