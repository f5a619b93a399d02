"""`python -m instructor_jax.convert SRC DST`: any supported checkpoint -> sentence-transformers dir or orbax."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Sequence

import numpy as np

from instructor_jax.config import DTYPES, canonical_dtype

DESCRIPTION = """\
Convert an INSTRUCTOR / GTR (T5 encoder) checkpoint between formats.

SOURCES (SRC), detected automatically:
  Hugging Face Hub id         hkunlp/instructor-large, sentence-transformers/gtr-t5-xl (uses the
                              huggingface_hub cache; set HF_HUB_OFFLINE=1 to use only the cache;
                              --revision picks a branch/tag/commit)
  sentence-transformers / HF  a local directory with config.json and model.safetensors, sharded
  directory                   safetensors (model.safetensors.index.json) or pytorch_model.bin
                              (read without torch; only tensors are unpickled); with or without 2_Dense;
                              T5 v1.0 (ReLU) or v1.1 (gated-GELU). A T5ForConditionalGeneration
                              checkpoint works too: its decoder is dropped.
  t5x checkpoint              a directory with a msgpack 'checkpoint' file + zarr arrays (how GTR
                              was released), local or gs://BUCKET/... (tensorstore, default GCS
                              credentials); a t5x model dir with checkpoint_<step>/ subdirs picks
                              the latest or --step. The architecture is inferred from the shapes;
                              --max-distance sets the relative-attention max distance (default 128).
  orbax checkpoint            a training workdir (WORKDIR/checkpoints/<step>/), its checkpoints/
                              directory, or one <step>/ directory; latest step unless --step.

DESTINATIONS (DST), chosen with --to:
  st (default)                a sentence-transformers directory: modules.json, config.json
                              (T5EncoderModel), model.safetensors (sharded with an index above
                              --max-shard-size), 1_Pooling (include_prompt: false), 2_Dense,
                              3_Normalize, tokenizer files (transformers 4.x and 5.x), prompts in
                              config_sentence_transformers.json (--prompt), README.md.
                              Loads in SentenceTransformer(DST) and transformers.T5EncoderModel;
                              --instructor-embedding-compat: the InstructorEmbedding 1.0.1 layout.
  orbax                       a params-only orbax checkpoint DST/<step 0>/{params,model_config},
                              the training layout: restore with
                              instructor_jax.orbax_io.restore_params(DST, shardings=...).
"""

EXAMPLES = """\
examples:
  python -m instructor_jax.convert hkunlp/instructor-large ./instructor-large-st
  python -m instructor_jax.convert gs://t5-data/pretrained_models/t5x/retrieval/gtr_base/checkpoint_1100000 \\
      ./gtr-base-orbax --to orbax
  python -m instructor_jax.convert ./gtr-t5-xxl ./gtr-xxl-bf16 --dtype bfloat16 --max-shard-size 5GB
  python -m instructor_jax.convert ./workdir ./my-instructor --step 20000 \\
      --prompt query="Represent the question for retrieving supporting documents: "
  python -m instructor_jax.convert ./t5x_tiny/checkpoint_1000 ./tiny-st --max-distance 128
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
  """'2GB', '500MiB' or a byte count -> bytes."""
  m = _SIZE.match(text)
  if not m:
    raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected e.g. 2GB, 500MB or a byte count.")
  return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def parse_prompt(text: str) -> tuple[str, str]:
  name, sep, prompt = text.partition("=")
  if not sep or not name.strip():
    raise argparse.ArgumentTypeError(f"invalid --prompt {text!r}; expected NAME=TEXT, e.g. "
                                     "query='Represent the question for retrieving supporting documents: '.")
  return name.strip(), prompt


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m instructor_jax.convert", description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", metavar="SRC", help="Hub id, HF/sentence-transformers dir, t5x checkpoint (local or gs://) "
                 "or orbax workdir / checkpoints dir.")
  p.add_argument("dst", metavar="DST", help="output directory.")
  p.add_argument("--to", choices=("st", "orbax"), default="st", help="destination format (default: st).")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                 help="weight dtype of an st export (default float32; orbax params are always float32).")
  p.add_argument("--step", type=int, default=None, help="step of an orbax workdir or t5x model dir (default: latest).")
  p.add_argument("--max-distance", type=int, default=None,
                 help="t5x sources only: relative-attention max distance (not stored by t5x; default 128).")
  p.add_argument("--max-seq-length", type=int, default=None, help="override max_seq_length of the export.")
  p.add_argument("--prompt", type=parse_prompt, action="append", default=[], metavar="NAME=TEXT",
                 help="named prompt for config_sentence_transformers.json (repeatable; use with encode(prompt_name=NAME)).")
  p.add_argument("--max-shard-size", type=parse_size, default="2GB",
                 help="st export: shard model.safetensors above this size (default 2GB; e.g. 5GB, 500MB).")
  p.add_argument("--instructor-embedding-compat", action="store_true",
                 help="st export loadable by InstructorEmbedding 1.0.1 (sentence-transformers 2.2.2): no "
                 "include_prompt key in 1_Pooling (sentence-transformers >= 2.4 users then call "
                 "model.set_pooling_include_prompt(False)) and 2_Dense/pytorch_model.bin (needs torch).")
  p.add_argument("--revision", default=None, help="Hub sources only: branch, tag or commit.")
  p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST (--to orbax: replace "
                 "DST/0).")
  return p


def _describe(config) -> str:
  e = config.encoder
  return (f"T5 {'v1.0' if e.feed_forward == 'relu' else 'v1.1'}: {e.num_layers} layers, d_model {e.d_model}, "
          f"{e.num_heads} heads x {e.d_kv}, d_ff {e.d_ff}, {e.relative_attention_num_buckets} buckets / max distance "
          f"{e.relative_attention_max_distance}, vocab {e.vocab_size}, projection {config.projection_dim}")


def convert(args: argparse.Namespace) -> list[str]:
  """Runs one conversion; returns the paths written."""
  args.dtype = canonical_dtype(args.dtype)  # "bf16" -> "bfloat16", as embed and evaluate read it
  from instructor_jax.sources import load_source
  if args.to == "orbax" and args.dtype != "float32":
    raise ValueError("--to orbax stores float32 parameters (training precision); drop --dtype.")
  if args.to == "orbax" and (args.prompt or args.instructor_embedding_compat):
    raise ValueError("--prompt and --instructor-embedding-compat shape a sentence-transformers export; an orbax "
                     "checkpoint holds parameters and the model config only. Drop them, or convert with --to st.")
  if "://" not in args.dst:  # a quoted ~ reaches us unexpanded; the checks below must see the real place
    args.dst = os.path.expanduser(args.dst)
  if os.path.exists(args.dst) and not os.path.isdir(args.dst):
    raise ValueError(f"DST {args.dst} is a file; expected a directory to write into (new, or empty).")
  if args.to == "st" and os.path.isdir(args.dst) and os.listdir(args.dst) and not args.overwrite:
    raise ValueError(f"{args.dst} exists and is not empty; pass --overwrite or choose another DST.")
  if args.to == "orbax" and os.path.isdir(args.dst):
    # Orbax's own steps (digit directories) are handled by save_params; anything else means DST is
    # some other directory (a training workdir, an ST export), whose readers would not see step 0.
    foreign = sorted(n for n in os.listdir(args.dst) if not n.isdigit())
    if foreign:
      raise ValueError(f"{args.dst} holds {foreign[:5]}, so it is not an orbax checkpoint directory; --to orbax "
                       "writes DST/0 into a new or empty directory (or one holding only orbax steps).")
  for flag, value, least in (("--max-seq-length", args.max_seq_length, 2), ("--max-distance", args.max_distance, 1)):
    if value is not None and value < least:
      raise ValueError(f"{flag} {value}: expected >= {least}.")
  start = time.time()
  loaded = load_source(args.src, args.revision, step=args.step, max_distance=args.max_distance)
  config = loaded.config
  if args.max_seq_length is not None:
    config = config.replace(max_seq_length=int(args.max_seq_length))
  n_params = sum(int(np.prod(np.shape(x))) for x in _leaves(loaded.params))
  print(f"loaded {loaded.description}: {_describe(config)}; {n_params / 1e6:.2f}M parameters "
        f"({time.time() - start:.1f}s)", file=sys.stderr)
  if args.to == "orbax":
    from instructor_jax import orbax_io
    _check_orbax_can_hold(loaded)
    orbax_io.save_params(args.dst, loaded.params, config, step=0, overwrite=args.overwrite)
    return [os.path.join(args.dst, "0")]
  from instructor_jax.export import save_sentence_transformers
  from instructor_jax.sources import load_tokenizer, source_prompts
  carried, default_prompt_name = source_prompts(loaded)
  prompts = {**carried, **dict(args.prompt)}
  tokenizer = load_tokenizer(loaded, config.max_seq_length)
  files = save_sentence_transformers(args.dst, config, loaded.params, tokenizer.hf_tokenizer, dtype=args.dtype,
                                     prompts=prompts, source=loaded.description,
                                     max_shard_bytes=args.max_shard_size,
                                     instructor_embedding_compat=args.instructor_embedding_compat,
                                     default_prompt_name=default_prompt_name)
  return [os.path.join(args.dst, f) for f in files]


def _check_orbax_can_hold(loaded) -> None:
  """An orbax checkpoint has no tokenizer (its readers and the trainer use the bundled T5 vocabulary)
  and no prompts: a source whose tokenizer differs is refused, since the checkpoint would embed with
  other token ids; a source's prompts are dropped with a warning."""
  from instructor_jax.sources import load_tokenizer, source_prompts
  from instructor_jax.tokenization import Tokenizer
  if loaded.tokenizer_dir is not None:
    own = load_tokenizer(loaded, loaded.config.max_seq_length).hf_tokenizer.get_vocab()
    bundled = Tokenizer.from_pretrained(None).hf_tokenizer.get_vocab()
    if own != bundled:
      extra = sorted(set(own) - set(bundled), key=own.get)[:5]
      raise ValueError(f"{loaded.tokenizer_dir}: the tokenizer differs from the standard T5 vocabulary that orbax "
                       f"checkpoints are read with ({len(own)} pieces against {len(bundled)}"
                       f"{'; e.g. ' + ', '.join(map(repr, extra)) if extra else ''}), so the checkpoint would embed "
                       "other token ids. Convert with --to st, which keeps the tokenizer.")
  prompts, default = source_prompts(loaded)
  if prompts or default:
    print(f"warning: {loaded.description}'s prompts ({', '.join(prompts)}{'; default ' + default if default else ''}) "
          "are not kept: an orbax checkpoint holds no prompts (pass --prompt when exporting it with --to st).",
          file=sys.stderr)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from instructor_jax.hf_format import CheckpointError
  try:
    written = convert(args)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.to == "st":
    count = sum(len(files) for _, _, files in os.walk(args.dst))
    print(f"wrote {args.dst} (sentence-transformers, {count} files); encoder weights: "
          f"{', '.join(os.path.basename(w) for w in written)}", file=sys.stderr)
  else:
    print(f"wrote {written[0]} (orbax, step 0)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
