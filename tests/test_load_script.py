"""benchmarks/load.py, briefly: 2 streaming clients for a few seconds against tiny servers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from test_server import build_tiny, save_tiny  # noqa: E402

from persona_compass.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"


@pytest.fixture(scope="module")
def load():
    spec = importlib.util.spec_from_file_location("persona_compass_load_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def tiny_server(tiny, cap_mode: str, **settings) -> BackgroundServer:
    model, tok, axis, cap = tiny
    config = ServerConfig(model_name="tiny", cap_mode=cap_mode, **settings)
    return BackgroundServer(create_app(model, tok, axis, cap, config))


def check_config(agg: dict) -> None:
    assert agg["completed"] > 0 and agg["errors"] == 0 and agg["lost"] == 0
    assert agg["sent"] == agg["completed"]
    assert agg["completion_tokens"] > 0
    med = agg["median"]
    assert med["tokens_per_s"] > 0
    assert 0 < med["ttft_p50_s"] <= med["ttft_p95_s"]


def test_load_against_a_running_server(load, tiny, tmp_path, capsys):
    out = tmp_path / "load.json"
    with tiny_server(tiny, "on", api_key="k") as server:
        argv = ["--url", server.url, "--api-key", "k", "--clients", "2", "--duration", "2"]
        code = load.main([*argv, "--max-tokens", "8", "--grace", "20", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["configs"]) == ["A: cap on"]
    check_config(result["configs"]["A: cap on"])
    assert result["settings"]["clients"] == 2
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "results written" in printed


def test_compare_interleaves_two_servers(load, tiny, tmp_path):
    out = tmp_path / "compare.json"
    with tiny_server(tiny, "on") as a, tiny_server(tiny, "off") as b:
        argv = ["--compare", "--url", a.url, "--url-b", b.url, "--clients", "2"]
        code = load.main(
            [*argv, "--duration", "1", "--rounds", "2", "--max-tokens", "8"]
            + [
                "--out",
                str(out),
            ]
        )
    assert code == 0
    result = json.loads(out.read_text())
    names = list(result["configs"])
    assert names == ["A: cap on", "B: cap off"]
    for name in names:
        check_config(result["configs"][name])
        assert [p["label"] for p in result["phases"][name]] == [f"{name} #1", f"{name} #2"]
    comparison = result["comparison"]
    assert comparison["tokens_per_s_ratio_of_medians"] > 0
    assert len(comparison["tokens_per_s_paired_ratios"]) == 2


def test_errors_are_counted_not_hidden(load, tiny, tmp_path):
    out = tmp_path / "denied.json"
    with tiny_server(tiny, "off", api_key="right") as server:
        # the warm-up fails with 401: the run stops with a clear error
        code = load.main(
            ["--url", server.url, "--api-key", "wrong", "--duration", "1", "--out", str(out)]
        )
    assert code == 2 and not out.exists()


@pytest.mark.parametrize(
    "url", ["http://example.com:8000", "http://10.0.0.5:8000", "ftp://127.0.0.1/", "http://"]
)
def test_refuses_urls_off_this_machine(load, url, capsys):
    assert load.main(["--url", url, "--duration", "1"]) == 2
    assert "error:" in capsys.readouterr().err


def test_loopback_forms_are_accepted(load):
    for url in ("http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:80"):
        assert load.check_loopback(url) == url.rstrip("/")


def test_spawn_starts_and_stops_its_own_server(load, tiny, tmp_path):
    model_dir, bundle = save_tiny(tiny, tmp_path)
    out = tmp_path / "spawn.json"
    argv = ["--spawn", "--model", str(model_dir), "--axis", str(bundle), "--dtype", "float32"]
    code = load.main(
        [*argv, "--clients", "2", "--duration", "2", "--max-tokens", "8", "--out", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    check_config(result["configs"]["cap on"])
    assert result["servers"]["cap on"]["cap_mode"] == "on"


def test_variants_are_checked_and_phases_run_forward_then_back(load):
    assert load.parse_variants("hf:on, vllm:on,vllm-plain") == ["hf:on", "vllm:on", "vllm-plain"]
    for bad in ("hf:sideways", "tgi:on", "", "hf:on,hf:on"):
        with pytest.raises(load.LoadError, match="--variants"):
            load.parse_variants(bad)
    assert load.phase_order(["a", "b", "c"], 3) == list("abccbaabc")
    # each variant's mean position is the same after an even number of rounds
    order = load.phase_order(["a", "b", "c"], 2)
    mean = {v: sum(i for i, x in enumerate(order) if x == v) / 2 for v in "abc"}
    assert len(set(mean.values())) == 1


def test_variants_need_spawn(load, capsys):
    with pytest.raises(SystemExit):
        load.parse_args(["--url", "http://127.0.0.1:1", "--variants", "hf:on"])
    assert "--variants needs --spawn" in capsys.readouterr().err
