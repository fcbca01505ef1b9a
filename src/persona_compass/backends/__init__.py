"""Backends named by a spec, in one place: the spec grammar (:mod:`.spec`) and the client for
OpenAI-compatible servers (:mod:`.openai_client`).

Judges (extraction and outcome), simulated users and the remote rollout generator all read
their spec with :func:`parse_backend_spec` and talk to a server through
:class:`OpenAIClient`.
"""

from .openai_client import ClientOptions, OpenAIClient, OpenAIError
from .spec import (
    KINDS,
    SELF,
    BackendSpec,
    BackendSpecError,
    accepted_forms,
    names_self,
    parse_backend_spec,
)

__all__ = [
    "KINDS",
    "SELF",
    "BackendSpec",
    "BackendSpecError",
    "ClientOptions",
    "OpenAIClient",
    "OpenAIError",
    "accepted_forms",
    "names_self",
    "parse_backend_spec",
]
