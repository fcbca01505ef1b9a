"""OpenAI-compatible HTTP server and web page for persona-compass.

``create_app(model, tokenizer, axis, capping_config, ServerConfig(...))`` builds the FastAPI
app around loaded objects; ``create_app_from_specs(axis_spec, model_spec, config)`` loads them
in the app's lifespan (``persona-compass serve``). Needs the ``server`` extra (fastapi,
uvicorn).
"""

from __future__ import annotations

from .app import BackgroundServer, ServerConfig, create_app, create_app_from_specs

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "create_app_from_specs"]
