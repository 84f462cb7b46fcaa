"""Bad input is refused cleanly (a 4xx with a JSON body, or a config error naming the field), never a 500, a hang or
a secret echoed back; every case here was accepted, or answered badly, before it was fixed."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, fast_settings, media_tool

from streamguard.config import ConfigError, StreamSpec, load_config
from streamguard.ingest.av_source import SourceError, open_container
from streamguard.ingest.webrtc import WhipError, validate_offer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("bad-input")
    with LiveServer(fast_settings(data / "data", whip={"max_sdp_bytes": 4096})) as srv:
        yield srv


@pytest.fixture(scope="module")
def offer() -> str:
    """A real aiortc offer (what a WHIP client sends)."""
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import VideoStreamTrack

    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = str(pc.localDescription.sdp)
        await pc.close()
        return sdp

    return asyncio.run(make())


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) >= {"error", "message"}, body
    return body


def test_an_alert_cursor_beyond_sqlite_integers_is_a_400(server: LiveServer) -> None:
    for before in ("99999999999999999999", str(2**63), "-1"):
        body = error_of(httpx.get(f"{server.url}/v1/alerts", params={"before": before}), 400)
        assert body["message"].startswith("query.before: "), body
    assert httpx.get(f"{server.url}/v1/alerts", params={"before": str(2**63 - 1)}).status_code == 200


def test_a_chunked_offer_is_refused_at_the_limit_without_being_read_whole(server: LiveServer) -> None:
    """A chunked body has no Content-Length: the server must stop reading at whip.max_sdp_bytes. The body here never
    ends (no last chunk): a server reading it whole would never answer."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/whip HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"a=x-padding:" + b"x" * 1000 + b"\r\n"
        for _ in range(8):  # 8 kB: twice the limit, and then nothing more
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = ""
        while "}" not in answer:  # the status line and headers, then the JSON body
            data = sock.recv(65536)
            assert data, f"the server closed without an answer: {answer!r}"
            answer += data.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"error":"sdp_too_large"' in answer.replace(" ", ""), answer


def test_dot_stream_ids_are_refused(server: LiveServer) -> None:
    for sid in (".", ".."):
        body = error_of(httpx.post(f"{server.url}/v1/streams", json={"id": sid, "url": "rtsp://cam.example/x"}), 400)
        assert body["message"].startswith("id: "), body
    assert StreamSpec(id="a.b", url="rtsp://cam.example/x").id == "a.b"  # dots inside an id are fine


FFMPEG_PROTOCOLS = ["javascript:alert(1)", "data:text/plain;base64,AAAA", "pipe:0", "concat:/a.mp4|/b.mp4",
                    "subfile:,,start,0,end,0,,:/etc/hostname", "crypto:/etc/hostname", "Pipe:1"]


@pytest.mark.parametrize("url", FFMPEG_PROTOCOLS)
def test_ffmpeg_protocols_are_not_file_names(server: LiveServer, url: str) -> None:
    body = error_of(httpx.post(f"{server.url}/v1/streams", json={"id": "p", "url": url}), 400)
    assert body["message"].startswith("url: unsupported scheme"), body
    assert httpx.get(f"{server.url}/v1/streams/p").status_code == 404


def test_a_file_named_like_a_protocol_is_opened_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_container hands FFmpeg file: paths only: "concat:clip.mp4" in the working folder is that file."""
    tool = media_tool()
    clip = tool.make_slideshow(tool.synthetic_images(1), tmp_path / "concat:clip.mp4", fps=5, seconds_per_image=1.0,
                               size=(64, 64))
    monkeypatch.chdir(tmp_path)
    with open_container(clip.name) as container:
        assert container.streams.video
    with pytest.raises(SourceError, match="no such file"):
        open_container("pipe:0")  # not standard input


def test_an_offer_whose_only_video_is_declined_is_refused(offer: str) -> None:
    declined = re.sub(r"^m=video \d+", "m=video 0", offer, flags=re.MULTILINE)
    with pytest.raises(WhipError) as err:
        validate_offer(declined, "application/sdp", 65536)
    assert err.value.status == 400 and err.value.code == "no_video" and "m=video 0" in err.value.message
    assert validate_offer(offer, "application/sdp", 65536)  # the same offer, not declined, is fine


def test_a_declined_offer_gets_400_from_the_api(server: LiveServer, offer: str) -> None:
    declined = re.sub(r"^m=video \d+", "m=video 0", offer, flags=re.MULTILINE)
    r = httpx.post(f"{server.url}/v1/whip", content=declined, headers={"Content-Type": "application/sdp"})
    assert error_of(r, 400)["error"] == "no_video"


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for var in list(os.environ):
        if var.startswith("STREAMGUARD_") and var not in ("STREAMGUARD_ENGINES", "STREAMGUARD_ENGINE_CACHE"):
            monkeypatch.delenv(var)
    return monkeypatch


def test_a_numeric_turn_credential_is_read_and_never_echoed(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("whip:\n  ice_servers:\n    - urls: turn:turn.example.net\n      username: u\n"
                      "      credential: 987654321\ntoken: 24681357\n")
    cfg = load_config(config)  # YAML reads both as numbers; as passwords they are their digits
    assert cfg.whip.ice_servers[0].credential is not None
    assert cfg.whip.ice_servers[0].credential.get_secret_value() == "987654321"
    assert cfg.token is not None and cfg.token.get_secret_value() == "24681357"
    config.write_text("whip:\n  ice_servers:\n    - urls: turn:turn.example.net\n      username: u\n"
                      "      credential: [987654321]\ntoken: [24681357]\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    text = str(err.value)
    assert "whip.ice_servers.0.credential: " in text and "token: " in text, text
    assert "987654321" not in text and "24681357" not in text, text


def test_streams_in_the_environment_that_are_not_json(no_env: pytest.MonkeyPatch) -> None:
    no_env.setenv("STREAMGUARD_STREAMS", "not json")
    with pytest.raises(ConfigError) as err:
        load_config()
    text = str(err.value)
    assert "None" not in text and "streams: STREAMGUARD_STREAMS must be JSON" in text, text


def test_the_service_keeps_serving_after_all_of_it(server: LiveServer) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
