"""River-LLM behind the OpenAI HTTP API: `create_app(lm, settings)` for embedding, `serve(lm, settings)`
to run it with uvicorn (the `riverllm serve` command)."""

from riverllm.server.app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
