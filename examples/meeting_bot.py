#!/usr/bin/env python3
"""A meeting bot's side of StreamGuard: publish a participant's video over WHIP and act on verdicts.

    python examples/meeting_bot.py http://127.0.0.1:8080 alice-video.mp4 --participant alice --name "Alice"

A real bot publishes each participant's track (an aiortc MediaStreamTrack from the meeting SDK) instead of a file.
It keeps the last `seq` it handled, so after a crash it resumes the feed exactly where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio

from streamguard.client import events, publish


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("video", help="a file or URL PyAV/aiortc's MediaPlayer can open")
    ap.add_argument("--participant", required=True)
    ap.add_argument("--name")
    ap.add_argument("--token")
    ap.add_argument("--since", type=int, default=None, help="resume the feed after this seq")
    args = ap.parse_args()

    async with await publish(f"{args.server}/v1/whip", args.video, participant_id=args.participant,
                             display_name=args.name, token=args.token, loop=True):
        async for event in events(args.server, token=args.token, since=args.since, participant_id=args.participant):
            if event["type"] == "alert.raised":
                d = event["data"]
                print(f"#{event['seq']} ALERT {args.participant}: P(fake) {d['smoothed']:.2f} "
                      f"evidence {args.server}{d['evidence'].get('heatmap', '')}")
            elif event["type"] in ("alert.cleared", "participant.joined", "participant.left"):
                print(f"#{event['seq']} {event['type']} {event['data']}")


if __name__ == "__main__":
    asyncio.run(main())
