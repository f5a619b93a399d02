"""instructor_jax: INSTRUCTOR text embeddings (GTR/T5 encoder) in JAX/Flax."""

from instructor_jax.config import PRESETS, InstructorConfig, T5Config, preset

__all__ = ["InstructorConfig", "T5Config", "PRESETS", "preset", "Instructor"]


def __getattr__(name):
  # Lazy, so `import instructor_jax.config` stays light (no tokenizer/transformers import).
  if name == "Instructor":
    from instructor_jax.instructor import Instructor
    return Instructor
  raise AttributeError(f"module 'instructor_jax' has no attribute {name!r}")
