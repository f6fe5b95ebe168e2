"""OpenAI chat messages -> one interleaved Flamingo prompt.

Flamingo has no chat template: it continues an interleaved document in which ``<image>`` marks
each image and ``<|endofchunk|>`` ends the text that belongs to an image. Messages map onto that
document in order, with nothing added but these markers:

* ``system`` / ``developer``: their text, followed by a newline, at the place they occur
  (usually the start);
* ``user``: each content part in order: text verbatim, an ``image_url`` part as ``<image>``;
* ``assistant``: its text followed by ``<|endofchunk|>`` and the model's demonstration separator
  (``FlamingoConfig.demo_separator``: ``""`` for OpenFlamingo's checkpoints, which were trained
  on documents with nothing between ``<|endofchunk|>`` and the next ``<image>``; ``"\n"`` for the
  built-in model, whose few-shot training prompts put a newline there): an answer closes one
  demonstration. A *last* assistant message is not closed: it is the start of the answer, which
  the model continues (a prefill).

So few-shot prompting is alternating turns, e.g. (OpenFlamingo's captioning prompt, separator "")::

    user:      [image A, "Output:"]          ->  <image>Output:
    assistant: "two cats on a sofa."         ->  two cats on a sofa.<|endofchunk|>
    user:      [image B, "Output:"]          ->  <image>Output:
                                                 (the model writes B's caption)

(with the built-in model's ``"\n"``: ``two cats on a sofa.<|endofchunk|>\n<image>Output:``).

Text is inserted verbatim (add spaces where the model expects them); the markers themselves are
not allowed inside chat text (use ``image_url`` parts), only in ``/v1/completions`` prompts.
"""

from __future__ import annotations

from ..processing import EOC_TOKEN, MEDIA_TOKEN
from .errors import bad_request
from .schemas import ChatMessage, ImagePart, TextPart


def image_ref(part: ImagePart) -> str:
    return part.image_url if isinstance(part.image_url, str) else part.image_url.url


def _check_text(text: str, param: str) -> str:
    for marker in (MEDIA_TOKEN, EOC_TOKEN):
        if marker in text:
            raise bad_request(
                f"chat message text must not contain {marker!r}: send images as image_url parts; an assistant "
                "message ends a demonstration (use /v1/completions for a raw prompt with markers)",
                param=param, code="invalid_content",
            )
    return text


def chat_to_prompt(messages: list[ChatMessage], *, separator: str = "",
                   param_prefix: str = "messages") -> tuple[str, list[tuple[str, str]]]:
    """Returns the prompt text (with ``<image>`` markers) and the image references in order, each
    with the request parameter it came from (for error messages). ``separator``: the served model's
    ``demo_separator``, written after each closing ``<|endofchunk|>``."""
    if not messages:
        raise bad_request("messages must not be empty", param=param_prefix)
    pieces: list[str] = []
    images: list[tuple[str, str]] = []
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        where = f"{param_prefix}[{i}]"
        parts = msg.content
        if parts is None:
            parts = []
        elif isinstance(parts, str):
            parts = [TextPart(type="text", text=parts)]
        if msg.role in ("system", "developer"):
            text = ""
            for j, part in enumerate(parts):
                if not isinstance(part, TextPart):
                    raise bad_request(f"{msg.role} messages may contain text only", param=f"{where}.content[{j}]",
                                      code="invalid_content")
                text += _check_text(part.text, f"{where}.content[{j}]")
            if text:
                pieces.append(text + "\n")
        elif msg.role == "user":
            for j, part in enumerate(parts):
                if isinstance(part, TextPart):
                    pieces.append(_check_text(part.text, f"{where}.content[{j}]"))
                else:
                    pieces.append(MEDIA_TOKEN)
                    images.append((image_ref(part), f"{where}.content[{j}].image_url"))
        else:  # assistant
            text = ""
            for j, part in enumerate(parts):
                if not isinstance(part, TextPart):
                    raise bad_request("assistant messages may contain text only", param=f"{where}.content[{j}]",
                                      code="invalid_content")
                text += _check_text(part.text, f"{where}.content[{j}]")
            pieces.append(text if i == last else text + EOC_TOKEN + separator)
    prompt = "".join(pieces)
    if not prompt:
        raise bad_request("the messages hold no text and no images", param=param_prefix, code="empty_prompt")
    return prompt, images
