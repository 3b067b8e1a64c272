"""The OpenAI request bodies the server accepts, and its OpenAI-style errors.

Requests are pydantic models in strict mode: a field of the wrong type ("max_tokens": "8") is
refused with a 400, not coerced. Fields that OpenAI defines but River-LLM cannot honour (n > 1,
logprobs, penalties, tools ...) are accepted only at their neutral value, so a client never gets
silently different behaviour; `refusals()` names the first one that is set. Fields this server
does not know are ignored, as OpenAI-compatible servers do (clients send newer fields freely).

River-LLM's own options travel as extra body fields: `method` ("dense", "w4", "river",
"river:0.9", ...), `tau` (the exit threshold), plus `top_k` and `ignore_eos` as in vLLM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string: a held-back tail is never longer


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body {"error": {...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default: sampling, not greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # River-LLM's extras (ignored by other servers, so clients can always send them).
    method: str | None = None
    tau: float | None = None
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False

    def new_tokens_limit(self) -> int | None:
        return self.max_tokens

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise APIError(400, f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters "
                                f"each (got {len(stops)}, the longest {max(map(len, stops))})", param="stop")
        return [s for s in stops if s]

    def refusals(self) -> APIError | None:
        """The first standard field set to something this server does not do."""
        if self.n != 1:
            return APIError(400, f"n must be 1: this server returns one choice per request (got n={self.n}); "
                                 "send several requests instead", param="n")
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return APIError(400, f"{name} is not supported: leave it at 0", param=name)
        if self.logit_bias:
            return APIError(400, "logit_bias is not supported: leave it out", param="logit_bias")
        return None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def new_tokens_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"prompt must be one string (got a list of {len(self.prompt)}): "
                                "send one request per prompt", param="prompt")
        return self.prompt[0]

    def refusals(self) -> APIError | None:
        if self.echo:
            return APIError(400, "echo is not supported: leave it false", param="echo")
        if self.logprobs is not None:
            return APIError(400, "logprobs are not supported: leave them out", param="logprobs")
        if self.best_of not in (None, 1):
            return APIError(400, "best_of must be 1", param="best_of")
        if self.suffix:
            return APIError(400, "suffix (insertion) is not supported: leave it out", param="suffix")
        return super().refusals()


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]  # images, audio ... are refused by validation
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list | None = None

    @field_validator("content", mode="before")
    @classmethod
    def text_parts_only(cls, content):
        if isinstance(content, list):
            kinds = {part.get("type") for part in content if isinstance(part, dict)} - {"text"}
            if kinds:
                raise ValueError(f"only text content parts are supported, not {sorted(map(str, kinds))}")
        return content

    def as_template_message(self) -> dict:
        """The {"role", "content"} dict a chat template expects ("developer" is OpenAI's new "system")."""
        content = self.content or ""
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def new_tokens_limit(self) -> int | None:
        # None: up to the end of the context window, as OpenAI does for chat.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        if not self.messages:
            raise APIError(400, "messages is empty: send at least one message", param="messages")
        return [message.as_template_message() for message in self.messages]

    def refusals(self) -> APIError | None:
        if self.logprobs or self.top_logprobs:
            return APIError(400, "logprobs are not supported: leave them out", param="logprobs")
        if self.tools or any(message.tool_calls for message in self.messages):
            return APIError(400, "tools / function calling are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            return APIError(400, "response_format must be {'type': 'text'}: structured output is not supported",
                            param="response_format")
        return super().refusals()
