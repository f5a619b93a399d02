"""Test setup: 8 fake CPU devices so every sharding test runs in CI (must precede `import jax`)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

TESTS_DIR = pathlib.Path(__file__).parent
FIXTURES = TESTS_DIR / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES
