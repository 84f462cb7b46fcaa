"""Every error is JSON: {"error": <code>, "message": <for people>} (validation errors add "details"), unknown routes,
wrong methods, bodies that are not JSON and server errors included."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from streamguard.ingest.webrtc import WhipError


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail={"error": code, "message": message}, headers=headers)


def whip_error(exc: WhipError) -> JSONResponse:
    # The API's error body: the same keys as every other error (WhipError.as_dict() adds the status, which the
    # response already carries).
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """`routes`: every route of the app (the routers' own), for the Allow header of 405s."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.detail, dict):
            body = exc.detail
        elif exc.status_code == 404:
            body = {"error": "not_found", "message": f"no route {request.url.path}"}
        elif exc.status_code == 405:
            return _method_not_allowed(request, exc, routes)
        else:
            body = {"error": _code(exc.status_code), "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, http_error)  # FastAPI's HTTPException (ApiError), 404s, 405s
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)  # Starlette's ServerErrorMiddleware: answers, then logs


def _method_not_allowed(request: Request, exc: StarletteHTTPException, routes: Sequence[BaseRoute]) -> JSONResponse:
    # Starlette's Allow names the methods of the first route with this path only (POST /v1/streams, not GET): every
    # route's count (RFC 9110 §15.5.6).
    methods: set[str] = set()
    for route in routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    allowed = ", ".join(sorted(methods)) or (exc.headers or {}).get("Allow", "")
    headers = {**(exc.headers or {}), "Allow": allowed}
    body = {"error": "method_not_allowed",
            "message": f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"}
    return JSONResponse(body, status_code=405, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        pos = first.get("loc", ("body", 0))[-1]
        doc = exc.body if isinstance(exc.body, str) else ""
        reason = str(json.JSONDecodeError(str(first.get("ctx", {}).get("error", "invalid")), doc,
                                          pos if isinstance(pos, int) else 0))
        message = f"request body is not valid JSON: {reason}"
        return JSONResponse({"error": "invalid_json", "message": message,
                             "details": [{"field": "body", "message": message}]}, status_code=400)
    details = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": _msg(e)} for e in errors]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        message = "a JSON request body is required"
    else:
        message = f"{where or 'body'}: {_msg(first) if first else 'invalid'}"
    return JSONResponse({"error": "invalid_request", "message": message,
                         "details": json.loads(json.dumps(details, default=str))}, status_code=400)


async def _server_error(_request: Request, _exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "internal_error", "message": "internal server error; the server log says why"},
                        status_code=500)


def _msg(error: Any) -> str:
    """pydantic's message, without the "Value error, " it puts before a validator's own words."""
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def _code(status: int) -> str:
    return {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "too_large", 415: "unsupported_media_type", 503: "unavailable"}.get(status, f"http_{status}")
