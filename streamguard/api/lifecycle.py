"""Shutdown in order: on SIGINT/SIGTERM the service stops first (streams close, participants leave, events are
flushed to the store and to the sockets, which the hub then closes with 1001 and a `since=` hint), and only then is
the signal passed on to uvicorn, which would otherwise close every WebSocket with 1012 *before* the lifespan
shutdown, i.e. before the service publishes its last events."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

DRAIN_TIMEOUT_S = 15.0  # longest a signal waits for the service to stop before uvicorn is told to exit anyway
log = logging.getLogger(__name__)


def drain_on_signal(stop: Callable[[], asyncio.Task[None]]) -> Callable[[], None]:
    """Make SIGINT/SIGTERM stop the service *before* uvicorn shuts down; returns the function that undoes it.

    uvicorn's shutdown closes every WebSocket with 1012 and only then runs the lifespan shutdown, so subscribers
    would miss the last events (participants leaving, streams closing) and the hub's 1001. uvicorn installs its
    signal handlers before the lifespan starts (they restore the previous ones when it exits); here they are wrapped:
    the first signal runs stop() (which flushes the events and closes the feeds with 1001) and hands the signal to
    uvicorn when it is done, or after DRAIN_TIMEOUT_S; a second Ctrl+C still forces the exit at once. Signal
    handlers belong to the main thread: elsewhere (a server in a thread, as in the tests) nothing is hooked and
    uvicorn closes WebSockets with 1012 (a close code clients retry, as 1001).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    tasks: set[asyncio.Task[None]] = set()  # holds the drain task (the loop only keeps weak references)
    signalled = False  # the drain has begun
    told = False  # uvicorn has had a signal

    def tell(signum: int, frame: Any = None) -> None:
        nonlocal told
        told = True
        previous[signum](signum, frame)

    async def drain(signum: int) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(stop()), DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("the service did not stop within %g s; shutting the server down anyway", DRAIN_TIMEOUT_S)
        except Exception:  # logged here; the lifespan's end awaits the same task and raises it again
            log.exception("stopping the service failed")
        finally:
            if not told:
                tell(signum)

    def start_drain(signum: int) -> None:
        tasks.add(loop.create_task(drain(signum), name="streamguard-drain"))

    def handler(signum: int, frame: Any) -> None:
        nonlocal signalled
        if not signalled:
            signalled = True
            loop.call_soon_threadsafe(start_drain, signum)  # a signal handler may run mid-loop: schedule, do not run
            return
        # Another signal while draining. A second Ctrl+C forces the exit, as it does in uvicorn (which takes two
        # calls when it had none yet); a repeated SIGTERM changes nothing, as in uvicorn: the drain goes on.
        if signum == signal.SIGINT:
            if not told:
                tell(signum, frame)
            tell(signum, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if callable(current):  # uvicorn's handler; SIG_DFL/SIG_IGN: nobody to hand the signal to
            previous[sig] = current
            signal.signal(sig, handler)

    def unhook() -> None:
        for sig, original in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, original)

    return unhook
