"""Calls from one instance to another over NATS request/reply, for what only the instance that holds it can do: end
or refuse a WHIP session (the peer connection lives in that process), or remove one of its WHIP streams.

Each instance answers on `<prefix>.rpc.<instance id>`; an answer is an HTTP-like result, so the instance the client
called relays it as is (same status, same `{error, message}` body, same headers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, Field, ValidationError

from streamguard.cluster.link import NatsLink

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0

Op = Literal["whip_delete", "whip_patch", "stream_remove"]


class Call(BaseModel):
    op: Op
    id: str = Field(min_length=1, max_length=300)


class Result(BaseModel):
    status: int
    error: str | None = None
    message: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Result]]


def subject(prefix: str, instance: str) -> str:
    return f"{prefix}.rpc.{instance}"


class Rpc:
    """`serve(handler)` answers this instance's calls; `call(instance, op, id)` makes one to another instance."""

    def __init__(self, link: NatsLink, prefix: str, me: str) -> None:
        self._link = link
        self._prefix = prefix
        self._me = me
        self._sub: Subscription | None = None

    async def serve(self, handler: Handler) -> None:
        async def answer(msg: Msg) -> None:
            try:
                call = Call.model_validate_json(msg.data)
            except ValidationError as exc:
                result = Result(status=400, error="invalid_request", message=str(exc.errors()[0]["msg"]))
            else:
                try:
                    result = await handler(call)
                except Exception:
                    log.exception("cluster: rpc %s failed", call.op)
                    result = Result(status=500, error="internal_error", message="internal error on the instance "
                                    f"{self._me}; its log says why")
            await msg.respond(result.model_dump_json().encode())

        self._sub = await self._link.nc.subscribe(subject(self._prefix, self._me), cb=answer)

    async def call(self, instance: str, op: Op, target: str) -> Result:
        """The other instance's answer; 503 when it does not answer in time (gone, or NATS unreachable)."""
        payload = json.dumps({"op": op, "id": target}).encode()
        try:
            reply = await self._link.nc.request(subject(self._prefix, instance), payload, timeout=TIMEOUT_S)
            return Result.model_validate_json(reply.data)
        except Exception as exc:  # noqa: BLE001 - no responders, timeout, disconnected: it cannot be reached
            log.warning("cluster: %s on instance %s: no answer (%s)", op, instance, type(exc).__name__)
            return Result(status=503, error="instance_unreachable",
                          message=f"the instance {instance} that holds {target!r} did not answer; try again",
                          headers={"Retry-After": "2"})

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - gone with the connection
                log.debug("cluster: rpc unsubscribe: %s", type(exc).__name__)
