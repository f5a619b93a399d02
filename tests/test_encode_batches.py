"""`Instructor.encode`'s chunked host side: tokenised on a worker thread a chunk ahead, same embeddings."""

import pathlib
import threading
import time

import numpy as np
import pytest

from instructor_jax import Instructor, encode_batches
from instructor_jax.encode_batches import BatchSpec, _Batcher as Batcher, chunk_stop, planned_batches
from instructor_jax.tokenization import InputError, InstructionCoversTextError, PackedBatch, build_inputs

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_instructor"
DATA = pathlib.Path(__file__).parent / "data" / "sentences.tsv"


def worker_threads():
  return [t for t in threading.enumerate() if t.name.startswith("instructor-encode")]


@pytest.fixture(scope="module")
def model():
  return Instructor.from_pretrained(str(FIXTURE))


@pytest.fixture
def small_chunks(monkeypatch):
  monkeypatch.setattr(encode_batches, "FIRST_CHUNK", 300)  # characters
  monkeypatch.setattr(encode_batches, "LARGEST_CHUNK", 1000)
  monkeypatch.setattr(encode_batches, "AHEAD_ON_CPU", True)  # the tests' devices are CPUs


def mixed_items(n=61):
  """Short instructed sentences, plain ones and long documents (past a pack length of 32)."""
  lines = [line.split("\t", 1)[1] for line in DATA.read_text().splitlines()[1:]]
  out = []
  for i in range(n):
    text = lines[i % len(lines)]
    if i % 7 == 3:
      out.append(" ".join(lines[i % len(lines):i % len(lines) + 6]))  # ~60-100 pieces
    elif i % 2:
      out.append(["Represent the sentence: ", text])
    else:
      out.append(text)
  return out


def fake_tokenize(calls):
  """Pieces 10 + position in the text (lengths from the words), recording the calling thread."""
  def tokenize(chunk):
    calls.append((threading.current_thread().name, len(chunk)))
    return build_inputs(lambda texts: [[10 + k for k in range(len(t.split()))] for t in texts], chunk, 64)
  return tokenize


def test_a_chunk_ends_once_its_characters_are_spent_each_text_capped_where_tokenising_stops():
  items = ["abcd", ["Represent: ", "xyz"], ("ab", "cd", "ignored third"), "x" * 1000, 7, "tail"]
  assert chunk_stop(items, 0, 1, 512) == 1  # at least one item
  assert chunk_stop(items, 0, 5, 512) == 2  # 4 < 5 chars, then 4 + 14
  assert chunk_stop(items, 1, 18, 512) == 3  # 14, then 14 + 4
  assert chunk_stop(items, 3, 100, 512) == 4 and chunk_stop(items, 3, 10 ** 6, 64) == 6  # 1000 counts 6 * 64
  assert chunk_stop(items, 4, 10 ** 6, 512) == 6  # a non-item counts nothing; split_item reports it


@pytest.mark.parametrize("pack_length", [0, 16])
def test_every_text_once_full_batches_but_the_last_and_ids_as_tokenised(small_chunks, monkeypatch, pack_length):
  items = mixed_items()
  spec = BatchSpec(rows=4, batch_size=3, pack_length=pack_length, buckets=(8, 16, 32, 64), max_len=64)
  calls, batchers = [], []
  monkeypatch.setattr(encode_batches, "_Batcher", lambda *a: batchers.append(Batcher(*a)) or batchers[-1])
  batches = list(planned_batches(fake_tokenize(calls), items, spec))
  assert batchers[0].ids == [None] * len(items)  # ids are dropped once padded
  want_ids, want_n = fake_tokenize([])(items)
  seen = []
  packed = [(r, b) for r, b in batches if isinstance(b, PackedBatch)]
  bucketed = [(r, b) for r, b in batches if not isinstance(b, PackedBatch)]
  assert bool(packed) == bool(pack_length)
  for k, (rows, batch) in enumerate(packed):
    assert len(rows) == 4 or k == len(packed) - 1  # rows carried across chunks: filler only at the end
    assert batch.ids.shape[0] == spec.rows_for(len(rows))
    for r, row in enumerate(rows):
      got = batch.ids[r][batch.mask[r] == 1]
      assert got.tolist() == [t for i in row for t in want_ids[i]]
      assert batch.n_instr[r, :len(row)].tolist() == [want_n[i] for i in row]
      seen += row
  for k, (rows, batch) in enumerate(bucketed):
    assert len(rows) == 3 or k == len(bucketed) - 1
    assert batch.ids.shape[0] == (4 if k < len(bucketed) - 1 else spec.rows_for(len(rows)))
    for r, (i,) in enumerate(rows):
      assert batch.ids[r, :batch.lengths[r]].tolist() == want_ids[i] and batch.n_instr[r] == want_n[i]
      seen.append(i)
  assert sorted(seen) == list(range(len(items)))
  # Chunks of 300, 600, 1000, 1000, ... characters, all tokenised on the worker thread.
  sizes = [n for _, n in calls]
  assert len(sizes) >= 5 and sum(sizes) == len(items) and sizes[0] < sizes[1] < sizes[2], sizes
  assert all(name.startswith("instructor-encode") for name, _ in calls)
  assert not worker_threads()


def test_chunked_encode_equals_one_chunk(model, small_chunks, monkeypatch):
  items = mixed_items()
  chunked = model.encode(items, batch_size=4, pack_length=32)
  monkeypatch.setattr(encode_batches, "FIRST_CHUNK", 10 ** 6)
  whole = model.encode(items, batch_size=4, pack_length=32)
  np.testing.assert_allclose(chunked, whole, atol=2e-6)
  unpacked = model.encode(items, batch_size=4, pack=False)
  np.testing.assert_allclose(chunked, unpacked, atol=2e-6)


def test_bad_item_in_a_later_chunk_fails_before_any_device_work(model, small_chunks, monkeypatch):
  items = mixed_items(30)
  items[23] = ["Represent the sentence: ", 7]
  dispatched = []
  monkeypatch.setattr(Instructor, "embed_packed_async", lambda self, b: dispatched.append(b))
  monkeypatch.setattr(Instructor, "embed_batch_async", lambda self, b: dispatched.append(b))
  with pytest.raises(InputError, match="input 23: expected"):
    model.encode(items)
  assert not dispatched


def test_instruction_covering_its_text_in_a_later_chunk_names_its_place_in_the_whole_input(model, small_chunks):
  items = mixed_items(30)
  items[23] = ["compreh", "end"]  # "compreh" alone is 3 pieces, "comprehend" 1: nothing left to pool
  with pytest.raises(InstructionCoversTextError, match="input 23: the instruction 'compreh' alone tokenises to 3"):
    model.encode(items)


@pytest.mark.parametrize("rows, devices, expected", [
    (32, 1, {1: 1, 2: 2, 3: 4, 17: 32, 32: 32}),
    (32, 8, {1: 8, 8: 8, 9: 16, 24: 32, 32: 32}),
    (24, 8, {1: 8, 17: 24, 24: 24}),  # batch_size 20 on 8 devices: never past `rows`
])
def test_a_partial_batch_is_padded_to_the_next_power_of_two_rows_per_device(rows, devices, expected):
  spec = BatchSpec(rows=rows, batch_size=rows, pack_length=16, buckets=(64,), max_len=64, devices=devices)
  assert {n: spec.rows_for(n) for n in expected} == expected


def test_one_query_runs_one_row_per_device_not_batch_size(model, monkeypatch):
  shapes = []
  monkeypatch.setattr(Instructor, "embed_packed_async", lambda self, b: shapes.append(b.ids.shape))
  monkeypatch.setattr(Instructor, "embed_batch_async", lambda self, b: shapes.append(b.ids.shape))
  monkeypatch.setattr(Instructor, "_fetch", staticmethod(lambda *a: None))
  model.encode([["Represent the question: ", "what is the capital of France?"]], batch_size=512)
  model.encode([" ".join(["word"] * 200)], batch_size=512)  # past the pack length: bucketed
  assert shapes == [(8, 128), (8, 256)]  # 8 local devices: one row each


def test_worker_error_reaches_the_caller_and_the_thread_ends(small_chunks):
  spec = BatchSpec(rows=2, batch_size=2, pack_length=16, buckets=(64,), max_len=64)
  calls = []
  ok = fake_tokenize(calls)

  def tokenize(chunk):
    if len(calls) == 2:
      raise RuntimeError("tokenizer broke on chunk 3")
    return ok(chunk)

  with pytest.raises(RuntimeError, match="chunk 3"):
    list(planned_batches(tokenize, mixed_items(), spec))
  assert not worker_threads()


def test_caller_error_stops_the_worker(model, small_chunks, monkeypatch):
  def broken(self, batch):
    raise RuntimeError("device lost")

  monkeypatch.setattr(Instructor, "embed_batch_async", broken)
  with pytest.raises(RuntimeError, match="device lost"):
    model.encode(mixed_items(), batch_size=1, pack=False)  # a batch per text: the first chunk has some
  assert not worker_threads()


def test_progress_bar_counts_texts(model, small_chunks, monkeypatch):
  tqdm = pytest.importorskip("tqdm.auto")
  counted = []
  original = tqdm.tqdm.update
  monkeypatch.setattr(tqdm.tqdm, "update", lambda self, n=1: (counted.append(n), original(self, n))[1])
  model.encode(mixed_items(), batch_size=4, pack_length=32, show_progress_bar=True)
  assert sum(counted) == 61


def test_text_the_tokenizer_cannot_encode_fails_before_any_device_work(model, small_chunks, monkeypatch):
  items = mixed_items(30)
  items[21] = ["Represent the sentence: ", "a JSON \ud83d escape"]
  dispatched = []
  monkeypatch.setattr(Instructor, "embed_packed_async", lambda self, b: dispatched.append(b))
  monkeypatch.setattr(Instructor, "embed_batch_async", lambda self, b: dispatched.append(b))
  with pytest.raises(InputError, match=r"input 21: holds a lone surrogate '\\ud83d' at character 7"):
    model.encode(items)
  assert not dispatched
  with pytest.raises(InputError, match="input 0: holds a lone surrogate"):  # one chunk: before, an unnamed TypeError
    model.encode(["bad \udc80 byte"])


def test_a_kept_error_does_not_keep_the_worker_alive(model, small_chunks, monkeypatch):
  def broken(self, batch):  # the next chunk is being prepared when the first batch fails
    raise RuntimeError("device lost")

  tokenize, calls = model.tokenizer.tokenize, []

  def slow_second_chunk(*args):
    calls.append(1)
    if len(calls) == 2:
      time.sleep(1.0)  # still running when the first batch fails
    return tokenize(*args)

  monkeypatch.setattr(Instructor, "embed_packed_async", broken)
  monkeypatch.setattr(Instructor, "embed_batch_async", broken)
  monkeypatch.setattr(model.tokenizer, "tokenize", slow_second_chunk)
  try:
    model.encode(mixed_items(), batch_size=1, pack=False)  # a batch per text: the first chunk has some
  except RuntimeError as e:
    kept = e  # a notebook keeps the last traceback, and with it the generator's frame
  assert kept.__traceback__ is not None and not worker_threads()
  assert len(calls) == 2  # the call stopped at its first batch


def test_one_chunk_pads_each_batch_just_before_it_is_dispatched(monkeypatch):
  padded = []
  monkeypatch.setattr(encode_batches, "pad_packed", lambda *a: padded.append(a) or "batch")
  spec = BatchSpec(rows=2, batch_size=2, pack_length=16, buckets=(64,), max_len=64)
  batches = planned_batches(fake_tokenize([]), mixed_items(40), spec)
  next(batches)
  assert len(padded) == 1  # the next batch is padded while the devices run this one
  rest = list(batches)
  assert len(padded) == 1 + sum(b == "batch" for _, b in rest)


def test_encode_after_the_main_thread_ended_and_at_exit(tmp_path):
  """concurrent.futures refuses work once interpreter shutdown began; encode must not."""
  script = tmp_path / "late.py"
  script.write_text(f"""
import atexit, threading
from instructor_jax import Instructor, encode_batches
encode_batches.FIRST_CHUNK, encode_batches.LARGEST_CHUNK, encode_batches.AHEAD_ON_CPU = 300, 1000, True
model = Instructor.from_pretrained({str(FIXTURE)!r})
texts = ["sentence number %d with a few words" % i for i in range(200)]
atexit.register(lambda: print("atexit", model.encode(texts).shape, flush=True))
def late():
  import time; time.sleep(1)
  print("thread", model.encode(texts).shape, flush=True)
threading.Thread(target=late).start()
""")
  import os
  import subprocess
  import sys
  root = str(pathlib.Path(__file__).parents[1])  # importable whether or not the package is installed
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=root)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "thread (200, 24)" in done.stdout and "atexit (200, 24)" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_on_cpu_devices_chunks_are_prepared_in_turn_on_the_calling_thread(model, small_chunks, monkeypatch):
  monkeypatch.setattr(encode_batches, "AHEAD_ON_CPU", False)
  tokenize, threads = model.tokenizer.tokenize, []

  def recording(*args):
    threads.append(threading.current_thread())
    return tokenize(*args)

  monkeypatch.setattr(model.tokenizer, "tokenize", recording)
  items = mixed_items()
  got = model.encode(items, batch_size=4, pack_length=32)
  assert len(threads) >= 5 and set(threads) == {threading.main_thread()}
  calls = len(threads)
  with pytest.raises(InputError, match="input 40"):
    model.encode(items[:40] + [None] + items[41:])
  assert len(threads) == calls  # refused before tokenising (and so before any device work)
  monkeypatch.setattr(encode_batches, "AHEAD_ON_CPU", True)
  np.testing.assert_allclose(got, model.encode(items, batch_size=4, pack_length=32), atol=2e-6)
