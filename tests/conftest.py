"""Shared fixtures: deterministic seeds, tiny models, the real default model when installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_pair, make_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_home(tmp_path_factory, monkeypatch):
    """Every test is deterministic and uses a private persona-compass home."""
    torch.manual_seed(0)
    home = tmp_path_factory.mktemp("pc-home")
    monkeypatch.setenv("PERSONA_COMPASS_HOME", str(home))


@pytest.fixture(params=["llama", "qwen2", "gemma2"])
def tiny_pair(request):
    """(model, tokenizer) for each tiny architecture and its chat style."""
    return make_pair(request.param)


@pytest.fixture
def llama_pair():
    return make_pair("llama")


@pytest.fixture
def qwen_pair():
    return make_pair("qwen2")


@pytest.fixture
def gemma_pair():
    return make_pair("gemma2")


@pytest.fixture(params=["chatml", "llama3", "gemma"])
def tiny_tokenizer(request):
    return make_tokenizer(request.param)


@pytest.fixture(scope="session")
def real_pair(tmp_path_factory):
    """The real default model (smollm2-135m) in bfloat16, or skip when it is not installed."""
    import os

    from persona_compass.errors import ModelNotInstalledError

    os.environ.setdefault("PERSONA_COMPASS_HOME", str(tmp_path_factory.mktemp("real-home")))
    try:
        from persona_compass.models import load_model

        return load_model("smollm2-135m", dtype=torch.bfloat16)
    except ModelNotInstalledError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"smollm2-135m not installed: {exc}")
