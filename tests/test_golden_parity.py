"""End-to-end parity with the real InstructorEmbedding 1.0.1 (golden file from tests/golden/make_golden.py).

If the fixture or the reference changes, regenerate with the command in make_golden.py's docstring;
never edit the golden numbers by hand.
"""

import collections
import json
import pathlib

import numpy as np
import pytest

from instructor_jax import Instructor

TESTS = pathlib.Path(__file__).parent
GOLDEN = json.loads((TESTS / "golden" / "instructor_1_0_1_golden.json").read_text())
FIXTURE = TESTS / "fixtures" / "tiny_instructor"


def _groups():
  cases = collections.defaultdict(list)
  for case in GOLDEN["cases"]:
    cases[case["group"]].append(case)
  return [(g, sorted(cases[g["name"]], key=lambda c: c["index_in_group"])) for g in GOLDEN["groups"]]


@pytest.fixture(scope="module")
def model():
  return Instructor.from_pretrained(str(FIXTURE), dtype="float32")


@pytest.mark.parametrize("group,cases", _groups(), ids=[g["name"] for g, _ in _groups()])
def test_tokens_and_instruction_lengths_match_reference(model, group, cases):
  ids, n_instr = model.tokenizer.tokenize([c["input"] for c in cases], max_len=group["max_seq_length"])
  for case, got_ids, got_n in zip(cases, ids, n_instr):
    assert got_ids == case["input_ids"], case["id"]
    assert got_n == case["n_instr_masked"], case["id"]


@pytest.mark.parametrize("group,cases", _groups(), ids=[g["name"] for g, _ in _groups()])
def test_embeddings_match_reference(model, group, cases):
  got = model.encode([c["input"] for c in cases], batch_size=group["batch_size"],
                     max_seq_length=group["max_seq_length"])
  want = np.array([c["embedding"] for c in cases], np.float32)
  err = np.abs(got - want).max()
  assert err <= 1e-5, f"max abs difference {err:.2e} in group {group['name']}"
