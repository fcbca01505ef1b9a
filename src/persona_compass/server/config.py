"""The server's settings (:class:`ServerConfig`), checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from ..alerts import AlertRules
from ..compass import CAP_MODES
from ..errors import PersonaCompassError


class ServerConfigError(PersonaCompassError):
    """A server setting out of range."""


# Names a server on this machine answers to by default.
LOCAL_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    """The server's settings; requests may override cap mode, capping, steering and rules.

    Attributes:
        model_name: the id ``/v1/models`` lists and responses carry (``""``: the model spec).
        cap_mode: the default cap mode: ``off``, ``on`` or ``adaptive``.
        api_key: when set, every request but ``/health`` and the web page needs
            ``Authorization: Bearer <api_key>``.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for (400 above).
        default_max_tokens: ``max_tokens`` when a request gives none (at most the limit).
        queue_size: requests that may wait for the generation thread (429 beyond).
        max_concurrency: answers generated together (the ``vllm`` engine's batch; the
            ``hf`` engine always generates one at a time).
        max_body_bytes: the largest request body (413 beyond).
        rules: the default alert rules (a request's ``rules`` fields override them).
        allowed_hosts: host names the ``Host`` header may carry (any port), so that a web
            page on another name (DNS rebinding) cannot reach the server; ``("*",)`` allows
            any (a server bound to every interface). ``serve`` adds the bound address.
    """

    model_name: str
    cap_mode: str = "off"
    api_key: str | None = None
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    queue_size: int = 16
    max_concurrency: int = 8
    max_body_bytes: int = 1_000_000
    rules: AlertRules | None = None
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS

    def __post_init__(self) -> None:
        if self.cap_mode not in CAP_MODES:
            raise ServerConfigError(
                f"cap mode {self.cap_mode!r} is not one of {', '.join(CAP_MODES)}"
            )
        for name in (
            "max_tokens_limit",
            "default_max_tokens",
            "queue_size",
            "max_concurrency",
            "max_body_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServerConfigError(f"{name}={value!r} must be a whole number >= 1")
        self.allowed_hosts = tuple(h.strip().lower().strip("[]") for h in self.allowed_hosts)
        if not self.allowed_hosts or not all(self.allowed_hosts):
            raise ServerConfigError("allowed_hosts needs at least one host name ('*': any)")
        if self.api_key is not None and not self.api_key.strip():
            raise ServerConfigError("api_key is empty; pass a real key or none")
