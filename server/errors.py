"""One JSON error shape for every 4xx/5xx: ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``.

FastAPI's validation errors already have this shape; plain ``HTTPException`` details (strings) are
wrapped into it so clients parse errors one way. The offending input is never echoed back (it can
be large, and it can contain the caller's secrets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


def error_item(msg: str, loc: Sequence[str | int] = (), type_: str = "error") -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": type_}


class ApiError(HTTPException):
    """An HTTP error whose message names the field it is about."""

    def __init__(
        self,
        status_code: int,
        msg: str,
        loc: Sequence[str | int] = (),
        type_: str = "error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=[error_item(msg, loc, type_)], headers=headers)


def _normalise(detail: Any) -> list[dict[str, Any]]:
    if isinstance(detail, list):
        return [
            item if isinstance(item, dict) and "msg" in item else error_item(str(item)) for item in detail
        ]
    return [error_item(str(detail))]


def clean_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        out.append({"loc": list(err.get("loc", ())), "msg": msg, "type": err.get("type", "value_error")})
    return out


async def _http_exception(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"detail": _normalise(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type, whatever its parameters (``; charset=utf-8``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _validation_exception(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    content_type = request.headers.get("content-type")
    # A body sent as another media type (text/plain, a form) is never parsed as JSON, so it fails
    # as "not a valid dictionary", which blames the content; the type is what is wrong: 415.
    if content_type and not is_json_media_type(content_type) and any(_about_body(err) for err in errors):
        media = content_type.split(";", 1)[0].strip()[:100]
        return JSONResponse(
            {
                "detail": [
                    error_item(
                        f"the body must be sent as application/json, not {media}",
                        ["header", "Content-Type"],
                        "unsupported_media_type",
                    )
                ]
            },
            status_code=415,
        )
    return JSONResponse({"detail": clean_validation_errors(errors)}, status_code=422)


def _about_body(error: Any) -> bool:
    loc = error.get("loc", ()) if isinstance(error, dict) else ()
    return bool(loc) and loc[0] == "body"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_exception)  # type: ignore[arg-type]
