#!/usr/bin/python3
"""A real RTSP server (GStreamer's gst-rtsp-server) serving H.264 MP4 files in a loop, for tests and benchmarks.

Runs with Debian's /usr/bin/python3 (python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-*), not the
project's venv. The file is sent as it is (no re-encoding: qtdemux → h264parse → rtph264pay), paced in real time,
and looped by seeking back to the start at end of stream. Every mount is shared, so N clients cost one pipeline.

    /usr/bin/python3 tools/rtsp_server.py --port 8554 face=/path/face.mp4 other=/path/b.mp4
    → rtsp://127.0.0.1:8554/face, rtsp://127.0.0.1:8554/other

Prints "READY <port>" on stdout once it listens.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, path: str, loop: bool):
        super().__init__()
        self.path = path
        self.loop = loop
        self.set_shared(True)
        self.set_eos_shutdown(False)
        self.connect("media-configure", self._on_configure)

    def do_create_element(self, url):
        launch = (f'( filesrc location="{self.path}" ! qtdemux ! h264parse config-interval=-1 ! '
                  "rtph264pay name=pay0 pt=96 config-interval=1 )")
        return Gst.parse_launch(launch)

    def _on_configure(self, _factory, media):
        if not self.loop:
            return
        pipeline = media.get_element()
        bus = pipeline.get_bus() if hasattr(pipeline, "get_bus") else None
        if bus is None:
            return
        bus.add_signal_watch()

        def on_eos(_bus, _msg):
            pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT, 0)

        bus.connect("message::eos", on_eos)


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
