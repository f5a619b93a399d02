"""Token ids and the INSTRUCTOR instruction rule against Hugging Face and SentencePiece."""

import csv
import importlib
import pathlib
import sys

import numpy as np
import pytest

from instructor_jax import tokenization
from instructor_jax.tokenization import EOS_ID, InputError, Tokenizer

DATA = pathlib.Path(__file__).parent / "data"

EDGE_TEXTS = [
    "", " ", "a", "  leading and trailing  ", "multiple   spaces   inside", "tabs\tand\nnew\nlines\r\n",
    "unicode: café naïve Straße Ελληνικά 日本語 한국어", "emoji 😀👍🏽 and ©®™", "digits 1234567890 3.14159 1,000,000",
    "punctuation!!! ??? ... --- (brackets) [x] {y}", "ALL CAPS and MiXeD", "non-breaking\u00a0space and zero\u200bwidth",
    "x" * 3000, " ".join(["word"] * 2000),
]


def real_sentences():
  with open(DATA / "sentences.tsv") as f:
    return [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.from_pretrained(None)


def test_reference_example(tok):
  ids, n = tok.tokenize(["translate English to German: The house is wonderful."])
  assert ids == [[13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]] and n == [0]


def test_ids_match_hf_t5tokenizer_and_sentencepiece(tok):
  transformers = pytest.importorskip("transformers")
  import sentencepiece
  hf = transformers.T5Tokenizer.from_pretrained(tokenization.VOCAB_DIR)
  sp = sentencepiece.SentencePieceProcessor(model_file=str(pathlib.Path(tokenization.VOCAB_DIR) / "spiece.model"))
  texts = real_sentences() + EDGE_TEXTS
  ours, _ = tok.tokenize(texts, max_len=100000)
  for text, got in zip(texts, ours):
    assert got == hf(text.strip())["input_ids"], text
    assert got[:-1] == sp.encode(text.strip()), text
  # Truncation: HF truncates to max_length including EOS.
  got, _ = tok.tokenize(texts, max_len=512)
  for text, ids in zip(texts, got):
    assert ids == hf(text.strip(), truncation=True, max_length=512)["input_ids"]


def test_instruction_rule(tok):
  pieces = tok.encode_pieces
  instr = "Represent the Science title: "
  text = "  3D ActionSLAM: wearable person tracking  "
  ids, n = tok.tokenize([[instr, text]])
  assert ids[0] == pieces([(instr + text.strip()).strip()])[0] + [EOS_ID]
  assert n[0] == len(pieces([instr.strip()])[0])
  # One-token instruction: pooled (n_instr <= 1 -> 0); two tokens: masked.
  one = next(w for w in ("Hello", "Query", "query:") if len(pieces([w])[0]) == 1)
  two = next(w for w in ("query:", "Title:", "Represent:") if len(pieces([w])[0]) == 2)
  _, n = tok.tokenize([[one, "some text"], [two, "some text"], ["", "some text"], "plain text"])
  assert n == [0, 2, 0, 0]


def test_array_instruction_rule_equals_the_scalar_one():
  counts = np.arange(0, 40)
  for max_len in (2, 3, 16, 512):
    want = [tokenization.instruction_length(int(k), max_len) for k in counts]
    assert tokenization.instruction_lengths(counts, max_len).tolist() == want


def test_truncation_cuts_into_the_instruction(tok):
  instr = "Represent the Wikipedia question for retrieving supporting documents: "
  ids, n = tok.tokenize([[instr, "what is the capital of France?"]], max_len=8)
  assert len(ids[0]) == 8 and ids[0][-1] == EOS_ID
  assert n[0] == 7  # the standalone instruction is truncated to max_len - 1 pieces too


def test_padding_and_buckets(tok):
  batch = tok(["short", ["Represent the sentence: ", "a much longer sentence " * 5]], rows=4)
  assert batch.ids.shape == (4, 32) and batch.mask.shape == (4, 32)
  assert batch.mask[2:].sum() == 0 and list(batch.n_instr[2:]) == [0, 0]
  np.testing.assert_array_equal(batch.mask.sum(1)[:2], batch.lengths[:2])
  assert tokenization.bucket_length(513, (16, 512), 512) == 512
  assert tokenization.bucket_length(40, (16, 32, 64), 48) == 48


def test_third_item_is_ignored_as_in_instructor_embedding(tok):
  # 1.0.1 keeps [s[0], s[1]] of each item: the early README's [instruction, text, 0] form works.
  pairs = [["Represent the title: ", "a cat"], ["Represent the title: ", "a dog ran"]]
  assert tok.tokenize([p + [0] for p in pairs]) == tok.tokenize(pairs)


@pytest.mark.parametrize("bad", [[["only one"]], [["a", "b", "c", "d"]], [["a", 3, "c"]], [["instr", 3]], [None], [42],
                                 [("a", None)]])
def test_bad_inputs_raise_clear_errors(tok, bad):
  with pytest.raises(InputError, match=r"input 0: expected"):
    tok.tokenize(bad)


def test_bundled_vocabulary_loads_without_converting_spiece_model(monkeypatch):
  """tokenizer.json ships beside spiece.model, so machines without sentencepiece (the GPU image) work."""
  # The module itself: `import transformers.convert_slow_tokenizer` can resolve to the function of
  # that name through transformers' lazy namespace (transformers 5.17).
  conv = importlib.import_module("transformers.convert_slow_tokenizer")

  def refuse(*args, **kwargs):
    raise AssertionError("the bundled tokenizer was converted from spiece.model instead of read from tokenizer.json")

  # transformers 4.x converts through convert_slow_tokenizer, 5.x through SentencePieceExtractor;
  # both need the sentencepiece module, which the GPU image does not have.
  monkeypatch.setattr(conv, "convert_slow_tokenizer", refuse)
  monkeypatch.setattr(conv, "SentencePieceExtractor", refuse)
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  tok = Tokenizer.from_pretrained(None)
  assert tok.tokenize([["Represent the title: ", "hello world"]]) == ([[419, 12640, 8, 2233, 10, 21820, 296, 1]], [5])
