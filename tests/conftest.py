"""Shared fixtures: everything runs offline on CPU with a tiny Llama built in-process."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Stages probe the matmul peak for 3 s (throughput.STAGE_PROBE_SECONDS); the tests' MFU is not a measurement.
os.environ.setdefault("RLHF_PROBE_SECONDS", "0.05")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = "embedded:tiny-random-llama"


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from pipeline.models.embedded import resolve_model_path

    return resolve_model_path(TINY)


@pytest.fixture
def tiny_model_cfg():
    """The float32 path, pinned (``compute_dtype: auto`` is bf16 on CPUs with AMX/AVX512-BF16)."""
    from pipeline.config import ModelConfig

    return ModelConfig(name=TINY, load_in_4bit=True, compute_dtype="float32")


@pytest.fixture(params=["float32", "bfloat16"])
def tiny_model_cfg_both(request):
    """The same model in each compute precision, for invariants that must hold in both."""
    from pipeline.config import ModelConfig

    return ModelConfig(name=TINY, load_in_4bit=True, compute_dtype=request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
