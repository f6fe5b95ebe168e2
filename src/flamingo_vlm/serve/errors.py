"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, code={self.code!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_BRANCHES = {"str", "list", "int", "bool", "float"}
_PART_TAGS = {"text", "image_url"}  # the content-part union's tags


def _clean(loc) -> tuple:
    """pydantic names union branches in the location ('str', 'list[...]', and a tagged union's tag
    after the list index): drop them, so the location is the request's own path."""
    out = []
    for i, p in enumerate(loc):
        if isinstance(p, str) and ("[" in p or p in _BRANCHES):
            continue
        if p in _PART_TAGS and out and isinstance(out[-1], int) and i + 1 < len(loc):
            continue
        out.append(p)
    return tuple(out)


def from_validation_error(exc: ValidationError) -> APIError:
    """The most specific problem of a pydantic error, as a 400 naming the offending field."""
    errors = exc.errors(include_url=False)
    deepest = max(errors, key=lambda e: len(e.get("loc", ())))
    where = _clean(deepest.get("loc", ()))
    # Alternatives of one union at the same place: say what each would have needed.
    msgs = []
    for e in errors:
        if _clean(e.get("loc", ())) == where and e.get("msg") not in msgs:
            msgs.append(e.get("msg", "invalid value"))
    others = sum(1 for e in errors if _clean(e.get("loc", ())) != where)
    param = _loc(where)
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    prefix = f"'{param}': " if param else ""
    return APIError(400, f"{prefix}{'; or: '.join(msgs)}{more}", param=param or None,
                    code=deepest.get("type", "invalid_value"))
