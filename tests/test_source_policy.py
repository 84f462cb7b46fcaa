"""The source policy for streams added over the API (`sources.policy`): the shipped defaults refuse this machine,
link-local and local files and let a LAN camera through; names are checked at every connection; an HLS playlist
cannot send FFmpeg to a host the policy denies; and a stream that cannot be opened is told nothing that maps the
network. Before it, POST /v1/streams made the server connect anywhere and said which ports were open."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from serve_helpers import Feed, LiveServer, fast_settings, free_port, http_folder, media_tool, state

from streamguard.config.policy import SourcePolicy
from streamguard.ingest.policy import OPAQUE_OPEN_FAILURE, SourceGuard, SourceRefused

pytestmark = pytest.mark.timeout(120)

REFUSED_BY_DEFAULT = [
    "/etc/hostname", "file:///etc/hostname", "rtsp://127.0.0.1:8554/cam", "rtsp://127.9.9.9/cam", "http://[::1]/x.m3u8",
    "http://[::ffff:127.0.0.1]/x.m3u8", "rtsp://localhost/cam", "rtsp://cam.localhost/x",
    "http://169.254.169.254/latest/meta-data", "http://[fe80::1%25eth0]/x", "rtsp://0.0.0.0/cam",
    "http://[fd00:ec2::254]/latest", "rtmp://224.0.0.1/live",
]
ALLOWED_BY_DEFAULT = ["rtsp://192.168.1.20:554/stream1", "rtsp://10.0.0.5/cam", "rtsp://user:pw@172.16.3.4/h264",
                      "https://cdn.example.com/live/index.m3u8", "rtmp://[2001:db8::5]/live", "rtsps://camera.lan/s"]


@pytest.mark.parametrize("url", REFUSED_BY_DEFAULT)
def test_the_defaults_refuse_this_machine_link_local_and_files(url: str) -> None:
    with pytest.raises(SourceRefused):
        SourceGuard(SourcePolicy()).check_url(url)


@pytest.mark.parametrize("url", ALLOWED_BY_DEFAULT)
def test_the_defaults_let_a_lan_camera_and_an_internet_stream_through(url: str) -> None:
    SourceGuard(SourcePolicy()).check_url(url)


def test_allow_networks_schemes_and_files_narrow_or_widen_it() -> None:
    camera_vlan = SourceGuard(SourcePolicy(allow_networks=["10.20.0.0/16"], schemes=["rtsp", "rtsps"]))
    camera_vlan.check_url("rtsp://10.20.1.7/cam")
    for url in ("rtsp://192.168.1.20/cam", "rtsp://10.21.0.1/cam", "https://10.20.1.7/x.m3u8"):
        with pytest.raises(SourceRefused, match=r"allow_networks|schemes"):
            camera_vlan.check_url(url)
    SourceGuard(SourcePolicy(allow_files=True)).check_url("/srv/video/lobby.mp4")
    policy = SourcePolicy()
    assert policy.refusal(ipaddress.ip_address("192.168.1.20")) is None
    assert policy.refusal(ipaddress.ip_address("::ffff:169.254.169.254")) is not None  # mapped IPv6 is IPv4


def test_a_name_is_checked_on_what_it_resolves_to() -> None:
    guard = SourceGuard(SourcePolicy())
    with pytest.raises(SourceRefused, match="resolves to an address"):
        guard.resolve("localhost", 554)
    assert guard.resolve("192.168.1.20", 554) == ["192.168.1.20"]


@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[tuple[LiveServer, Path]]:
    """A service with the shipped policy (fast_settings' local one removed) and a file stream in its config."""
    tool = media_tool()
    clip = tool.make_slideshow(tool.synthetic_images(2), tmp_path / "clip.mp4", fps=10, seconds_per_image=5.0,
                               size=(160, 120))
    settings = fast_settings(tmp_path / "data", streams=[{"id": "configured", "url": str(clip)}])
    settings["sources"]["policy"] = {}
    with LiveServer(settings) as srv:
        yield srv, clip


@pytest.mark.asyncio
async def test_the_api_refuses_what_the_policy_denies_and_config_files_stay_allowed(shipped) -> None:
    srv, clip = shipped
    async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
        for url in (str(clip), f"rtsp://127.0.0.1:{free_port()}/cam", "http://169.254.169.254/x.m3u8"):
            r = await http.post("/v1/streams", json={"id": "x", "url": url})
            assert r.status_code == 403, r.text
            body = r.json()
            assert body["error"] == "source_not_allowed" and body["message"].startswith("url: "), body
        assert [s["id"] for s in (await http.get("/v1/streams")).json()] == ["configured"]
        await feed.wait_for(state("configured", "live"), 20, "the configured file stream live")
        # A name the API cannot judge by its text: resolved at the connection, and refused for good.
        name = loopback_name()
        assert (await http.post("/v1/streams", json={"id": "named", "url": f"rtsp://{name}:{free_port()}/c"})
                ).status_code == 201
        failed = await feed.wait_for(state("named", "failed"), 20, "the named stream refused")
        assert failed["data"]["reason"].startswith(f"refused by sources.policy: {name} resolves to"), failed


def loopback_name() -> str:
    """A host name (not "localhost", which the API refuses by its text) that resolves to this machine."""
    import socket

    for name in (socket.gethostname(), "ip6-localhost", "ip6-loopback"):
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(name, 554, type=socket.SOCK_STREAM)}
        except OSError:
            continue
        if addresses and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
            return name
    pytest.skip("no host name here resolves to loopback only")


@pytest.fixture
def hls(tmp_path: Path) -> Path:
    """A 6 s VOD HLS rendition in a folder (index.m3u8 and its segments)."""
    tool = media_tool()
    src = tool.make_slideshow(tool.synthetic_images(3), tmp_path / "src.mp4", fps=10, seconds_per_image=2.0,
                              size=(160, 120))
    out = tmp_path / "hls"
    out.mkdir()
    with av.open(str(src)) as inp, av.open(str(out / "index.m3u8"), "w", format="hls",
                                           options={"hls_time": "2", "hls_list_size": "0",
                                                    "hls_playlist_type": "vod"}) as dst:
        video = dst.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                dst.mux(packet)
    return out


@pytest.mark.asyncio
async def test_an_hls_playlist_cannot_send_ffmpeg_to_a_denied_host(tmp_path: Path, hls: Path) -> None:
    """The playlist is on an allowed host; its segments on 127.0.0.2, which this policy denies. FFmpeg would fetch
    them (it follows whatever the playlist names); through the policy's proxy it gets a 403 for each."""
    settings = fast_settings(tmp_path / "data")
    settings["sources"]["policy"] = {"deny_networks": ["127.0.0.2/32"]}
    with http_folder(hls) as site, http_folder(hls, host="127.0.0.2") as elsewhere:
        playlist = (hls / "index.m3u8").read_text()
        (hls / "elsewhere.m3u8").write_text(playlist.replace("index", f"{elsewhere}/index"))
        srv = await asyncio.to_thread(LiveServer(settings).start)
        try:
            async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
                for sid, name in (("here", "index.m3u8"), ("elsewhere", "elsewhere.m3u8")):
                    created = await http.post("/v1/streams", json={"id": sid, "url": f"{site}/{name}"})
                    assert created.status_code == 201, created.text
                await feed.wait_for(state("here", "live"), 20, "the playlist whose segments are allowed")
                refused = await feed.wait_for(lambda e: e["stream_id"] == "elsewhere" and e["data"].get("state") in
                                              ("reconnecting", "failed"), 20, "the other one failing")
                assert refused["data"]["reason"] == OPAQUE_OPEN_FAILURE, refused
                assert not [e for e in feed.events if e["stream_id"] == "elsewhere" and e["data"].get("state") ==
                            "live"]
                assert srv.service.egress.refused >= 1
        finally:
            await srv.astop()


@pytest.mark.asyncio
async def test_failures_to_open_read_the_same_whatever_is_behind_them(tmp_path: Path) -> None:
    """A closed port, an open port with a web server behind it, a missing file and a text file: before, each said
    what it was ("Connection refused", "not a video", "no such file"), which maps a network; now all say the same."""
    settings = fast_settings(tmp_path / "data")  # this machine and files allowed: the reasons are what is tested
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "notes.txt").write_text("not a video\n" * 50)
    with http_folder(tmp_path / "site") as site:
        web_port = int(site.rsplit(":", 1)[1])
        urls = {"closed": f"rtsp://127.0.0.1:{free_port()}/cam", "web": f"rtsp://127.0.0.1:{web_port}/cam",
                "missing": str(tmp_path / "missing.mp4"), "text": str(tmp_path / "site" / "notes.txt")}
        srv = await asyncio.to_thread(LiveServer(settings).start)
        try:
            async with Feed(srv.url, since=0) as feed, httpx.AsyncClient(base_url=srv.url) as http:
                for sid, url in urls.items():
                    assert (await http.post("/v1/streams", json={"id": sid, "url": url})).status_code == 201
                reasons: dict[str, Any] = {}
                for sid in urls:
                    ev = await feed.wait_for(lambda e, sid=sid: e["stream_id"] == sid and e["data"].get("state") in
                                             ("reconnecting", "failed"), 30, f"{sid} failing")
                    reasons[sid] = ev["data"]["reason"]
                    info = (await http.get(f"/v1/streams/{sid}")).json()
                    assert info["reason"] in (None, OPAQUE_OPEN_FAILURE), info
        finally:
            await srv.astop()
    assert set(reasons.values()) == {OPAQUE_OPEN_FAILURE}, reasons
