"""Request bodies (validated with pydantic, strictly: ``"5"`` is not a number, ``"yes"`` not a bool).

Unknown fields are accepted and ignored, as OpenAI clients send fields this server has no use for
(``user``, ``metadata``, ...); the fields that would change the answer and are not supported
(``logprobs``, ``tools``, non-zero penalties, ...) are refused by the endpoints with a 400.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingParams(_Body):
    """What OpenAI's chat and completions endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(SamplingParams):
    """``prompt``: text with ``<image>`` markers (or a list of such prompts); ``images``: the
    images in marker order (a list per prompt when ``prompt`` is a list): data URLs, files under
    ``--image-dir``, or http(s) URLs when the server fetches them."""

    prompt: str | list[str]
    images: list[str] | list[list[str]] | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ScoreRequest(_Body):
    """Rank ``candidates`` (continuations appended verbatim to the prompt) by log-likelihood.
    The context is ``prompt`` + ``images`` (as in /v1/completions) or ``messages`` (as in chat)."""

    model: str | None = None
    prompt: str | None = None
    images: list[str] | None = None
    messages: list[ChatMessage] | None = None
    candidates: list[str] = Field(min_length=1)
    normalize: bool = False
