"""End-to-end tests of `python -m instructor_jax.embed` (in-process, tiny random model, CPU)."""

import json
import os

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import Mesh

from embed_support import INSTRUCTION, base_args, read_output, sentences, tiny_model, write_jsonl
from instructor_jax import embed
from instructor_jax.embed_batches import row_choices, split_rows
from instructor_jax.embed_manifest import OutputMismatchError
from instructor_jax.embed_output import quantize


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _write_inputs(tmp_path, fmt, texts):
  """Writes `texts` as two files of the given format (exercising globs and many files)."""
  halves = [texts[: len(texts) // 2], texts[len(texts) // 2:]]
  paths = []
  for n, part in enumerate(halves):
    ext = {"jsonl": "jsonl", "parquet": "parquet", "csv": "csv", "tsv": "tsv", "text": "txt"}[fmt]
    path = str(tmp_path / f"in-{n}.{ext}")
    if fmt == "jsonl":
      write_jsonl(path, [{"text": t} for t in part])
    elif fmt == "parquet":
      pq.write_table(pa.table({"other": list(range(len(part))), "text": part}), path, row_group_size=7)
    elif fmt in ("csv", "tsv"):
      import csv
      # A quoted newline inside a field: one row over two physical lines.
      part = [t + "\nsecond line" if i == 3 else t for i, t in enumerate(part)]
      with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
        w.writerow(["text", "other"])
        w.writerows([[t, i] for i, t in enumerate(part)])
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(part) + "\n")
    paths.append(path)
    halves[n] = part
  return str(tmp_path / "in-*"), halves[0] + halves[1]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "tsv", "text"])
def test_each_input_format_matches_encode(tmp_path, model, fmt):
  pattern, texts = _write_inputs(tmp_path, fmt, sentences(37, seed=1))
  out = str(tmp_path / "out")
  summary = embed.main(base_args([pattern], out, "--instruction", INSTRUCTION), model=model)
  ids, emb = read_output(out)
  assert ids == list(range(len(texts)))  # positional ids: the row's place in the input
  expected = model.encode([[INSTRUCTION, t] for t in texts])
  np.testing.assert_allclose(emb, expected, atol=1e-6)
  assert summary["rows"] == len(texts) and summary["skipped"] == {}
  manifest = json.load(open(os.path.join(out, "_manifest.json")))
  assert manifest["rows"]["embedded"] == len(texts) and len(manifest["parts"]) == 3
  if fmt == "jsonl":  # (the output format is the same for every input format: test it once)
    # The output directory is one Parquet dataset: metadata files start with "_", which readers skip.
    import pyarrow.parquet as pq
    table = pq.read_table(out)
    assert sorted(table["id"].to_pylist()) == list(range(len(texts)))


def test_npy_output_per_row_instructions_and_id_field(tmp_path, model):
  texts = sentences(21, seed=2)
  instr = ["Represent the title: ", "Represent the question for retrieving answers: "]
  records = [{"id": f"doc-{i}", "body": t, **({"task": instr[i % 2]} if i % 3 else {})} for i, t in enumerate(texts)]
  path = write_jsonl(str(tmp_path / "in.jsonl"), records)
  out = str(tmp_path / "out")
  embed.main(base_args([path], out, "--format", "npy", "--text-field", "body", "--id-field", "id",
                       "--instruction-field", "task", "--instruction", INSTRUCTION), model=model)
  ids, emb = read_output(out, "npy")
  assert ids == [r["id"] for r in records] and emb.dtype == np.float32
  expected = model.encode([[r.get("task", INSTRUCTION), r["body"]] for r in records])
  np.testing.assert_allclose(emb, expected, atol=1e-6)
  manifest = json.load(open(os.path.join(out, "_manifest.json")))
  assert manifest["instructions"]["counts"] == {INSTRUCTION: 7, instr[0]: 7, instr[1]: 7}
  assert sorted(os.listdir(out)) == [".embed-0.lock", "_job.json", "_manifest.json", "_parts", "_runtime.json",
                                     "part-00000.ids.npy", "part-00000.npy", "part-00001.ids.npy", "part-00001.npy"]


def test_quantize_matches_sentence_transformers():
  st_quant = pytest.importorskip("sentence_transformers.util.quantization")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 20)).astype(np.float32)
  ranges = np.stack([x.min(0), x.max(0)])
  for precision in ("int8", "uint8", "binary", "ubinary"):
    ours = quantize(x, precision, ranges)
    ref = st_quant.quantize_embeddings(x, precision=precision, ranges=ranges)
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref), precision
  assert np.array_equal(quantize(x, "float16"), x.astype(np.float16))


@pytest.mark.parametrize("precision", ["int8", "ubinary"])
def test_quantized_outputs(tmp_path, model, precision):
  texts = sentences(20, seed=3)
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
  out = str(tmp_path / "out")
  embed.main(base_args([path], out, "--precision", precision, "--calibration-rows", "12"), model=model)
  _, stored = read_output(out)
  full = model.encode(texts)
  ranges = np.stack([full[:12].min(0), full[:12].max(0)]) if precision == "int8" else None
  expected = quantize(full, precision, ranges)
  # Values on a bucket edge may land one step apart: the float inputs differ in the 7th digit.
  diff = np.abs(stored.astype(np.int16) - expected.astype(np.int16))
  assert stored.dtype == expected.dtype and diff.max() <= (1 if precision == "int8" else 0)
  assert (diff > 0).mean() < 0.05
  manifest = json.load(open(os.path.join(out, "_manifest.json")))
  assert manifest["output"]["stored_dim"] == (24 if precision == "int8" else 3)
  if precision == "int8":
    np.testing.assert_allclose(np.load(os.path.join(out, "_int8_ranges.npy")), ranges, atol=1e-6)


def test_eight_devices_equal_one_device(tmp_path, model):
  assert len(jax.local_devices()) == 8
  one = tiny_model(mesh=Mesh(np.array(jax.local_devices()[:1]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,)))
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(40, seed=4)])
  s8 = embed.main(base_args([path], str(tmp_path / "o8")), model=model)
  s1 = embed.main(base_args([path], str(tmp_path / "o1")), model=one)
  ids8, e8 = read_output(str(tmp_path / "o8"))
  ids1, e1 = read_output(str(tmp_path / "o1"))
  assert ids8 == ids1
  np.testing.assert_allclose(e8, e1, atol=1e-6)
  assert all(shape[0] % 8 == 0 for shape in s8["batch_shapes"])
  assert {shape[0] for shape in s1["batch_shapes"]} != {shape[0] for shape in s8["batch_shapes"]}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_two_hosts_union_equals_one_host(tmp_path, model, fmt):
  texts = sentences(70, seed=5)
  if fmt == "jsonl":
    path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
  else:  # row groups of 5 rows: each process skips the groups of the other's parts without decoding them
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": texts}), path, row_group_size=5)
  single = str(tmp_path / "single")
  embed.main(base_args([path], single), model=model)
  split = str(tmp_path / "split")
  s0 = embed.main(base_args([path], split, "--process-index", "0", "--process-count", "2"), model=model)
  assert s0["parts_written"] == 3 and s0["manifest"] is None  # parts 0, 2, 4 of 5; peers not done
  assert not os.path.exists(os.path.join(split, "_manifest.json"))
  s1 = embed.main(base_args([path], split, "--process-index", "1", "--process-count", "2"), model=model)
  assert s1["parts_written"] == 2 and s1["manifest"] is None  # only process 0 writes the manifest
  s0 = embed.main(base_args([path], split, "--process-index", "0", "--process-count", "2"), model=model)
  assert s0["parts_written"] == 0 and s0["parts_already_complete"] == 3 and s0["manifest"]
  ids_a, emb_a = read_output(single)
  ids_b, emb_b = read_output(split)
  assert ids_a == ids_b == list(range(70))
  np.testing.assert_array_equal(emb_a, emb_b)


def test_truncation_counted_and_shapes_bounded(tmp_path, model):
  texts = sentences(30, seed=6) + [" ".join(["word"] * 300)] * 2
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
  out = str(tmp_path / "out")
  summary = embed.main(base_args([path], out, "--max-seq-length", "24", "--buckets", "8,16,32", "--pack-length", "0"),
                       model=model)
  long_count = sum(len(model.tokenizer.encode_pieces([t])[0]) > 23 for t in texts)
  assert summary["truncated"] == long_count >= 2
  _, emb = read_output(out)
  np.testing.assert_allclose(emb, model.encode(texts, max_seq_length=24), atol=1e-6)
  lengths = {length for _, length in summary["batch_shapes"]}
  assert lengths <= {8, 16, 24} and len(summary["batch_shapes"]) <= 4 * len(lengths)
  assert all(rows * length <= 256 * 8 for rows, length in summary["batch_shapes"])


def test_row_choices_and_split():
  assert row_choices(16, 256, 8) == [128, 64, 32, 16]
  assert row_choices(512, 256, 8) == [8]  # one row per device even over budget
  assert split_rows(150, [128, 64, 32, 16]) == [128, 16, 16]
  assert sum(split_rows(1000, [64, 32, 16, 8])) - 1000 < 8


def test_cli_loads_model_directory(tmp_path, fixtures_dir, capsys):
  from instructor_jax.instructor import Instructor
  model_dir = str(fixtures_dir / "tiny_instructor")
  texts = sentences(12, seed=7)
  path = tmp_path / "in.txt"
  path.write_text("\n".join(texts) + "\n", encoding="utf-8")
  out = str(tmp_path / "out")
  summary = embed.main(["--model", model_dir, "--input", str(path), "--output", out, "--instruction", INSTRUCTION,
                        "--no-progress"])
  err = capsys.readouterr().err
  assert summary["rows"] == 12 and "rows/s" in err and summary["compute_seconds"] <= summary["seconds"]
  assert f"in {summary['seconds']:.1f} s, {summary['compute_seconds']:.1f} s of them embedding: " in err
  _, emb = read_output(out)
  expected = Instructor.from_pretrained(model_dir).encode([[INSTRUCTION, t] for t in texts])
  np.testing.assert_allclose(emb, expected, atol=1e-6)
  manifest = json.load(open(os.path.join(out, "_manifest.json")))
  assert manifest["model"]["source"].endswith("tiny_instructor") and manifest["model"]["compute_dtype"] == "float32"
  # --dtype fp16 (for GPUs without bf16) also runs here, close to float32, and is recorded as float16.
  out16 = str(tmp_path / "out16")
  embed.main(["--model", model_dir, "--input", str(path), "--output", out16, "--instruction", INSTRUCTION,
              "--no-progress", "--dtype", "fp16"])
  _, emb16 = read_output(out16)
  assert np.sum(emb16 * expected, axis=1).min() >= 0.999
  assert json.load(open(os.path.join(out16, "_manifest.json")))["model"]["compute_dtype"] == "float16"


def test_int8_ranges_file_is_used_and_checked(tmp_path, model):
  from instructor_jax.embed_io import InputError
  texts = sentences(10, seed=8)
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
  ranges = np.stack([-np.full(24, 0.5), np.full(24, 0.5)]).astype(np.float32)
  np.save(tmp_path / "ranges.npy", ranges)
  out = str(tmp_path / "out")
  embed.main(base_args([path], out, "--precision", "uint8", "--int8-ranges", str(tmp_path / "ranges.npy")),
             model=model)
  _, stored = read_output(out)
  expected = quantize(model.encode(texts), "uint8", ranges)
  assert stored.dtype == np.uint8 and np.abs(stored.astype(int) - expected.astype(int)).max() <= 1
  np.testing.assert_array_equal(np.load(os.path.join(out, "_int8_ranges.npy")), ranges)
  np.save(tmp_path / "bad.npy", ranges[:, :5])
  with pytest.raises(InputError, match=r"bad.npy: ranges have shape \(2, 5\); expected \(2, 24\)"):
    embed.main(base_args([path], str(tmp_path / "o2"), "--precision", "int8", "--int8-ranges",
                         str(tmp_path / "bad.npy")), model=model)


def test_refused_job_leaves_the_existing_int8_ranges_alone(tmp_path, model):
  """A command refused for a different --int8-ranges must not overwrite the finished job's ranges file."""
  from instructor_jax.embed_manifest import OutputMismatchError
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in sentences(10, seed=9)])
  first = np.stack([-np.full(24, 0.5), np.full(24, 0.5)]).astype(np.float32)
  np.save(tmp_path / "first.npy", first)
  np.save(tmp_path / "second.npy", first * 2)
  out = str(tmp_path / "out")
  embed.main(base_args([path], out, "--precision", "int8", "--int8-ranges", str(tmp_path / "first.npy")), model=model)
  with pytest.raises(OutputMismatchError, match="int8_ranges"):
    embed.main(base_args([path], out, "--precision", "int8", "--int8-ranges", str(tmp_path / "second.npy")),
               model=model)
  np.testing.assert_array_equal(np.load(os.path.join(out, "_int8_ranges.npy")), first)


def test_texts_past_the_largest_bucket_pad_to_doubling_lengths_and_the_job_records_it(tmp_path, model):
  """Past the largest bucket a text is padded to doubling lengths (here 16 -> 32), not to max_seq_length;
  a job that predates that rule padded otherwise, so it is not resumed across the change."""
  texts = ["a short one", "word " * 10, "word " * 20, "word " * 40]  # 5, 11, 21 and 41 tokens with EOS
  assert [len(ids) for ids in model.tokenizer.tokenize(texts, max_len=64)[0]] == [5, 11, 21, 41]
  path = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
  out = str(tmp_path / "out")
  args = base_args([path], out, "--max-seq-length", "64", "--buckets", "8,16", "--pack-length", "0")
  summary = embed.main(args, model=model)
  assert {length for _, length in summary["batch_shapes"]} == {8, 16, 32, 64}
  job = json.loads((tmp_path / "out" / "_job.json").read_text())
  assert job["long_padding"] == "doubling"
  _, emb = read_output(out)
  np.testing.assert_allclose(emb, model.encode(texts, max_seq_length=64), atol=1e-6)
  del job["long_padding"]  # as a job started before the rule wrote it
  (tmp_path / "out" / "_job.json").write_text(json.dumps(job))
  with pytest.raises(OutputMismatchError, match="long_padding: existing null vs now \"doubling\""):
    embed.main(args, model=model)
  default = str(tmp_path / "default")
  embed.main(base_args([path], default), model=model)  # buckets up to max_seq_length: nothing to record
  assert "long_padding" not in json.loads((tmp_path / "default" / "_job.json").read_text())
