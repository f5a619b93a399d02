"""Tokenisation of `[instruction, text]` pairs with the exact InstructorEmbedding 1.0.1 semantics.

The rule (one implementation, used by inference, the embed job and the MEDI pipeline):
  * a plain string is a text without instruction; a pair is `[instruction, text]` (a third item,
    accepted by 1.0.1, is ignored);
  * the model input is `(instruction + text.strip()).strip()` (no separator; the instruction's
    trailing space stays inside the string), right-truncated to `max_len - 1` pieces, then EOS;
  * `n_instr = len(tokenize(instruction.strip())) - 1`, the standalone instruction truncated to
    `max_len` like everything else (its own EOS not counted);
  * quirk of 1.0.1: if `n_instr <= 1` it becomes 0, so a one-token instruction is pooled;
  * the encoder sees the whole input; only pooling skips the first `n_instr` positions.

`encode_fn` maps strings to SentencePiece ids without EOS; any implementation giving the ids of
Hugging Face's T5 tokenizer works (its Rust backend here, seqio's SentencePieceVocabulary in the
data pipeline).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
DEFAULT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
VOCAB_DIR = os.path.join(os.path.dirname(__file__), "vocab")

EncodeFn = Callable[[Sequence[str]], Sequence[Sequence[int]]]


class InputError(TypeError):
  """An input item that is neither a string nor an `[instruction, text]` pair of strings."""


class InstructionCoversTextError(InputError):
  """An instruction that alone tokenises to at least as many pieces as instruction + text with EOS (its
  last word merges with the text's first): pooling, which skips the instruction's positions, would
  see no token and give a zero vector. InstructorEmbedding 1.0.1 fails an assertion where the
  instruction has more pieces and returns that zero vector where it has as many; we refuse both.
  `index` is the item's position in the call's input."""

  def __init__(self, index: int, instruction: str, instruction_pieces: int, input_pieces: int):
    self.index, self.instruction = index, instruction
    self.instruction_pieces, self.input_pieces = instruction_pieces, input_pieces
    super().__init__(f"input {index}: {self.detail()}")

  def detail(self) -> str:
    return (f"the instruction {self.instruction!r:.80} alone tokenises to {self.instruction_pieces} pieces and "
            f"instruction + text to only {self.input_pieces} with EOS, so pooling, which skips the instruction's "
            "positions, would see no token: its last word merges with the text's first. End the instruction "
            "with a space or ': '.")

  def shifted(self, offset: int) -> "InstructionCoversTextError":
    """The same error for an item `offset` places further into the whole input."""
    return InstructionCoversTextError(self.index + offset, self.instruction, self.instruction_pieces,
                                      self.input_pieces)


def split_item(item: Any, index: int) -> tuple[str | None, str]:
  """(instruction or None, text) for one input item; `index` is used in the error message."""
  if isinstance(item, str):
    return None, _encodable(item, index)
  if isinstance(item, (list, tuple)):
    # 1.0.1 also takes [instruction, text, anything] (an early README form) and drops the third item.
    if len(item) in (2, 3) and isinstance(item[0], str) and isinstance(item[1], str):
      return _encodable(item[0], index), _encodable(item[1], index)
    kinds = [type(x).__name__ for x in item]
    raise InputError(f"input {index}: expected [instruction, text] with two strings, got a "
                     f"{type(item).__name__} of {len(item)} items of types {kinds}.")
  raise InputError(f"input {index}: expected a string or an [instruction, text] pair, "
                   f"got {type(item).__name__}: {item!r:.80}.")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str, index: int) -> str:
  """`text`, unless it holds a lone surrogate, which the Rust tokenizer rejects without saying where."""
  # isascii() is O(1) in CPython, so only non-ASCII strings are scanned.
  found = None if text.isascii() else _LONE_SURROGATE.search(text)
  if found:
    at = found.start()
    raise InputError(f"input {index}: holds a lone surrogate {text[at]!r} at character {at} (a bad \\u escape in "
                     "JSON, or bytes decoded with errors='surrogateescape'); such text cannot be UTF-8 encoded. "
                     "Fix or drop it.")
  return text


def model_input_text(instruction: str | None, text: str) -> str:
  """The string the encoder sees (InstructorEmbedding 1.0.1: plain concatenation, then strip)."""
  if instruction is None:
    return text.strip()
  return (instruction + text.strip()).strip()


def truncate_with_eos(pieces: Sequence[int], max_len: int) -> list[int]:
  """Right-truncates to max_len - 1 pieces and appends EOS, as the HF tokenizer with truncation."""
  return list(pieces[: max_len - 1]) + [EOS_ID]


def instruction_length(num_pieces: int, max_len: int) -> int:
  """Positions excluded from pooling, from the piece count of the stripped instruction.

  The standalone instruction is truncated like any input (max_len - 1 pieces + EOS) and its EOS
  is not counted.
  """
  n = min(num_pieces, max_len - 1)
  return 0 if n <= 1 else n  # InstructorEmbedding 1.0.1 pools one-token instructions.


def instruction_lengths(num_pieces: np.ndarray, max_len: int) -> np.ndarray:
  """`instruction_length` over an array of piece counts (int32)."""
  n = np.minimum(num_pieces, max_len - 1)
  return np.where(n <= 1, 0, n).astype(np.int32)


# An ASCII space between two printable ASCII characters. The characters either side of it are
# normalised on their own (no NFKC composition, grapheme cluster or added token reaches across it),
# so a tokeniser that splits words on whitespace before segmenting them gives the text before such
# a space exactly the leading pieces it has in the whole text.
_SAFE_CUT = re.compile(r"(?<=[!-~]) (?=[!-~])")
# Characters kept per wanted piece before cutting: English prose runs at ~4 characters per T5
# piece, so the cut text almost always holds enough pieces; when it does not, it is cut further on.
CUT_CHARS_PER_PIECE = 6


def encode_leading(encode_fn: EncodeFn, texts: Sequence[str], keep: int) -> list[Sequence[int]]:
  """Pieces of each text, exact in their first `keep` entries and longer than `keep` exactly when
  the whole text's are, which is all `build_inputs` reads; `encode_fn` must split words on
  whitespace before segmenting them (`whitespace_separable`).

  Encoding a long text whole only to drop all but its first `keep` pieces made the embed job's
  tokeniser, not the accelerator, the bottleneck on long documents (14k-piece texts: 34k kept
  tokens/s on two cores). Each text longer than `CUT_CHARS_PER_PIECE * (keep + 1)` characters is
  cut at the first safe space after that; a cut text that yields no more than `keep` pieces is cut
  again at the first safe space past both four times that point and the last cut, up to the whole
  text, so the result never depends on the cut.
  """
  first = CUT_CHARS_PER_PIECE * (keep + 1)
  inputs = list(texts)
  pending = []  # (text, where its cut was searched from, the cut)
  for i, text in enumerate(texts):
    if len(text) > first and (m := _SAFE_CUT.search(text, first)) is not None:
      inputs[i] = text[:m.start()]
      pending.append((i, first, m))
  pieces = list(encode_fn(inputs))
  while pending:
    # Past both four times the last start and the last cut, so a text whose next safe space is far
    # off is not encoded up to it twice.
    again = [(i, max(4 * start, m.end())) for i, start, m in pending if len(pieces[i]) <= keep]
    if not again:
      break
    cuts = [_SAFE_CUT.search(texts[i], start) if len(texts[i]) > start else None for i, start in again]
    encoded = encode_fn([texts[i] if m is None else texts[i][:m.start()] for (i, _), m in zip(again, cuts)])
    for (i, _), p in zip(again, encoded):
      pieces[i] = p
    pending = [(i, start, m) for (i, start), m in zip(again, cuts) if m is not None]
  return pieces


def build_inputs(encode_fn: EncodeFn, items: Sequence[Any], max_len: int,
                 instruction_cache: dict[str, int] | None = None,
                 truncated: list[bool] | None = None,
                 whitespace_separable: bool = False,
                 covered: list[InstructionCoversTextError] | None = None) -> tuple[list[list[int]], list[int]]:
  """Token ids (with EOS, unpadded) and instruction lengths; `truncated` (if given) gets one flag per item.

  An item whose instruction covers the whole input, EOS included, raises `InstructionCoversTextError`, or,
  if `covered` is given, has its error appended there (and its ids and length returned all the same).

  With `whitespace_separable` (an `encode_fn` that splits words on whitespace first), long inputs
  are encoded only as far as truncation keeps them (`encode_leading`); the result is the same.
  """
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 (one piece + EOS), got {max_len}.")
  split = [split_item(item, i) for i, item in enumerate(items)]
  inputs = [model_input_text(ins, text) for ins, text in split]
  pieces = encode_leading(encode_fn, inputs, max_len - 1) if whitespace_separable else encode_fn(inputs)
  cache = instruction_cache if instruction_cache is not None else {}
  new = sorted({ins for ins, _ in split if ins is not None and ins not in cache})
  if new:
    for ins, ids in zip(new, encode_fn([ins.strip() for ins in new])):
      cache[ins] = len(ids)
  ids = [truncate_with_eos(p, max_len) for p in pieces]
  if truncated is not None:
    truncated.extend(len(p) > max_len - 1 for p in pieces)
  n_instr = [0 if ins is None else instruction_length(cache[ins], max_len) for ins, _ in split]
  for i, (n, x) in enumerate(zip(n_instr, ids)):
    if n >= len(x):
      error = InstructionCoversTextError(i, split[i][0], n, len(x))
      if covered is None:
        raise error
      covered.append(error)
  return ids, n_instr


@dataclasses.dataclass(frozen=True)
class Batch:
  """Fixed-shape model inputs: ids and mask int32 [B, L], n_instr int32 [B], and true lengths."""

  ids: np.ndarray
  mask: np.ndarray
  n_instr: np.ndarray
  lengths: np.ndarray

  def to_dict(self) -> dict[str, np.ndarray]:
    return {"ids": self.ids, "mask": self.mask, "n_instr": self.n_instr}


def bucket_length(length: int, buckets: Sequence[int], max_len: int) -> int:
  """Smallest bucket that holds `length`, capped at max_len (so shapes stay few and fixed).

  Past the largest bucket (a model run above 512 tokens) the length doubles from it, so that a
  3,000-token text under max_len 32768 is padded to 4096, not to 32768 (a [L, L] attention 64x larger).
  """
  for b in buckets:
    if length <= b and b <= max_len:
      return b
  b = max((b for b in buckets if b <= max_len), default=max_len)
  while b < length and b < max_len:
    b *= 2
  return min(b, max_len)


def pad_batch(ids: Sequence[Sequence[int]], n_instr: Sequence[int], length: int,
              rows: int | None = None) -> Batch:
  """Right-pads to [rows, length] with PAD; filler rows (rows > len(ids)) are fully masked."""
  rows = len(ids) if rows is None else rows
  out = np.full((rows, length), PAD_ID, np.int32)
  lengths = np.zeros((rows,), np.int32)
  for r, seq in enumerate(ids):
    if len(seq) > length:
      raise ValueError(f"row {r} has {len(seq)} tokens, more than the padded length {length}.")
    out[r, : len(seq)] = seq
    lengths[r] = len(seq)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  n = np.zeros((rows,), np.int32)
  n[: len(n_instr)] = n_instr
  return Batch(out, mask, n, lengths)


class Tokenizer:
  """INSTRUCTOR tokeniser over a Hugging Face T5 tokenizer (its Rust backend, batch-parallel)."""

  def __init__(self, hf_tokenizer: Any, max_seq_length: int = 512):
    self.hf_tokenizer = hf_tokenizer
    self.max_seq_length = max_seq_length
    self._shared = getattr(hf_tokenizer, "backend_tokenizer", None)
    self._backend = None
    self._synced_key: tuple[int, int] | None = None
    self.whitespace_separable = False
    self._instruction_cache: dict[str, int] = {}
    self._sync()

  def _sync(self) -> None:
    """(Re)takes a private copy of the Rust tokenizer when tokens were added to the shared one.

    A copy, without truncation or padding: both are state of the Rust tokenizer, so a
    tokenizer.json saved with either, or a user's hf_tokenizer(..., truncation=True, padding=True)
    on the shared object, would otherwise cut or pad the pieces `encode_pieces` returns. Tokens
    added later (`add_tokens`, even of a piece already in the vocabulary) change the count of added
    tokens and are picked up here; other edits of the Rust tokenizer need a new `Tokenizer`.
    """
    if self._shared is None:
      return
    key = (self._shared.get_vocab_size(with_added_tokens=True), len(self._shared.get_added_tokens_decoder()))
    if key == self._synced_key:
      return
    import tokenizers  # a dependency of transformers; imported here, where a Rust tokenizer exists
    try:
      spec = self._shared.to_str()
    except Exception:  # noqa: BLE001 - e.g. "Custom PreTokenizer cannot be serialized"
      # A Python pre-tokenizer cannot be copied: encode with the shared object, whole texts only.
      self._backend, self.whitespace_separable = self._shared, False
    else:
      backend = tokenizers.Tokenizer.from_str(spec)
      backend.no_truncation()
      backend.no_padding()
      self._backend = backend
      self.whitespace_separable = splits_words_first(json.loads(spec), backend.normalizer)
    self._synced_key = key
    # A new dict, not clear(): a build_inputs running in another thread keeps the one it started with.
    self._instruction_cache = {}

  @classmethod
  def from_pretrained(cls, directory: str | None = None, max_seq_length: int = 512) -> "Tokenizer":
    """Tokenizer files of a model directory; the bundled T5 vocabulary when `directory` is None
    or holds no tokenizer files (t5x checkpoints ship none)."""
    # Without torch, importing transformers advises that "models won't be available"; only its
    # tokenizers are used here, so that advice is wrong for us (a user's own setting wins).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers
    # Always from_pretrained on a directory: T5Tokenizer(vocab_file=...) silently builds a
    # 4-token vocabulary in transformers 5.
    if directory is not None and any(
        os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
      return cls(transformers.AutoTokenizer.from_pretrained(directory), max_seq_length)
    if directory is not None and os.path.exists(os.path.join(directory, "spiece.model")):
      return cls(transformers.T5Tokenizer.from_pretrained(directory), max_seq_length)
    # The bundled directory has tokenizer.json (written from spiece.model by export.save_tokenizer),
    # so the default tokenizer needs neither sentencepiece nor a slow-to-fast conversion.
    return cls(transformers.AutoTokenizer.from_pretrained(VOCAB_DIR), max_seq_length)

  def encode_pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """SentencePiece ids without EOS."""
    _refuse_string(texts, "encode_pieces", "texts")
    self._sync()
    if self._backend is not None:
      # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never read: 1.2-1.5x
      # on short texts (benchmarks/tokenize_bench.py).
      encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
      return [e.ids for e in encode(list(texts), add_special_tokens=False)]
    return [self.hf_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

  def tokenize(self, items: Sequence[Any], max_len: int | None = None, truncated: list[bool] | None = None,
               covered: list[InstructionCoversTextError] | None = None) -> tuple[list[list[int]], list[int]]:
    """Unpadded ids (with EOS) and instruction lengths; `truncated` and `covered` as for `build_inputs`."""
    _refuse_string(items, "tokenize", "texts or [instruction, text] pairs")
    max_len = self.max_seq_length if max_len is None else max_len
    self._sync()  # before reading whitespace_separable and the cache (encode_pieces syncs for direct callers)
    return build_inputs(self.encode_pieces, items, max_len, self._instruction_cache, truncated,
                        self.whitespace_separable, covered)

  def __call__(self, items: Sequence[Any], max_len: int | None = None,
               buckets: Sequence[int] | None = DEFAULT_BUCKETS, rows: int | None = None) -> Batch:
    """Padded batch; the length is the smallest bucket holding the longest row (or exact if None)."""
    max_len = self.max_seq_length if max_len is None else max_len
    ids, n_instr = self.tokenize(items, max_len)
    longest = max((len(x) for x in ids), default=1)
    length = bucket_length(longest, buckets, max_len) if buckets else longest
    return pad_batch(ids, n_instr, length, rows)


def _refuse_string(items: Any, method: str, expected: str) -> None:
  # A str is a sequence too: read as one text per character, it would give wrong counts silently.
  if isinstance(items, str):
    raise InputError(f"Tokenizer.{method} takes a list of {expected}, got one string {items!r:.60}; wrap it in "
                     "a list (for the Hugging Face tokenizer itself use `tokenizer.hf_tokenizer`).")


# Normalisers that act on single characters or grapheme clusters (or on the whole string's ends),
# and pre-tokenisers that only split; anything else (a user's regex Replace, a byte-level
# pre-tokeniser that keeps spaces inside pieces) turns `encode_leading` off.
_LOCAL_NORMALIZERS = {"Precompiled", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Prepend"}
_SPLITTING_PRE_TOKENIZERS = {"WhitespaceSplit", "Whitespace", "BertPreTokenizer", "Metaspace"}


def splits_words_first(spec: dict[str, Any], normalizer: Any = None) -> bool:
  """Whether a `tokenizers` JSON spec segments each whitespace-separated word on its own, so that a
  text cut at a `_SAFE_CUT` space keeps the leading pieces of the whole (T5's converted tokenizer).
  `normalizer` (the spec's, built), when given, must keep an ASCII space between two printable
  ASCII characters (a normalizer is trusted on its type alone otherwise).
  """
  def local(n: dict[str, Any] | None) -> bool:
    if n is None:
      return True
    if n["type"] == "Sequence":
      return all(local(x) for x in n["normalizers"])
    # T5 conversions collapse runs of two or more spaces; such a run never reaches a safe cut.
    if n["type"] == "Replace":
      return n.get("pattern") in ({"Regex": " {2,}"}, {"String": "  "}) and n.get("content") in (" ", "\u2581")
    return n["type"] in _LOCAL_NORMALIZERS

  def splits(p: dict[str, Any]) -> bool:
    return p["type"] != "Metaspace" or p.get("split", True)

  pre = spec.get("pre_tokenizer")
  steps = [] if pre is None else pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
  # The first step must split on whitespace: a Metaspace(split=False) before it would turn spaces
  # into "▁" and make the whole text one word. Added tokens are matched before splitting, so
  # their text must not be able to reach across a space (T5's are "</s>", "<extra_id_0>", ...).
  return (local(spec.get("normalizer")) and bool(steps) and splits(steps[0])
          and all(p["type"] in _SPLITTING_PRE_TOKENIZERS for p in steps)
          and all(re.fullmatch(r"[!-~]+", t["content"]) for t in spec.get("added_tokens", []))
          and (normalizer is None or "! ~" in normalizer.normalize_str("a! ~b")))


def texts_per_row(pack_length: int) -> int:
  """Text slots of a packed row (the S of [R, S, E]); shared by encode and the embed job."""
  # A slot costs pooling work for every row; real texts are rarely under 4 tokens with EOS.
  return max(1, pack_length // 4)


def pack_rows(lengths: Sequence[int], row_len: int, max_texts: int) -> list[list[int]]:
  """Groups texts (by index) into rows of at most `row_len` tokens and `max_texts` texts.

  Best-fit decreasing: longest text first, each into the open row with the least room that holds
  it. Open rows are kept by free space, so a text looks at most `row_len` lists, and every row stays
  reachable (a window over recent rows left ~15% of each row empty on 100k-text embed-job parts).
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  rows: list[list[int]] = []
  free: list[int] = []
  open_by_free: list[list[int]] = [[] for _ in range(row_len + 1)]  # may hold stale entries
  for i in order:
    n = lengths[i]
    if n > row_len:
      raise ValueError(f"text {i} has {n} tokens, more than the packed row length {row_len}.")
    target = None
    for room in range(max(n, 1), row_len + 1):
      while open_by_free[room] and target is None:
        r = open_by_free[room].pop()
        # An entry is stale once its row took another text (its free space only shrinks).
        if free[r] == room and len(rows[r]) < max_texts:
          target = r
      if target is not None:
        break
    if target is None:
      rows.append([])
      free.append(row_len)
      target = len(rows) - 1
    rows[target].append(i)
    free[target] -= n
    if free[target] > 0 and len(rows[target]) < max_texts:
      open_by_free[free[target]].append(target)
  return rows


@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """Several texts per row: ids, mask, segments (1..S per text, 0 pad), offsets inside each text
  (int32 [R, L]) and instruction lengths per text slot (int32 [R, S])."""

  ids: np.ndarray
  mask: np.ndarray
  segments: np.ndarray
  offsets: np.ndarray
  n_instr: np.ndarray


def pad_packed(rows: Sequence[Sequence[int]], ids: Sequence[Sequence[int]], n_instr: Sequence[int],
               length: int, max_texts: int, num_rows: int) -> PackedBatch:
  """Lays packed rows out as fixed [num_rows, length] arrays; filler rows are all padding."""
  out = {k: np.zeros((num_rows, length), np.int32) for k in ("ids", "segments", "offsets")}
  n = np.zeros((num_rows, max_texts), np.int32)
  for r, row in enumerate(rows):
    pos = 0
    for s, i in enumerate(row):
      seq = ids[i]
      out["ids"][r, pos:pos + len(seq)] = seq
      out["segments"][r, pos:pos + len(seq)] = s + 1
      out["offsets"][r, pos:pos + len(seq)] = np.arange(len(seq))
      n[r, s] = n_instr[i]
      pos += len(seq)
  mask = (out["segments"] > 0).astype(np.int32)
  return PackedBatch(out["ids"], mask, out["segments"], out["offsets"], n)
