#!/usr/bin/env python3
"""Cluster mode, measured against a real `nats-server -js` (Debian's nats-server on PATH):

- log: events/s through the cluster's event log: drafts published on one instance (and on three at once) until
  every instance's store holds them (JetStream ack + the follower reading them back + the SQLite commit);
- latency: an event published on instance A until a WebSocket client of instance B (a `streamguard serve` process)
  receives it, at a steady rate: p50 / p95 / max;
- failover: two `serve` processes with four RTSP cameras; kill -9 of the one holding streams, until its streams
  are live on the other (as its /v1/streams says), over several runs; with the default lease times unless --ttl;
- overhead: one `serve` process with the same RTSP cameras for --seconds, in single mode and in cluster mode: CPU
  (process CPU time / wall time, in cores) and RSS, and the NATS server's own CPU.

    python tools/bench_cluster.py [--only log,latency,failover,overhead] [--json out.json]

The machine's load average is printed: on a shared host other jobs take CPU and show up as latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SYSTEM_PYTHON = "/usr/bin/python3"
sys.path.insert(0, str(REPO / "tools"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout_s} s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the real parts --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def nats_server(tmp: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(exe).is_file():
        sys.exit("needs nats-server (apt-get install nats-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "nats")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"nats://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def rtsp_server(tmp: Path, mounts: int) -> Iterator[list[str]]:
    import make_test_media

    photos = sorted((SHARED / "real_faces").glob("img*.jpg"))[:4]
    if len(photos) < 4:
        sys.exit(f"needs face photos in {SHARED / 'real_faces'}")
    clip = make_test_media.make_slideshow(photos, tmp / "faces.mp4", fps=25, seconds_per_image=4.0, size=(640, 480))
    port = free_port()
    specs = [f"m{n}={clip}" for n in range(mounts)]
    proc = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tools" / "rtsp_server.py"), "--port", str(port), *specs],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith("READY"):
            sys.exit("the RTSP server did not start (needs python3-gi and gst-rtsp-server)")
        yield [f"rtsp://127.0.0.1:{port}/m{n}" for n in range(mounts)]
    finally:
        proc.kill()
        proc.wait()


class Serve:
    """`streamguard serve` in a subprocess (cluster mode when nats_url is given)."""

    def __init__(self, tmp: Path, name: str, nats_url: str | None, cluster: dict[str, Any] | None = None) -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings: dict[str, Any] = {"port": self.port, "data_dir": str(self.dir / "data"), "log_level": "warning",
                                    "events": {"publish_scores": True}}
        if nats_url:
            settings["cluster"] = {"nats_url": nats_url, "instance_id": name, **(cluster or {})}
        (self.dir / "config.yaml").write_text(yaml.safe_dump(settings))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_")}
        exe = Path(sys.executable).parent / "streamguard"
        self.proc = subprocess.Popen([str(exe), "serve", "--config", str(self.dir / "config.yaml")], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"))  # noqa: SIM115
        return self

    async def ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {(self.dir / 'stderr.log').read_text()[-1500:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.url + "/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError("serve not ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def hub_node(nats_url: str, name: str, data: Path) -> AsyncIterator[Any]:
    """An instance's event hub alone (no model): its own NATS connection, log publisher and store."""
    from pydantic import SecretStr

    from streamguard.cluster.evidence import EvidenceBucket
    from streamguard.cluster.hub import ClusterHub
    from streamguard.cluster.link import NatsLink
    from streamguard.cluster.log import EventLog
    from streamguard.config import ClusterSettings
    from streamguard.events.store import EventStore

    settings = ClusterSettings(nats_url=SecretStr(nats_url), instance_id=name)
    link = NatsLink(settings, lambda _c, _r: None)
    await link.connect()
    log = EventLog(link, settings)
    evidence = EvidenceBucket(link, settings)
    await log.open(0, 0)
    await evidence.open(0)
    store = EventStore(data / name / "events.sqlite3")
    hub = ClusterHub(store, log=log, link=link, evidence=evidence, flush_timeout_s=10)
    publisher = asyncio.create_task(log.run())
    await hub.follow()
    try:
        yield hub
    finally:
        await hub.close()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await link.close()
        store.close()


def draft(n: int) -> Any:
    from streamguard.events.schema import EventDraft, EventType

    return EventDraft(EventType.PARTICIPANT_SCORE, "cam", "cam/p1",
                      {"p_fake": 0.1, "smoothed": 0.1, "samples": n % 10 + 1, "state": "ok"}, ts=time.time())


# --- measurements ----------------------------------------------------------------------------------------------------


async def bench_log(tmp: Path, events: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with nats_server(tmp / "log1") as (url, _):
        async with hub_node(url, "a", tmp / "log1") as a:
            t0 = time.perf_counter()
            await asyncio.gather(*(a.publish_nowait(draft(n)) for n in range(events)))
            out["one_instance_events_per_s"] = events / (time.perf_counter() - t0)
    with nats_server(tmp / "log3") as (url, _):
        async with hub_node(url, "a", tmp / "log3") as a, hub_node(url, "b", tmp / "log3") as b, \
                hub_node(url, "c", tmp / "log3") as c:
            per = events // 3
            t0 = time.perf_counter()
            await asyncio.gather(*(h.publish_nowait(draft(n)) for h in (a, b, c) for n in range(per)))
            while min(h.materialised_seq for h in (a, b, c)) < 3 * per:  # every store holds all of them
                await asyncio.sleep(0.005)
            out["three_instances_events_per_s"] = 3 * per / (time.perf_counter() - t0)
    return out


async def bench_latency(tmp: Path, events: int, rate: float) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    with nats_server(tmp / "lat") as (url, _):
        b = Serve(tmp / "lat", "b", url).start()
        try:
            await b.ready()
            async with hub_node(url, "a", tmp / "lat") as a, connect(b.url.replace("http", "ws") + "/v1/events") as ws:
                got: list[float] = []

                async def read() -> None:
                    async for message in ws:
                        event = json.loads(message)
                        if event.get("type") == "participant.score":
                            got.append(time.time() - event["ts"])
                            if len(got) == events:
                                return

                reader = asyncio.create_task(read())
                for n in range(events):
                    a.publish_nowait(draft(n))
                    await asyncio.sleep(1 / rate)
                await asyncio.wait_for(reader, 30)
        finally:
            b.stop()
    got.sort()
    return {"events": events, "rate_per_s": rate, "p50_ms": 1000 * got[len(got) // 2],
            "p95_ms": 1000 * got[int(len(got) * 0.95)], "max_ms": 1000 * got[-1]}


async def bench_failover(tmp: Path, runs: int, cluster: dict[str, Any]) -> dict[str, Any]:
    times: list[float] = []
    with nats_server(tmp / "fo") as (url, _), rtsp_server(tmp, 4) as cams:
        nodes = {n: Serve(tmp / "fo", n, url, cluster).start() for n in ("sg-1", "sg-2")}
        try:
            await asyncio.gather(*(n.ready() for n in nodes.values()))
            async with httpx.AsyncClient(timeout=10) as http:
                for i, cam in enumerate(cams):
                    await http.post(nodes["sg-1"].url + "/v1/streams", json={"id": f"cam-{i}", "url": cam})
                for _ in range(runs):
                    times.append(await _one_failover(http, nodes))
        finally:
            for n in nodes.values():
                n.stop()
    return {"runs": len(times), "min_s": min(times), "median_s": statistics.median(times), "max_s": max(times),
            **cluster}


async def _one_failover(http: httpx.AsyncClient, nodes: dict[str, Serve]) -> float:
    async def listed(via: str) -> list[dict[str, Any]]:
        return list((await http.get(nodes[via].url + "/v1/streams")).json())

    while not all(s["state"] == "live" for s in await listed("sg-1")):
        await asyncio.sleep(0.2)
    await asyncio.sleep(3)  # every instance's state heard by the other
    owned = {s["id"] for s in await listed("sg-1") if s["instance"] == "sg-2"}
    victim, survivor = ("sg-2", "sg-1") if owned else ("sg-1", "sg-2")
    moved = owned or {s["id"] for s in await listed("sg-1") if s["instance"] == "sg-1"}
    t0 = time.monotonic()
    nodes[victim].kill()
    while True:
        now = {s["id"]: s for s in await listed(survivor)}
        if all(now[sid]["instance"] == survivor and now[sid]["state"] == "live" for sid in moved):
            took = time.monotonic() - t0
            break
        await asyncio.sleep(0.1)
    nodes[victim].start()
    await nodes[victim].ready()
    return took


async def bench_overhead(tmp: Path, seconds: float, streams: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with rtsp_server(tmp, streams) as cams:
        out["single"] = await _cpu_of(tmp / "single", None, cams, seconds)
        with nats_server(tmp / "oh") as (url, nats):
            t0 = cpu_seconds(nats.pid)
            out["cluster"] = await _cpu_of(tmp / "cluster", url, cams, seconds)
            out["nats_server_cores"] = (cpu_seconds(nats.pid) - t0) / (seconds + out["cluster"].pop("setup_s"))
    out["single"].pop("setup_s")
    out["extra_cores"] = out["cluster"]["cores"] - out["single"]["cores"]
    out["extra_rss_mb"] = out["cluster"]["rss_mb"] - out["single"]["rss_mb"]
    return out


async def _cpu_of(tmp: Path, nats_url: str | None, cams: list[str], seconds: float) -> dict[str, float]:
    t_setup = time.monotonic()
    node = Serve(tmp, "sg", nats_url).start()
    try:
        await node.ready()
        async with httpx.AsyncClient(timeout=10) as http:
            for i, cam in enumerate(cams):
                await http.post(node.url + "/v1/streams", json={"id": f"cam-{i}", "url": cam})
            await asyncio.sleep(8)  # warm up: streams live, participants joined
            assert node.proc is not None
            c0, w0 = cpu_seconds(node.proc.pid), time.monotonic()
            setup = w0 - t_setup
            await asyncio.sleep(seconds)
            cores = (cpu_seconds(node.proc.pid) - c0) / (time.monotonic() - w0)
            return {"cores": cores, "rss_mb": rss_mb(node.proc.pid), "streams": len(cams), "setup_s": setup}
    finally:
        node.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="log,latency,failover,overhead")
    ap.add_argument("--events", type=int, default=6000, help="events for the log throughput")
    ap.add_argument("--latency-events", type=int, default=600)
    ap.add_argument("--rate", type=float, default=50.0, help="events/s for the latency run")
    ap.add_argument("--runs", type=int, default=3, help="failover runs")
    ap.add_argument("--ttl", type=float, default=None, help="cluster.lease_ttl_s for failover (default: the default)")
    ap.add_argument("--seconds", type=float, default=30.0, help="overhead measuring window")
    ap.add_argument("--streams", type=int, default=4, help="RTSP cameras in the overhead runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    results: dict[str, Any] = {"loadavg": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as d:
        tmp = Path(d)
        if "log" in only:
            results["log"] = await bench_log(tmp, args.events)
            print("log:", results["log"], flush=True)
        if "latency" in only:
            results["latency"] = await bench_latency(tmp, args.latency_events, args.rate)
            print("latency:", results["latency"], flush=True)
        if "failover" in only:
            cluster = {"lease_ttl_s": args.ttl, "heartbeat_s": min(1.0, args.ttl / 4)} if args.ttl else {}
            results["failover"] = await bench_failover(tmp, args.runs, cluster)
            print("failover:", results["failover"], flush=True)
        if "overhead" in only:
            results["overhead"] = await bench_overhead(tmp, args.seconds, args.streams)
            print("overhead:", results["overhead"], flush=True)
    results["loadavg_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
