#!/usr/bin/env python3
"""A meeting bot's side of StreamGuard: publish a participant's video over WHIP and act on verdicts.

    python examples/meeting_bot.py http://127.0.0.1:8080 alice-video.mp4 --participant alice --name "Alice"

A real bot publishes each participant's track (an aiortc MediaStreamTrack from the meeting SDK) instead of a file.

The participant joins as soon as the WHIP offer is accepted, before `publish()` returns, so the bot reads the feed
from the start of its own session (`since=0` filtered to the session's stream, `whip:<session id>`): it sees its
own `participant.joined` and nothing from earlier sessions. It keeps the last `seq` it handled, so after a crash it
resumes the feed exactly where it stopped (`--since SEQ`, filtered to the participant, across sessions).

It prints its participant's events: joined, per-second scores (`participant.score`, which the server sends with
`events.publish_scores: true`; the bot says so when none come), alerts raised and cleared, left. A file is
published in a seamless loop (`LoopingFileTrack`: timestamps keep rising), so one session lasts as long as the bot.

The server can end a session on its own: no frames for a while, the peer connection failing, a restart (`server
shutdown`). The bot watches for that (its stream's `stream.state` closed or failed, its participant's
`participant.left`), and for its own side ending (the video track ended or its sender died: the publication DELETEs
the session at once; or the peer connection failing or closing), rather than follow the feed of a session that is
gone while the participant goes unmonitored. It then publishes again, with exponential back-off while the server
cannot be reached (`--max-republish` bounds the attempts), or exits with status 3 (`--exit-on-end`). A session
*replaced* by another session of the same participant is never republished: someone else publishes that
participant now, and two bots taking it back from each other would flap for ever; the bot exits with status 3.

SIGTERM (docker stop, systemd) and SIGINT (Ctrl+C) end the session with a DELETE before the bot exits (status 0 and
130): the participant leaves at once instead of staying "live" until the server's no-frame timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import httpx

from streamguard.client import EventStreamError, Publication, WhipClientError, events, publish

EXIT_SESSION_ENDED = 3
# The reason the server gives a session that a newer session of the same participant replaced.
REPLACED_PREFIX = "replaced by a new session"
REASON_DELETED = "deleted by client"  # the server's reason for a session its publisher DELETEd


class SessionEnded(Exception):
    """The WHIP session ended and the bot does not publish again (--exit-on-end, or the session was replaced)."""

    def __init__(self, participant: str, session_id: str, reason: str) -> None:
        super().__init__(f"the WHIP session {session_id} of {participant} ended: {reason}")
        self.participant = participant
        self.session_id = session_id
        self.reason = reason

    @property
    def replaced(self) -> bool:
        return self.reason.startswith(REPLACED_PREFIX)


def describe(server: str, participant: str, event: dict[str, Any]) -> str | None:
    """The line the bot prints for an event, or None for events it does not act on."""
    if event["type"] == "participant.score":
        d = event["data"]
        now = "-" if d.get("p_fake") is None else f"{d['p_fake']:.2f}"
        smoothed = "-" if d.get("smoothed") is None else f"{d['smoothed']:.2f}"
        return f"#{event['seq']} score {participant}: P(fake) {now} smoothed {smoothed} ({d.get('state')})"
    if event["type"] == "alert.raised":
        d = event["data"]
        return (f"#{event['seq']} ALERT {participant}: P(fake) {d['smoothed']:.2f} "
                f"evidence {server}{d['evidence'].get('heatmap', '')}")
    if event["type"] in ("alert.cleared", "participant.joined", "participant.left"):
        return f"#{event['seq']} {event['type']} {event['data']}"
    return None


def session_end(event: dict[str, Any], stream_id: str, participant: str) -> str | None:
    """Why the session streaming as `stream_id` ended, if `event` says it did; else None."""
    if event.get("stream_id") != stream_id:
        return None  # an earlier session of the participant (a resumed feed spans sessions)
    data = event.get("data") or {}
    if event["type"] == "stream.state" and data.get("state") in ("closed", "failed"):
        return str(data.get("reason") or f"stream {data['state']}")
    if event["type"] == "participant.left" and event.get("participant_id") == participant:
        return str(data.get("reason") or "participant left")
    return None


async def follow(server: str, pub: Publication, participant: str, *, token: str | None, since: int | None,
                 out: Callable[[str], None], feed_grace_s: float = 3.0, scores_hint_s: float = 15.0) -> str:
    """Print what happens to the session until it ends; returns why it ended (the server's reason when it gave one).

    The feed says why; the publication's own end is the other way it ends: its video track ended or its sender
    died (the publication has DELETEd the session already: that is the reason), or the connection failed or closed
    (a server that went away without saying, killed or with its feed closed before the bot read the last events:
    the feed gets `feed_grace_s` to say why first)."""
    stream_id = f"whip:{pub.session_id}"
    if since is None:  # this session from its first event: its participant.joined came before publish() returned
        feed = events(server, token=token, since=0, stream_id=stream_id)
    else:  # resuming after a crash: everything for this participant after the last seq handled
        feed = events(server, token=token, since=since, participant_id=participant)
    scored = asyncio.Event()

    async def read_feed() -> str:
        async for event in feed:
            line = describe(server, participant, event)
            if line is not None:
                out(line)
            if event["type"] == "participant.score":
                scored.set()
            reason = session_end(event, stream_id, participant)
            if reason is not None:
                return reason
        return "the event feed ended"

    async def hint_scores() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(scored.wait(), scores_hint_s)
            return
        out(f"(no participant.score events in {scores_hint_s:g} s: the server sends per-second scores only with "
            "events.publish_scores: true; alerts come either way)")

    reader = asyncio.create_task(read_feed())
    ended = asyncio.create_task(pub.wait_ended())
    hint = asyncio.create_task(hint_scores())
    try:
        await asyncio.wait({reader, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not reader.done():
            # Our side ended: often because the server ended the session (it closes the connection, and with it our
            # sender and track), and then the feed says why (replaced, server shutdown...): give it a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), feed_grace_s)
        if not reader.done():
            return ended.result()
        reason = reader.result()  # a feed error (EventStreamError) raises
        if reason == REASON_DELETED and pub.end_reason is not None:
            await asyncio.wait({ended}, timeout=feed_grace_s)  # its DELETE's answer
            if pub.deleted:  # our own DELETE, sent because of what ended on our side: that is the reason
                return pub.end_reason
        return reason
    finally:
        for task in (reader, ended, hint):
            task.cancel()
        await asyncio.gather(reader, ended, hint, return_exceptions=True)


def _transient(exc: BaseException) -> bool:
    """A republish failure worth retrying: the server is away, restarting, busy, or ICE failed this time."""
    if isinstance(exc, WhipClientError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, (httpx.HTTPError, ConnectionError, OSError))


async def run(server: str, video: str, participant: str, *, name: str | None = None, token: str | None = None,
              since: int | None = None, out: Callable[[str], None] = print, connect_timeout_s: float = 10.0,
              republish: bool = True, max_republish: int | None = None, backoff_initial_s: float = 1.0,
              backoff_max_s: float = 30.0) -> None:
    """Publish `video` as `participant` and print what happens to it; when the session ends, publish again (or raise
    SessionEnded: `republish=False`, or the session was replaced). Runs until the task is cancelled.

    The first publish's errors are raised as they are (a wrong token or URL is not fixed by retrying); a republish
    is retried with exponential back-off while the failure is transient, `max_republish` times in a row at most
    (None: for ever). The count resets once a republished session is up."""
    attempt = 0
    first = True
    while True:
        try:
            pub = await publish(f"{server}/v1/whip", video, participant_id=participant, display_name=name,
                                token=token, loop=True, connect_timeout_s=connect_timeout_s)
        except Exception as exc:
            if first or not _transient(exc):
                raise
            attempt += 1
            if max_republish is not None and attempt > max_republish:
                raise
            delay = random.uniform(0.5, 1.0) * min(backoff_max_s, backoff_initial_s * 2 ** (attempt - 1))
            out(f"republishing {participant} failed ({exc}); retrying in {delay:.1f} s")
            await asyncio.sleep(delay)
            continue
        async with pub:
            attempt = 0
            out(f"publishing {video} as {participant} (WHIP session {pub.session_id})")
            reason = await follow(server, pub, participant, token=token, since=since if first else None, out=out)
        first = False
        ended = SessionEnded(participant, pub.session_id, reason)
        if not republish or ended.replaced:
            raise ended
        attempt += 1
        if max_republish is not None and attempt > max_republish:
            raise ended
        delay = random.uniform(0.5, 1.0) * min(backoff_max_s, backoff_initial_s * 2 ** (attempt - 1))
        out(f"{ended}; republishing in {delay:.1f} s")
        await asyncio.sleep(delay)


async def until_signalled(bot: Coroutine[Any, Any, None]) -> signal.Signals | None:
    """Run the bot until it returns or SIGTERM/SIGINT arrives; a signal cancels it, which ends its session cleanly
    (`async with` the publication DELETEs it), and is returned. The default SIGTERM would kill the process with the
    session still open on the server, its participant "live" until the no-frame timeout."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(bot)
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if not received:
            received.append(sig)
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        await task
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return received[0] if received else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Publish a participant's video to StreamGuard and print its verdicts.")
    ap.add_argument("server", help="the StreamGuard base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("video", help="a file or URL PyAV/aiortc's MediaPlayer can open")
    ap.add_argument("--participant", required=True)
    ap.add_argument("--name")
    ap.add_argument("--token")
    ap.add_argument("--since", type=int, default=None, help="resume the feed after this seq")
    ap.add_argument("--exit-on-end", action="store_true",
                    help=f"exit with status {EXIT_SESSION_ENDED} when the session ends instead of publishing again")
    ap.add_argument("--max-republish", type=int, default=None, metavar="N",
                    help="give up after N republish attempts in a row (default: never)")
    args = ap.parse_args(argv)
    server = args.server.rstrip("/")

    def fail(message: str, status: int = 1) -> int:
        print(f"error: {message}", file=sys.stderr)
        return status

    bot = run(server, args.video, args.participant, name=args.name, token=args.token, since=args.since,
              out=lambda line: print(line, flush=True), republish=not args.exit_on_end,
              max_republish=args.max_republish)
    try:
        stopped_by = asyncio.run(until_signalled(bot))
        if stopped_by is not None:  # SIGTERM (docker stop, systemd) or Ctrl+C: the session was DELETEd on the way out
            print(f"stopped by {stopped_by.name}; the WHIP session was ended", file=sys.stderr)
            return 130 if stopped_by == signal.SIGINT else 0
    except SessionEnded as exc:
        if exc.replaced:
            why = "another session of the same participant replaced it; not taking it back"
        elif args.exit_on_end:
            why = "not republishing (--exit-on-end)"
        else:
            why = f"gave up after {args.max_republish} republish attempts"
        return fail(f"{exc}; {why}", EXIT_SESSION_ENDED)
    except WhipClientError as exc:
        hint = {401: " (wrong or missing --token)", 403: " (wrong --token)",
                503: " (the server is at its session limit or not ready yet: try again later)"}.get(exc.status, "")
        return fail(f"{server}/v1/whip refused {args.participant}: HTTP {exc.status} {exc.code}: {exc.message}{hint}")
    except EventStreamError as exc:  # EventAuthError included
        return fail(f"{server}: {exc}")
    except httpx.HTTPError as exc:
        return fail(f"cannot reach {server}: {exc}")
    except ConnectionError as exc:  # WebRTC could not connect (ICE/DTLS)
        return fail(f"publishing to {server}: {exc}")
    except (OSError, ValueError) as exc:  # the video cannot be opened, or has no video stream
        return fail(f"{args.video}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
