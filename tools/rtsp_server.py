#!/usr/bin/python3
"""A real RTSP server (GStreamer's gst-rtsp-server) serving H.264 MP4 files in a loop, for tests and benchmarks.

Runs with Debian's /usr/bin/python3 (python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-*), not the
project's venv. The file is sent as it is (no re-encoding: qtdemux → h264parse → rtph264pay), paced in real time.
Every mount is shared, so N clients cost one pipeline, and behaves like a live camera: a client joins the stream
where it is, and the file loops forever, seamlessly (RTP timestamps keep increasing across the loop).

    /usr/bin/python3 tools/rtsp_server.py --port 8554 face=/path/face.mp4 other=/path/b.mp4
    → rtsp://127.0.0.1:8554/face, rtsp://127.0.0.1:8554/other

Prints "READY <port>" on stdout once it listens.

How the loop works: once the shared pipeline has prerolled (the media's "prepared" signal), a flushing *segment*
seek to 0 is sent to qtdemux, so that at the end of the file it sends SEGMENT_DONE instead of EOS; a pad probe sees
SEGMENT_DONE go by and (from the main loop) sends a non-flushing segment seek back to 0. A non-flushing seek
accumulates the segment base, so running time — and with it the payloader's RTP timestamps — just keeps going (the
probe adds the last frame's duration that qtdemux leaves out, see `Looper`). An EOS, instead, would reach rtpbin and
the sinks (the clients get an RTCP BYE: the session ends), which is what the old EOS handler never got to undo: it
watched the bus of the factory's bin, whose messages go up to the pipeline's bus (which the media watches itself);
and a flushing seek would restart running time at 0, i.e. make timestamps jump back.

Why the media answers "not seekable": FFmpeg/PyAV (like most clients) sends `Range: npt=0.000-` with PLAY, and
gst-rtsp-server honours it on a shared media with a *flushing* seek of the shared pipeline back to 0: every new
client restarts the stream for everyone (timestamps jump back) and drops the segment-seek loop, and each such seek
re-prerolls the pipeline while the single client thread waits (up to 20 s per request, in gst_rtsp_media_get_status)
— with ~20 clients arriving together the seeks pile up and the mount wedges (DESCRIBEs unanswered for minutes).
Answering the SEEKING query with "no" makes gst-rtsp-server skip those seeks; each client simply joins.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def _gst_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, path: str, loop: bool):
        super().__init__()
        self.path = path
        self.loop = loop
        self.set_shared(True)
        self.set_eos_shutdown(False)
        self.connect("media-configure", self._on_configure)

    def do_create_element(self, url: Any) -> Any:
        return Gst.parse_launch(
            f"( filesrc location={_gst_string(self.path)} ! qtdemux name=demux ! h264parse name=parse "
            "config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=1 )")

    def _on_configure(self, _factory: Any, media: Any) -> None:
        element = media.get_element()
        # A shared mount is a live feed: never let a client's PLAY Range seek the shared pipeline (see the top).
        element.get_by_name("pay0").get_static_pad("src").add_probe(Gst.PadProbeType.QUERY_UPSTREAM, _not_seekable)
        if self.loop:
            looper = Looper(element.get_by_name("parse").get_static_pad("sink"))
            # Prerolled (data waits at the media's blocked stream pads; no client has PLAYed yet, so nobody sees a
            # restart): start the looping segment. Flushing, as the streaming thread is blocked.
            media.connect("prepared", lambda _media: _restart_looping(looper, element))


def _restart_looping(looper: Looper, element: Gst.Element, timeout_s: float = 5.0) -> None:
    """The flushing segment seek, then wait until the new segment has reached rtpbin's send pads again.

    The flush clears the segment there, and a client's PLAY that comes before it is back finds a "complete stream
    without rate" in gst_rtsp_media_get_rates, a g_assert that aborts the whole server (seen on loaded machines,
    at a first client and at a media prepared again after every client left). "prepared" is emitted before the
    media reports itself prepared to the client waiting on it, so waiting here holds that PLAY back.
    """
    looper.seek(Gst.SeekFlags.FLUSH | Gst.SeekFlags.SEGMENT)
    pads = _rtp_send_pads(element)
    deadline = time.monotonic() + timeout_s
    while pads and time.monotonic() < deadline:
        if all(p.get_sticky_event(Gst.EventType.SEGMENT, 0) is not None for p in pads):
            return
        time.sleep(0.005)
    if pads:
        print(f"rtsp_server: no segment on rtpbin's send pads {timeout_s} s after the loop seek", file=sys.stderr,
              flush=True)


def _rtp_send_pads(element: Gst.Element) -> list[Gst.Pad]:
    """rtpbin's send_rtp_src pads in the media's pipeline (the pads gst_rtsp_stream_get_rates reads)."""
    pipeline = element.get_parent()
    if pipeline is None:
        return []
    pads: list[Gst.Pad] = []
    pipeline.iterate_all_by_element_factory_name("rtpbin").foreach(
        lambda rtpbin: pads.extend(p for p in rtpbin.srcpads if p.get_name().startswith("send_rtp_src")))
    return pads


class Looper:
    """Loops qtdemux seamlessly, from a probe on h264parse's sink pad (downstream of qtdemux).

    At SEGMENT_DONE (the end of the file in a segment seek) it sends a non-flushing segment seek back to 0, from the
    main loop. qtdemux gives the next loop's segment the base running time of the *start* of its last frame (its
    position), so the first frame of the new loop would share the last frame's timestamp; the probe re-sends that
    segment with its base at the *end* of the last frame (pts + duration), so timestamps keep strictly increasing.
    """

    def __init__(self, pad: Gst.Pad) -> None:
        self.pad = pad  # h264parse's sink pad: events pushed on it go upstream to qtdemux
        self.segment: Gst.Segment | None = None
        self.end = 0  # running time at which the latest frame ends
        self.looped = False  # a SEGMENT_DONE went by: the next segment starts a new loop
        self.resending = False
        mask = Gst.PadProbeType.BUFFER | Gst.PadProbeType.EVENT_DOWNSTREAM | Gst.PadProbeType.EVENT_FLUSH
        pad.add_probe(mask, self._probe)

    def seek(self, flags: Gst.SeekFlags) -> bool:
        """Seek qtdemux (the peer of h264parse's sink pad) to the start of the file, as one segment to its end."""
        event = Gst.Event.new_seek(1.0, Gst.Format.TIME, flags, Gst.SeekType.SET, 0, Gst.SeekType.NONE, -1)
        if not self.pad.push_event(event):
            print(f"rtsp_server: seek {flags!r} failed", file=sys.stderr, flush=True)
        return False  # as a GLib source: once

    def _probe(self, pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        if info.type & Gst.PadProbeType.BUFFER:
            buf = info.get_buffer()
            if self.segment is not None and buf is not None and buf.pts != Gst.CLOCK_TIME_NONE:
                rt = self.segment.to_running_time(Gst.Format.TIME, buf.pts)
                if rt != Gst.CLOCK_TIME_NONE:
                    dur = buf.duration if buf.duration != Gst.CLOCK_TIME_NONE else 0
                    self.end = max(self.end, rt + dur)
            return Gst.PadProbeReturn.OK
        event = info.get_event()
        if event is None or self.resending:
            return Gst.PadProbeReturn.OK
        if event.type == Gst.EventType.FLUSH_STOP:  # running time starts again at 0
            self.segment, self.end, self.looped = None, 0, False
        elif event.type == Gst.EventType.SEGMENT_DONE:
            self.looped = True
            GLib.idle_add(self.seek, Gst.SeekFlags.SEGMENT)  # not from qtdemux's own streaming thread
        elif event.type == Gst.EventType.SEGMENT:
            segment = event.parse_segment()
            if self.looped and segment.format == Gst.Format.TIME:
                self.looped = False
                start_rt = segment.to_running_time(Gst.Format.TIME, segment.start)
                if start_rt != Gst.CLOCK_TIME_NONE and start_rt < self.end:
                    segment.base += self.end - start_rt
                    fixed = Gst.Event.new_segment(segment)
                    fixed.set_seqnum(event.get_seqnum())
                    self.segment = segment
                    self.resending = True
                    try:
                        pad.send_event(fixed)  # this streaming thread, into h264parse, in place of `event`
                    finally:
                        self.resending = False
                    return Gst.PadProbeReturn.DROP
            self.segment = segment
        return Gst.PadProbeReturn.OK


def _not_seekable(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
    query = info.get_query()
    if query is not None and query.type == Gst.QueryType.SEEKING:
        return Gst.PadProbeReturn.DROP  # the query fails: gst-rtsp-server takes the media as not seekable
    return Gst.PadProbeReturn.OK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--no-loop", action="store_true", help="end each stream at the end of its file")
    ap.add_argument("mounts", nargs="+", help="name=path.mp4 (H.264 in MP4)")
    args = ap.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for spec in args.mounts:
        name, _, path = spec.partition("=")
        if not path:
            sys.exit(f"mount {spec!r}: expected name=path.mp4")
        mounts.add_factory(f"/{name}", LoopingFactory(path, loop=not args.no_loop))
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
