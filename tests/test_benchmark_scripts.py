"""The benchmark scripts run end to end (tiny shapes) and their summaries say something true."""

import json
import re
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
  # A private TMPDIR, so a test can check that the script cleaned up after itself.
  scratch = tmp_path / "scratch"
  scratch.mkdir(exist_ok=True)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(scratch))
  done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_profile_attributes_train_step_time_to_matmuls_and_dropout_bits(tmp_path):
  out = tmp_path / "prof"
  stdout = _run(["benchmarks/profile_ops.py", "--case", "train", "--shape", "tiny", "--batch", "4", "--length", "16",
                 "--iterations", "1", "--out", str(out)], tmp_path)
  summary = json.loads((out / "summary.json").read_text())
  shares = {r["category"]: r["share"] for r in summary["by_category"]}
  # A train step with dropout multiplies matrices and draws dropout bits; both must be found in the HLO.
  assert shares.get("matmul", 0) > 0.01 and shares.get("random bits", 0) > 0.01, shares
  assert abs(sum(shares.values()) - 1) < 1e-6
  assert all(r["module"].startswith("jit_") for r in summary["top_ops"])
  assert "by kind of op" in stdout and (out / "summary.txt").exists()
  assert list(out.glob("plugins/profile/*/perfetto_trace.json.gz"))
  # The exported weights it profiled are removed (a gtr-large export is over a GB).
  assert not list((tmp_path / "scratch").iterdir())


def test_gemm_forms_times_every_form(tmp_path):
  out = tmp_path / "gemm.json"
  stdout = _run(["benchmarks/gemm_forms.py", "--m", "64", "--k", "32", "--n", "48", "--reps", "1", "--json", str(out)],
                tmp_path)
  rates = json.loads(out.read_text())["gflops"]
  assert {"float32", "bf16 -> bf16", "bf16 -> float32", "int8 -> int32", "float32 -> int8 GEMM -> float32"} <= set(rates)
  assert all(r > 0 for r in rates.values()) and "x float32" in stdout


def test_tokenize_bench_compares_leading_and_whole_encoding(tmp_path):
  out = tmp_path / "tok.json"
  stdout = _run(["benchmarks/tokenize_bench.py", "--docs", "3", "--short", "20", "--repeats", "1", "--out", str(out)],
                tmp_path)
  cases = json.loads(out.read_text())["cases"]
  assert len(cases) == 4 and "leading / before" in stdout
  # The script exits non-zero if the two encodings' ids differ; here the long documents must be cut.
  long = cases["documents of ~10000 words"]
  assert long["whole_pieces_per_text"] > 10000 and long["kept_tokens"] == 3 * 512
  assert set(long["kept_tokens_per_s"]) == {"leading", "whole", "before", "hf"}


def test_bench_runs_both_sides_in_bf16_on_request(tmp_path):
  pytest.importorskip("sentence_transformers")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "benchmarks/run.py", "--shape", "tiny", "--dtype", "bfloat16"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and "--dtype bfloat16 applies to the matmul and embed sections" in done.stderr
  out = tmp_path / "bf16.json"
  _run(["benchmarks/run.py", "--shape", "tiny", "--quick", "--sections", "embed", "--dtype", "bfloat16", "--short", "16",
        "--docs", "2", "--out", str(out)], tmp_path)
  result = json.loads(out.read_text())
  assert result["dtype"] == "bfloat16" and len(result["embed"]) == 2
  assert all(r["ours_weight_dtype"] == r["st_weight_dtype"] == "bfloat16" for r in result["embed"]), result["embed"]
  assert all(r["min_cosine"] > 0.99 for r in result["embed"]), result["embed"]


def test_gpu_script_dry_run_on_cpu_measures_every_row(tmp_path):
  """The one-call GPU script, with tiny shapes on this CPU: every step succeeds and writes its figures."""
  pytest.importorskip("torch")  # it times the PyTorch stack beside ours
  pytest.importorskip("sentence_transformers")
  out = tmp_path / "gpu"
  (out / "train").mkdir(parents=True)  # not the script's: a step may remove only what it writes
  (out / "train" / "keep.txt").write_text("mine")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", QUICK="1", OUT=str(out), PYTHON=sys.executable)
  done = subprocess.run(["bash", "benchmarks/gpu_all.sh", "core"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (out / "train" / "keep.txt").read_text() == "mine"
  status = (out / "status.txt").read_text()
  assert "embed rc=0" in status and "train rc=0" in status, status
  embed = json.loads((out / "embed.json").read_text())
  assert [r["case"] for r in embed["embed"]] == ["512-token docs", "short+instruction"]
  assert all(r["min_cosine"] > 0.9999 and r["speedup"] > 0 for r in embed["embed"])
  train = json.loads((out / "train.json").read_text())
  assert [r["impl"] for r in train["train"]] == ["pytorch", "pytorch-ckpt", "jax", "jax-full", "jax-gc4"]
  assert all("error" not in r and r["tok_s"] > 0 and 0 < r["mfu"] < 1 for r in train["train"]), train["train"]
  report = (out / "report.md").read_text()
  assert "| short+instruction, `encode(pack=False)` |" in report and "| jax-full | 8 × 32 |" in report
  assert "Steps (rc 124: cut short by the time limit)" in report and "train rc=0" in report
  assert embed["complete"] is True and "did not finish" not in report


def test_report_marks_gpu_targets_against_the_same_run():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import report
  run = {"device": "NVIDIA H100 80GB HBM3", "backend": "gpu", "date": "2026-12-01", "shape": "gtr-large",
         "dtype": "bfloat16", "jax": "0.11.2", "matmul": {"jax_tflops": 800.0, "torch_tflops": 796.0},
         "embed": [{"case": c, "rows": 10, "ours_tok_s": 4e5, "st_tok_s": 1e5, "speedup": s, "min_cosine": 0.9995,
                    "ours_packed_tok_s": 4e5, "packed_speedup": s, "packed_max_abs_diff": 1e-6, "job_tok_s": 4e5,
                    "job_speedup": s, "job_max_abs_diff": 1e-6}
                   for c, s in (("short+instruction", 3.2), ("512-token docs", 3.9))],
         "train": [{"impl": "pytorch", "batch": 64, "length": 256, "status": "running", "started": "11:59:00"},
                   {"impl": "pytorch-ckpt", "batch": 256, "length": 256, "tok_s": 5e4, "mfu": 0.12, "step_s": 4.0,
                    "peak_gib": 45.1},
                   {"impl": "jax-full", "batch": 256, "length": 256, "tok_s": 2e5, "mfu": 0.45, "mfu_spec": 0.364,
                    "step_s": 1.0, "max_batch_at_least": 1024, "temp_gib": 94.81},
                   {"impl": "pytorch", "batch": 256, "length": 256, "error": "OutOfMemoryError: CUDA out of memory"},
                   {"impl": "jax-dotsnb-scan-nodrop", "batch": 256, "length": 256, "tok_s": 2e5, "mfu": 0.45,
                    "step_s": 1.0, "temp_gib": 90.0},
                   {"impl": "jax-gc4", "batch": 256, "length": 256, "status": "running", "started": "12:00:00"}]}
  text = report.section([run])
  assert "| short+instruction, `encode(pack=False)` | 10 | 400,000 | 100,000 | 3.20× | 0.99950 | **met** (≥ 3×) |" in text
  assert "| 512-token docs, `encode(pack=False)` | 10 | 400,000 | 100,000 | 3.90× | 0.99950 | not met (≥ 4×) |" in text
  assert ("| jax-full | 256 × 256 | 200,000 | 45.0% | 36.4% | 4.00× (pytorch-ckpt) | 1024 | XLA temp 94.8 GiB | "
          "MFU target **met** (≥ 40%) |" in text)
  assert "| pytorch-ckpt | 256 × 256 | 50,000 | 12.0% |  |  |  | peak 45.1 GiB |  |" in text
  # Dropout 0 is another recipe: no ratio to PyTorch and no verdict on the MFU target.
  assert ("| jax-dotsnb-scan-nodrop | 256 × 256 | 200,000 | 45.0% |  |  |  | XLA temp 90.0 GiB | "
          "dropout 0 (the other rows 0.1) |" in text)
  assert "OutOfMemoryError" in text
  assert "| jax-gc4 | 256 × 256 | – | – | – | – | – | – | cut short by the time limit (started 12:00:00) |" in text


def test_report_verdicts_need_matching_embeddings_and_the_target_shape():
  """A fast but wrong row never meets a target; MFU counts only at >= 256 triples x 256 tokens."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import report
  row = {"rows": 10, "ours_tok_s": 5e5, "st_tok_s": 1e5, "speedup": 5.0, "min_cosine": 0.31,
         "job_tok_s": 5e5, "job_speedup": 5.0, "job_max_abs_diff": 1e-6}
  bad_packed = {"case": "short+instruction", "rows": 10, "ours_tok_s": 1e5, "st_tok_s": 1e5, "speedup": 1.0,
                "min_cosine": 0.9999, "ours_packed_tok_s": 9e5, "packed_speedup": 9.0, "packed_max_abs_diff": 0.9,
                "job_tok_s": 1e5, "job_speedup": 1.0, "job_max_abs_diff": 1e-6}
  run = {"device": "H100", "backend": "gpu", "date": "d", "shape": "gtr-large", "dtype": "bfloat16", "jax": "x",
         "complete": False, "planned": {"embed": ["short+instruction", "512-token docs"], "train": ["jax-full@256"]},
         "embed": [dict(row, case="512-token docs"), bad_packed],
         "train": [{"impl": "jax", "batch": 256, "length": 32, "tok_s": 1e6, "mfu": 1.3}]}
  text = report.section([run])
  assert "not met (≥ 4×, cosine 0.3100 < 0.999)" in text
  assert "| short+instruction, `encode(pack=False)` | 10 | 100,000 | 100,000 | 1.00× | 0.99990 | not met (≥ 3×) |" in text
  assert "MFU target" not in text and "MFU > 100%: the peak measurement was disturbed" in text
  assert "**This run did not finish**" in text and "never measured: train jax-full@256." in text


def test_report_keeps_what_exists_when_a_step_left_no_file(tmp_path, capsys):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import report
  good = tmp_path / "embed.json"
  good.write_text(json.dumps({"device": "cpu", "backend": "cpu", "date": "d", "shape": "tiny", "dtype": "float32",
                              "jax": "x", "matmul": {"jax_tflops": 1.0, "torch_tflops": 1.0}}))
  assert report.main([str(good), str(tmp_path / "train.json")]) == 0
  out = capsys.readouterr().out
  assert "Matmul peak in the same run" in out and "not reported: " in out and "train.json" in out


def test_gpu_script_passes_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not on PATH (apt-get install shellcheck; .ci/run tries to)")
  res = subprocess.run(["shellcheck", str(ROOT / "benchmarks" / "gpu_all.sh")], capture_output=True, text=True)
  assert res.returncode == 0, res.stdout


def test_profile_classifies_ops_by_their_hlo_not_their_names():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import profile_ops
  moves = ('%bitcast_add_fusion.3 = f32[8,4]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fc.1\n')
  bodies = {"fc.1": '  %a = f32[8,4]{1,0} parameter(0), metadata={op_name="jit(f)/transpose(x)"}\n'
                    "  %b = f32[8,4]{1,0} add(%a, %a)\n",
            "fc.2": "  %a = f32[4,8]{1,0} parameter(0)\n  %t = f32[8,4]{0,1} transpose(%a), dimensions={1,0}\n"}
  lines = {"bitcast_add_fusion.3": moves,
           "fusion.9": "%fusion.9 = f32[8,4]{1,0} fusion(%p0), kind=kLoop, calls=%fc.2\n"}
  # A residual add whose name starts with "bitcast" is not a copy; a pure transpose fusion is.
  assert profile_ops.classify_in([(lines, bodies)], "bitcast_add_fusion.3") == "other fusions"
  assert profile_ops.classify_in([(lines, bodies)], "fusion.9") == "copy / transpose"
  other = ({"fusion.9": "%fusion.9 = f32[8,8]{1,0} dot(%a, %b)\n"}, {})
  assert profile_ops.classify_in([(lines, bodies), other], "fusion.9").startswith("ambiguous")


@pytest.mark.parametrize("message, expect", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB", [(16, True), (8, False)]),
    ("INVALID_ARGUMENT: a bug", [(16, True)])])
def test_train_variant_falls_back_to_the_smaller_batch_only_when_out_of_memory(monkeypatch, message, expect):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import run
  import train_bench

  def fake_jax_step(cfg, params, batch, length, **options):
    if batch == 16:
      raise RuntimeError(message)
    step = lambda: 1.0  # noqa: E731
    step.memory = {"temp_gib": 0.5}
    return step, float

  monkeypatch.setattr(train_bench, "_jax_step", fake_jax_step)
  assert train_bench.parse_variants("jax-full@16|8,jax", 4) == [("jax-full", [16, 8]), ("jax", [4])]
  rows = train_bench.train_section(run.SHAPES["tiny"], None, "", 4, 16, {}, quick=True, variants="jax-full@16|8")
  assert [(r["batch"], "error" in r) for r in rows] == expect
  assert all(r["impl"] == "jax-full" for r in rows)
  with pytest.raises(SystemExit, match="integer batches"):
    train_bench.parse_variants("jax@16|x", 4)
  import report
  oom = {"impl": "jax-full", "batch": 256, "length": 256, "error": "RESOURCE_EXHAUSTED: Out of memory",
         "temp_gib": 90.0, "argument_gib": 4.0}
  assert "XLA temp 90.0 GiB + arguments 4.0 GiB" in "\n".join(report.train_rows({"train": [oom], "backend": "gpu"}))


def test_encode_overlap_times_whole_and_chunked_preparation(tmp_path):
  out = tmp_path / "overlap.json"
  stdout = _run(["benchmarks/encode_overlap.py", "--short", "300", "--docs", "12", "--rates", "350000,0",
                 "--repeats", "1", "--first-chunk", "2000", "--out", str(out)], tmp_path)
  result = json.loads(out.read_text())
  assert result["first_chunk_chars"] == 2000 and len(result["cases"]) == 2
  for case in result["cases"].values():
    simulated = case["device 350,000 tok/s"]
    # The simulated device is busy for padded tokens / rate, and no call can beat that.
    assert simulated["device_s"] > 0 and min(simulated["whole_s"], simulated["chunked_s"]) >= simulated["device_s"]
    assert case["real tiny model"]["whole_s"] > 0 and case["host_only_s"] > 0
  assert "chunked" in stdout


def test_embed_job_overlap_times_jobs_against_a_simulated_device(tmp_path):
  out = tmp_path / "job_overlap.json"
  stdout = _run(["benchmarks/embed_job_overlap.py", "--short", "400", "--docs", "12", "--parts", "1,2",
                 "--rates", "350000", "--repeats", "1", "--out", str(out)], tmp_path)
  cases = json.loads(out.read_text())["cases"]
  assert len(cases) == 4 and "400 short instructed sentences, 2 parts" in cases
  for case in cases.values():
    simulated, host = case["device 350,000 tok/s"], case["host alone"]
    # The simulated device is busy for padded tokens / rate, and no job can beat that.
    assert 0 < simulated["device_s"] <= simulated["wall_s"] and host["wall_s"] > 0 and host["device_s"] == 0
    assert simulated["tokens"] == host["tokens"] > 0 and 0 < simulated["padding_efficiency"] <= 1
  assert "job / device" in stdout and not list((tmp_path / "scratch").iterdir())  # its files removed


def test_remat_memory_compiles_every_setting(tmp_path):
  out = tmp_path / "remat.json"
  stdout = _run(["benchmarks/remat_memory.py", "--shape", "tiny", "--batch", "4", "--length", "16", "--dtype",
                 "float32", "--settings", "plain,full-scan", "--out", str(out)], tmp_path)
  rows = json.loads(out.read_text())["rows"]
  assert set(rows) == {"plain", "full-scan"} and "XLA temp" in stdout
  assert all(r["compile_s"] > 0 and r["temp_gib"] > 0 and r["argument_gib"] > 0 for r in rows.values())


def test_train_padding_counts_and_times_every_setting(tmp_path):
  out = tmp_path / "padding.json"
  stdout = _run(["benchmarks/train_padding.py", "--steps", "20", "--query-len", "128", "--doc-len", "128",
                 "--pack-length", "128", "--batch", "16", "--time-steps", "2", "--time-shape", "tiny",
                 "--row-ladder", "32,64", "--out", str(out)], tmp_path)
  padded, bucketed, packed = json.loads(out.read_text())["rows"].values()
  assert padded["length_buckets"] == [] and padded["shapes"] == 1 and bucketed["length_buckets"]
  assert packed["pack_length"] == 128 and any("packed" in s for s in packed["commonest_shapes"])
  # The sample's texts are short: bucketing must pad less and count fewer FLOPs, with the same text,
  # and packing less again.
  assert bucketed["text_share"] > padded["text_share"] and bucketed["flops_saved"] > 1.5
  assert packed["text_share"] > bucketed["text_share"] and packed["flops_saved"] > bucketed["flops_saved"]
  assert all(r["seconds"] > 0 for r in (padded, bucketed, packed)) and "fewer" in stdout
  # Each step's best row length is one of the ladder's or the packed stream's own (never worse than it).
  ladder = packed["row_ladder"]
  assert set(ladder["row_lengths_chosen"]) <= {"32", "64", "128"} and sum(ladder["row_lengths_chosen"].values()) == 19
  assert ladder["flops_saved"] >= 1 and 0 < ladder["text_share_fixed"] <= 1 and 0 < ladder["text_share_best"] <= 1


def test_gpu_script_train_phase_dry_run_on_cpu(tmp_path):
  """`gpu_all.sh train` (the rows aimed at the MFU target, then a profile), tiny shapes on this CPU."""
  pytest.importorskip("torch")
  out = tmp_path / "gpu"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", QUICK="1", OUT=str(out), PYTHON=sys.executable)
  done = subprocess.run(["bash", "benchmarks/gpu_all.sh", "train"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  status = (out / "status.txt").read_text()
  assert "train rc=0" in status and "dropout rc=0" in status and "profile_train rc=0" in status, status
  dropout = json.loads((out / "dropout.json").read_text())
  assert [r["draws"] for r in dropout["rows"]] == ["blocks", "words", "flax", "none"]
  assert all(r["best_ms"] > 0 for r in dropout["rows"])
  train = json.loads((out / "train.json").read_text())
  assert [r["impl"] for r in train["train"]] == ["pytorch-ckpt", "jax-dotsnb-scan", "jax-dotsnb-scan-nodrop",
                                                 "jax-dotsnb-scan-fused-nodrop", "jax-dotsnb-scan-fused-noattndrop",
                                                 "jax-full-scan", "jax-full",
                                                 "jax-full-nolhs", "jax-gc4"]
  assert all("error" not in r and r["tok_s"] > 0 for r in train["train"]), train["train"]
  report = (out / "report_train.md").read_text()
  assert "| jax-full-nolhs | 8 × 32 |" in report
  for nodrop in ("jax-dotsnb-scan-nodrop", "jax-dotsnb-scan-fused-nodrop"):
    assert re.search(rf"\| {nodrop} \| 8 × 32 \| [\d,]+ \| [\d.]+% \|  \|  \|  \| XLA temp [\d.]+ GiB \| "
                     r"dropout 0 \(the other rows 0.1\) \|", report), report
  assert re.search(r"\| jax-dotsnb-scan-fused-noattndrop \| 8 × 32 \| [\d,]+ \| [\d.]+% \|  \|  \|  \| XLA temp [\d.]+ GiB \| "
                   r"attention dropout 0, the other dropouts 0.1 \(the other rows: all 0.1\) \|", report), report
  assert "remat=save_dots_no_batch scanned" in (out / "profile_train" / "summary.txt").read_text()


def test_gpu_script_packing_phase_dry_run_on_cpu(tmp_path):
  """`gpu_all.sh packing`: buckets against packed rows on the MEDI sample, tiny shapes on this CPU."""
  pytest.importorskip("torch")  # check_devices imports torch and sentence-transformers
  pytest.importorskip("sentence_transformers")
  out = tmp_path / "gpu"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", QUICK="1", OUT=str(out), PYTHON=sys.executable)
  done = subprocess.run(["bash", "benchmarks/gpu_all.sh", "packing"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
  assert "packing rc=0" in (out / "status.txt").read_text()
  rows = json.loads((out / "packing.json").read_text())["rows"]
  packed = rows["packed, rows of 128"]
  assert packed["seconds"] > 0 and packed["speedup"] > 0 and "seconds" not in rows["pad to query_len/doc_len"]


def test_encode_latency_times_both_padding_rules(tmp_path):
  out = tmp_path / "latency.json"
  stdout = _run(["benchmarks/encode_latency.py", "--shape", "tiny", "--repeats", "1", "--calls", "1,3",
                 "--batch-sizes", "32", "--out", str(out)], tmp_path)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["texts"], r["batch_size"]) for r in rows] == [(1, 32), (3, 32)]
  assert all(r["full rows ms"] > 0 and r["power of two ms"] > 0 for r in rows) and "to a power of two" in stdout
