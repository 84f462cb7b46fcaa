#!/usr/bin/env python3
"""A meeting bot's side of StreamGuard: publish a participant's video over WHIP and act on verdicts.

    python examples/meeting_bot.py http://127.0.0.1:8080 alice-video.mp4 --participant alice --name "Alice"

A real bot publishes each participant's track (an aiortc MediaStreamTrack from the meeting SDK) instead of a file.

The participant joins as soon as the WHIP offer is accepted, before `publish()` returns, so the bot reads the feed
from the start of its own session (`since=0` filtered to the session's stream, `whip:<session id>`): it sees its
own `participant.joined` and nothing from earlier sessions. It keeps the last `seq` it handled, so after a crash it
resumes the feed exactly where it stopped (`--since SEQ`, filtered to the participant, across sessions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from streamguard.client import EventStreamError, WhipClientError, events, publish


def describe(server: str, participant: str, event: dict[str, Any]) -> str | None:
    """The line the bot prints for an event, or None for events it does not act on."""
    if event["type"] == "alert.raised":
        d = event["data"]
        return (f"#{event['seq']} ALERT {participant}: P(fake) {d['smoothed']:.2f} "
                f"evidence {server}{d['evidence'].get('heatmap', '')}")
    if event["type"] in ("alert.cleared", "participant.joined", "participant.left"):
        return f"#{event['seq']} {event['type']} {event['data']}"
    return None


async def run(server: str, video: str, participant: str, *, name: str | None = None, token: str | None = None,
              since: int | None = None, out: Callable[[str], None] = print, connect_timeout_s: float = 10.0) -> None:
    """Publish `video` as `participant` and print what happens to it until the feed ends (or the task is cancelled)."""
    async with await publish(f"{server}/v1/whip", video, participant_id=participant, display_name=name, token=token,
                             loop=True, connect_timeout_s=connect_timeout_s) as pub:
        out(f"publishing {video} as {participant} (WHIP session {pub.session_id})")
        if since is None:  # this session from its first event: its participant.joined came before publish() returned
            feed = events(server, token=token, since=0, stream_id=f"whip:{pub.session_id}")
        else:  # resuming after a crash: everything for this participant after the last seq handled
            feed = events(server, token=token, since=since, participant_id=participant)
        async for event in feed:
            line = describe(server, participant, event)
            if line is not None:
                out(line)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Publish a participant's video to StreamGuard and print its verdicts.")
    ap.add_argument("server", help="the StreamGuard base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("video", help="a file or URL PyAV/aiortc's MediaPlayer can open")
    ap.add_argument("--participant", required=True)
    ap.add_argument("--name")
    ap.add_argument("--token")
    ap.add_argument("--since", type=int, default=None, help="resume the feed after this seq")
    args = ap.parse_args(argv)
    server = args.server.rstrip("/")

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

    try:
        asyncio.run(run(server, args.video, args.participant, name=args.name, token=args.token, since=args.since,
                        out=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        return 130
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
