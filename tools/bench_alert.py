#!/usr/bin/env python
"""Time to alert, live: a deepfake served over RTSP into the real service, from its first scored sample to
`alert.raised`, once per heatmap method (`events.heatmap`), back to back.

    python tools/bench_alert.py                                   # the FF++ fake, model map then occlusion, 3 runs
    python tools/bench_alert.py clip.mp4 --methods model --runs 5

Each run starts the app (tests/serve_helpers.LiveServer: the service on uvicorn in this process, default settings
but `events.heatmap` and per-second scores on) and tools/rtsp_server.py (GStreamer, /usr/bin/python3) looping the
file, adds the stream over the API and follows the event feed. Reported per run: seconds from the participant's
first scored sample (its `participant.score` event) to `alert.raised`, the part of it the alert waited for its
evidence (`streamguard_alert_evidence_seconds`), and the raising sample's smoothed score. The scoring window needs
`min_window_samples` samples and `raise_after` more over the raise threshold whatever the heatmap; the evidence wait
is what the method adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serve_helpers import LOCAL_SOURCES, Feed, LiveServer, RtspServer, free_port  # noqa: E402

FAKE = REPO.parent / "shared" / "data" / "ffpp_smoke" / "fake_deepfakes_519_515.mp4"


def scored(e: dict[str, Any]) -> bool:
    return e["type"] == "participant.score" and e["data"]["p_fake"] is not None


def raised(e: dict[str, Any]) -> bool:
    return e["type"] == "alert.raised"


async def one_run(video: Path, method: str, model: str | None, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-alert-") as data_dir:
        settings = {"host": "127.0.0.1", "port": free_port(), "data_dir": data_dir, "model": model,
                    "log_level": "warning", "sources": {"policy": LOCAL_SOURCES},
                    "events": {"publish_scores": True, "heatmap": method}}
        rtsp = RtspServer({"cam": video}).start()
        try:
            with LiveServer(settings) as server:
                async with Feed(server.url, since=0) as feed, httpx.AsyncClient(base_url=server.url) as http:
                    r = await http.post("/v1/streams", json={"id": "cam", "url": rtsp.url("cam")})
                    r.raise_for_status()
                    first = await feed.wait_for(scored, timeout_s, "the first scored sample")
                    alert = await feed.wait_for(raised, timeout_s, "alert.raised")
                metric = server.service.metrics.registry.get_sample_value
                return {"method": method, "first_score_to_alert_s": round(alert["ts"] - first["ts"], 2),
                        "evidence_wait_s": round(metric("streamguard_alert_evidence_seconds_sum") or 0.0, 2),
                        "smoothed": round(alert["data"]["smoothed"], 3),
                        "heatmap": "heatmap" in alert["data"]["evidence"]}
        finally:
            rtsp.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", nargs="?", type=Path, default=FAKE, help="an H.264 MP4 with a face the model flags")
    ap.add_argument("--methods", default="model,occlusion", help="events.heatmap values, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default=None, help="model name or path (default: the service's default model)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each event")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    if not args.video.exists():
        raise SystemExit(f"no such video: {args.video}")

    rows = []
    for run in range(1, args.runs + 1):
        for method in args.methods.split(","):
            row = {"run": run, **asyncio.run(one_run(args.video, method.strip(), args.model, args.timeout))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| heatmap | runs | first scored sample → alert.raised, median (min-max) | evidence wait, median |\n"
          "|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        total = [r["first_score_to_alert_s"] for r in mine]
        wait = [r["evidence_wait_s"] for r in mine]
        print(f"| {method} | {len(mine)} | {statistics.median(total):.2f} s ({min(total):.2f}-{max(total):.2f}) "
              f"| {statistics.median(wait):.2f} s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
