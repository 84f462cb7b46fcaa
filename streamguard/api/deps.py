"""What route handlers get through FastAPI dependencies: the service, and the app's own state (token, stopping)."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from streamguard.service import Service


@dataclass
class ApiState:
    """One per app (in `app.state.api`): the service, the bearer token, and the stop that shutdown runs once."""

    service: Service
    token: str | None
    stopping: asyncio.Task[None] | None = None

    def authorized(self, value: str | None) -> bool:
        """Whether `value` is the configured token (anything is, when none is configured)."""
        token = self.token
        return token is None or (value is not None and secrets.compare_digest(value.encode(), token.encode()))

    def stop_once(self) -> asyncio.Task[None]:
        """service.stop(), run once: by the first shutdown signal (see lifecycle.drain_on_signal) or the lifespan's
        end, whichever comes first; both await the same task."""
        if self.stopping is None:
            self.stopping = asyncio.get_running_loop().create_task(self.service.stop(), name="streamguard-stop")
        return self.stopping


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    return header[7:] if header and header.lower().startswith("bearer ") else None


def get_api(conn: HTTPConnection) -> ApiState:
    api: ApiState = conn.app.state.api
    return api


def get_service(conn: HTTPConnection) -> Service:
    return get_api(conn).service


Api = Annotated[ApiState, Depends(get_api)]
ServiceDep = Annotated[Service, Depends(get_service)]
