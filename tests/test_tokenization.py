"""Token ids and the INSTRUCTOR instruction rule against Hugging Face and SentencePiece."""

import csv
import importlib
import json
import pathlib
import random
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
  # Above the largest bucket lengths double from it, capped at max_len: not padded to max_len at once.
  assert [tokenization.bucket_length(n, (16, 512), 4096) for n in (513, 1024, 1025, 3000, 5000)] == [
      1024, 1024, 2048, 4096, 4096]
  assert tokenization.bucket_length(700, (16, 512), 600) == 600


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


# Characters that normalisation, grapheme clustering or added-token matching could carry across a
# cut: combining marks, compatibility forms (NFKC expands them), unusual spaces, controls, CR LF,
# emoji sequences, prepended marks and T5's own special tokens written as text.
TRICKY = ["e\u0301", "\u0301", "\ufb01", "\u2460", "\u00a0", "\u3000", "\u200b", "\u200d", "\t", "\n", "\r\n", "\x00",
          "\U0001f468\u200d\U0001f469", "\U0001f1eb\U0001f1f7", "\u0600", "\u1100\u1161", "</s>", "<extra_id_0>",
          "<unk>", "\uff21\uff22", "\u00bd", "...", "-", "'", "a", "the", "Zoë", "naïve", "\u2028", "\ufeff"]


def _cut_cases(rng, n):
  """Real text glued into paragraphs, and random strings of TRICKY pieces, words and separators."""
  real = real_sentences()
  cases = [" ".join(rng.sample(real, 12)) for _ in range(n)]
  for _ in range(n):
    parts = [rng.choice(TRICKY + ["word", "x", "information", "3.14"]) for _ in range(rng.randint(5, 40))]
    cases.append("".join(p + rng.choice(["", " ", " ", "  ", "\t", "\u00a0"]) for p in parts))
  return cases


def test_text_before_a_safe_cut_keeps_the_leading_pieces_of_the_whole(tok):
  """The property `encode_leading` rests on, over every safe cut of real and adversarial texts."""
  rng = random.Random(0)
  checked = 0
  for text in _cut_cases(rng, 150):
    whole = tok.encode_pieces([text])[0]
    cuts = [m.start() for m in tokenization._SAFE_CUT.finditer(text)]
    for cut, got in zip(cuts, tok.encode_pieces([text[:c] for c in cuts])):
      assert got == whole[:len(got)], (text, cut)
      checked += 1
  assert checked > 3000


def test_leading_encoding_gives_the_same_inputs_as_whole_encoding(tok):
  rng = random.Random(1)
  real = real_sentences()
  instr = "Represent the Wikipedia document for retrieval: "
  items = [" ".join(rng.sample(real, k)) for k in (1, 5, 20, 60, 200)]
  items += [" ".join(["information"] * 2000),  # ~12 characters per piece: the first cut is too short
            "x" * 20000 + " tail",  # one long word: the only safe cut is past everything that matters
            "\u3000".join(real[:100]),  # no ASCII space at all
            "word " * 5000, "I"]
  items += [[instr, t] for t in items] + [["", items[3]], [instr * 50, items[2]]]
  for max_len in (2, 3, 8, 64, 512):
    whole_flags, leading_flags = [], []
    whole = tokenization.build_inputs(tok.encode_pieces, items, max_len, {}, whole_flags, False)
    leading = tokenization.build_inputs(tok.encode_pieces, items, max_len, {}, leading_flags, True)
    assert leading == whole, max_len
    assert leading_flags == whole_flags and any(whole_flags) and not all(whole_flags)


def _recording(tok):
  """tok.encode_pieces, recording the character length of every text of every call."""
  seen = []

  def encode(texts):
    seen.append([len(t) for t in texts])
    return tok.encode_pieces(texts)

  return seen, encode


def test_leading_encoding_cuts_again_when_a_cut_is_too_short(tok):
  seen, encode = _recording(tok)
  text = " ".join(["information"] * 2000)  # ~12 characters per piece
  got = tokenization.encode_leading(encode, [text, "short"], 300)
  assert got[0] == tok.encode_pieces([text])[0][:len(got[0])] and len(got[0]) > 300
  assert got[1] == tok.encode_pieces(["short"])[0]
  budget = tokenization.CUT_CHARS_PER_PIECE * 301
  assert len(seen) == 2 and budget <= seen[0][0] < budget + 12 and 4 * budget <= seen[1][0] < len(text)


def test_a_cut_with_too_few_pieces_is_not_encoded_again(tok):
  """The next cut is searched past the last one: one far-off safe space costs one encode, not log4(n)."""
  seen, encode = _recording(tok)
  text = "a" + "\x01" * 50_000 + "b c"  # control characters normalise away: few pieces before the only cut
  assert tokenization.encode_leading(encode, [text], 300) == tok.encode_pieces([text])
  assert seen == [[len(text) - 2], [len(text)]]


def _spec(tok):
  return json.loads(tok._backend.to_str())


def test_leading_encoding_is_on_only_for_tokenizers_that_split_words_first(tok):
  assert tok.whitespace_separable
  fixture = pathlib.Path(__file__).parent / "fixtures" / "tiny_instructor"
  assert Tokenizer.from_pretrained(str(fixture)).whitespace_separable
  spec = _spec(tok)
  assert tokenization.splits_words_first(spec)
  older = dict(spec, normalizer={"type": "Sequence", "normalizers": [
      spec["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]})
  assert tokenization.splits_words_first(older)
  metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False}
  for broken in (dict(spec, pre_tokenizer=None),
                 dict(spec, pre_tokenizer=metaspace),
                 dict(spec, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}),
                 dict(spec, normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}),
                 # Metaspace(split=False) first makes the whole text one word before anything splits it.
                 dict(spec, pre_tokenizer={"type": "Sequence", "pretokenizers": [metaspace, {"type": "WhitespaceSplit"}]}),
                 dict(spec, added_tokens=spec["added_tokens"] + [dict(spec["added_tokens"][0], id=32100,
                                                                      content="new york")])):
    assert not tokenization.splits_words_first(broken)
  tokenizers = pytest.importorskip("tokenizers")
  assert not tokenization.splits_words_first(spec, tokenizers.normalizers.Replace(" ", ""))


def test_added_tokens_that_normalise_to_a_space_turn_leading_encoding_off():
  """T5's normaliser maps "\u2581" (and zero-width characters) to a space: such a token, matched on
  normalised text, can span the ASCII space of a cut."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(tokenization.VOCAB_DIR)
  word = "zqxjkvwzqxjkvwzqxjkvwzqxjkvw"
  tok = Tokenizer(hf)
  assert tok.whitespace_separable
  hf.add_tokens([word + "\u2581y"])  # after construction: picked up on the next call
  flags = []
  got = tok.tokenize([word + " y tail"], 4, flags)
  assert not tok.whitespace_separable
  assert got == ([[32100, 9891, EOS_ID]], [0]) and flags == [False]


def test_truncation_or_padding_left_on_the_hf_tokenizer_does_not_reach_our_pieces(tmp_path):
  """Both are state of the Rust tokenizer: set by a saved tokenizer.json or by any padded call."""
  items = [["Represent the title: ", "a fairly long sentence about nothing much at all"], "short", "x " * 900]
  want = Tokenizer.from_pretrained(None).tokenize(items, 1024)
  shared = Tokenizer.from_pretrained(None)
  shared.hf_tokenizer(["hello world", "hi"], truncation=True, max_length=4, padding=True)
  assert shared.tokenize(items, 1024) == want
  spec = json.loads((pathlib.Path(tokenization.VOCAB_DIR) / "tokenizer.json").read_text())
  spec["truncation"] = {"direction": "Right", "max_length": 6, "strategy": "LongestFirst", "stride": 0}
  spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                     "pad_type_id": 0, "pad_token": "<pad>"}
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  (tmp_path / "tokenizer_config.json").write_text((pathlib.Path(tokenization.VOCAB_DIR) / "tokenizer_config.json").read_text())
  assert Tokenizer.from_pretrained(str(tmp_path)).tokenize(items, 1024) == want


def test_tokens_added_after_construction_reach_ids_and_instruction_lengths():
  """Even a piece already in the vocabulary: it does not change the vocabulary's size."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(tokenization.VOCAB_DIR)
  tok = Tokenizer(hf)
  items = [["Represent the running title: ", "running and singing"]]
  before = tok.tokenize(items)
  hf.add_tokens(["ing"])
  after = tok.tokenize(items)
  assert tok.encode_pieces(["running and singing"])[0] == hf("running and singing", add_special_tokens=False)["input_ids"]
  assert after == Tokenizer(hf).tokenize(items) and after[1] != before[1]  # the cached instruction length too


def test_a_tokenizer_that_cannot_be_copied_is_used_as_it_is():
  """A Python pre-tokenizer cannot be serialised: the shared Rust tokenizer is used, texts encoded whole."""
  transformers = pytest.importorskip("transformers")
  from tokenizers import pre_tokenizers
  hf = transformers.AutoTokenizer.from_pretrained(tokenization.VOCAB_DIR)
  want = Tokenizer(hf).tokenize(["hello world, " * 400], 16)

  class SplitOnSpaces:
    def pre_tokenize(self, pretok):
      pretok.split(lambda i, s: s.split(" ", "removed"))

  hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.PreTokenizer.custom(SplitOnSpaces()), hf.backend_tokenizer.pre_tokenizer])
  tok = Tokenizer(hf)
  assert not tok.whitespace_separable and tok.tokenize(["hello world, " * 400], 16) == want
