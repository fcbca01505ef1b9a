"""Rollout generators that run on a remote OpenAI-compatible server.

A fast serving engine (vLLM, SGLang, llama.cpp server) can write the rollouts while
persona-compass records activations locally afterwards, in one forward pass over each finished
conversation. :class:`OpenAIGenerator` sends each conversation to the server with the
extraction's sampling settings and returns the reply texts in order.

Spec form (command line, configs): ``openai:URL[#model]``, read by
:func:`~persona_compass.backends.parse_backend_spec` in :meth:`OpenAIGenerator.from_spec`.

Example::

    gen = OpenAIGenerator("http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B", concurrency=32)
    texts = gen.generate(conversations, SamplingConfig(max_new_tokens=512))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..backends.openai_client import OpenAIClient
from ..backends.spec import parse_backend_spec
from ..errors import PersonaCompassError
from ..generation import SamplingConfig

logger = logging.getLogger(__name__)

GENERATOR_KINDS = ("openai",)
"""The backend kinds a generator spec takes
(:func:`~persona_compass.backends.parse_backend_spec`)."""


class GeneratorError(PersonaCompassError):
    """A generator spec is malformed."""


class OpenAIGenerator:
    """Generate assistant replies on an OpenAI-compatible server.

    Sends ``temperature``, ``top_p``, ``max_tokens = sampling.max_new_tokens`` and ``seed``
    (when set). ``repetition_penalty`` is not part of the OpenAI API and is not sent; servers
    that accept it (vLLM) can get it, and other engine settings such as
    ``{"chat_template_kwargs": {"enable_thinking": False}}``, through ``extra_body``.

    Args:
        base_url: the API root, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: the served model name; ``None`` lets a single-model server use its own.
        extra_body: extra request fields sent with every request.
        **client_kwargs: passed to :class:`OpenAIClient` (``concurrency``, ``retries``,
            ``requests_per_second``, ``timeout``, ``api_key_env``, ...).

    Example:
        >>> gen = OpenAIGenerator("http://127.0.0.1:8000/v1", None)  # doctest: +SKIP
        >>> gen.generate([[{"role": "user", "content": "Hi"}]], SamplingConfig())  # doctest: +SKIP
        ['Hello! How can I help you today?']
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        *,
        extra_body: Mapping[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> None:
        self.client = OpenAIClient(base_url, model, **client_kwargs)
        self.extra_body = dict(extra_body or {})
        clash = {"messages", "model"}.intersection(self.extra_body)
        if clash:
            raise GeneratorError(
                f"extra_body sets {sorted(clash)}; pass the model as model= and the "
                "conversations to generate()"
            )

    @classmethod
    def from_spec(
        cls, spec: str, *, default_model: str | None = None, **kwargs: Any
    ) -> OpenAIGenerator:
        """Build a generator from ``"openai:URL[#model]"``.

        Args:
            spec: e.g. ``"openai:http://127.0.0.1:8000/v1#Qwen/Qwen3-8B"``.
            default_model: the model to request when the spec names none (``None``: send no
                model, so a single-model server uses its own).
            **kwargs: passed to the constructor (``extra_body``, client options).

        Raises:
            GeneratorError: the spec is not ``openai:URL[#model]`` with an http(s) URL.
        """
        parsed = parse_backend_spec(
            spec,
            param="generator",
            allowed=GENERATOR_KINDS,
            default_model=default_model,
            error=GeneratorError,
        )
        return cls(parsed.base_url, parsed.model or None, **kwargs)

    @property
    def name(self) -> str:
        """The spec that recreates this generator."""
        model = f"#{self.client.model}" if self.client.model else ""
        return f"openai:{self.client.base_url}{model}"

    def request_params(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The request fields for these sampling settings (``extra_body`` included)."""
        params: dict[str, Any] = {
            **self.extra_body,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        return params

    def generate(
        self, conversations: Sequence[list[dict[str, Any]]], sampling: SamplingConfig
    ) -> list[str]:
        """The next assistant turn for each conversation, in input order (stripped text).

        Raises:
            OpenAIError: the server refused a request or stayed unreachable after retries.
        """
        if sampling.repetition_penalty != 1.0 and "repetition_penalty" not in self.extra_body:
            logger.debug(
                "repetition_penalty=%s is not sent to %s (not an OpenAI API field); pass "
                "extra_body={'repetition_penalty': ...} if the server supports it",
                sampling.repetition_penalty,
                self.client.base_url,
            )
        replies = self.client.chat_many(conversations, **self.request_params(sampling))
        return [reply.strip() for reply in replies]

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
