"""Hooks on vLLM's model runners, shared by the compass op and the extraction's capture.

Each feature keeps a runtime object on the model runner under its own attribute. After vLLM
loads the model, ``install(runner)`` may put one there; around every forward, a runtime that
is there gets ``before_forward(runner, n_padded_tokens)`` and ``after_forward()``. Runners
without a runtime run vLLM's code untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_patched: set[tuple[type, str, str]] = set()  # (runner class, method, runtime attribute)


def patch_runners(runtime_attr: str, install: Callable[[Any], None]) -> None:
    """Wrap vLLM's model runner classes for the runtime at ``runner.<runtime_attr>``
    (idempotent: a second call for the same attribute changes nothing)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap_load_model(GPUModelRunner, runtime_attr, install)
    _wrap_model_forward(GPUModelRunner, runtime_attr)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a GPU build without the CPU runner
        return
    # the CPU runner loads the model its own way; its forward is the GPU runner's
    _wrap_load_model(CPUModelRunner, runtime_attr, install)


def _claim(cls: type, method: str, runtime_attr: str) -> bool:
    key = (cls, method, runtime_attr)
    if key in _patched:
        return False
    _patched.add(key)
    return True


def _wrap_load_model(cls: Any, runtime_attr: str, install: Callable[[Any], None]) -> None:
    if not _claim(cls, "load_model", runtime_attr):
        return
    original = cls.load_model

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        install(self)
        return result

    cls.load_model = load_model


def _wrap_model_forward(cls: Any, runtime_attr: str) -> None:
    if not _claim(cls, "_model_forward", runtime_attr):
        return
    original = cls._model_forward

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, runtime_attr, None)
        if runtime is None:
            return original(self, *args, **kwargs)
        positions = kwargs.get("positions")
        n_padded = int(positions.shape[0]) if positions is not None else runtime.max_tokens
        runtime.before_forward(self, n_padded)
        out = original(self, *args, **kwargs)
        runtime.after_forward()
        return out

    cls._model_forward = _model_forward
