// Which sender limits headless Chromium honours when it publishes to the StreamGuard WHIP endpoint.
//
//   node sender_caps.mjs --url http://127.0.0.1:PORT/ --cases '[{"codec":"VP8","height":720,"cap":false}, ...]'
//       [--chromium /usr/bin/chromium] [--seconds 6] [--warmup 3] [--chromium-args "..."]
//
// For each case: a fake camera at 30 fps (width = height * 16 / 9), a peer connection publishing it over WHIP with
// the codec forced (setCodecPreferences); with "cap": true the sender gets maxFramerate / scaleResolutionDownBy by
// RTCRtpSender.setParameters, exactly as the console's "monitor my camera" does (capFps, capHeight); with
// "keepResolution": true, degradationPreference "maintain-resolution" (see below). After a warm-up
// it measures, over --seconds, what the browser sent (outbound-rtp framesSent, frameWidth/Height) and what the
// server decoded (streamguard_frames_decoded_total{kind="webrtc"} from /metrics: only this session publishes), the
// keyframes it sent and the PLIs it was sent (outbound-rtp keyFramesEncoded, pliCount), its bitrate, and the
// server's decode_mode for the stream (/v1/streams), then DELETEs the session.
// Prints one JSON line: {"ok": true, "results": [...]}.
import { chromium } from "playwright-core";

function arg(name, fallback) {
  const i = process.argv.indexOf("--" + name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const url = arg("url");
const cases = JSON.parse(arg("cases", "[]"));
const seconds = Number(arg("seconds", "6"));
const warmup = Number(arg("warmup", "3"));
const chromiumPath = arg("chromium", "/usr/bin/chromium");
const extraArgs = (arg("chromium-args", "") || "").split(" ").filter(Boolean);

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream=fps=30",
    "--disable-background-networking", "--disable-component-update", "--no-first-run", ...extraArgs],
});
const out = { ok: false, results: [] };
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(url, { waitUntil: "load" });
  for (const c of cases) {
    const r = await page.evaluate(async ({ c, seconds, warmup }) => {
      const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
      const decoded = async () => {
        const text = await (await fetch("/metrics")).text();
        const m = text.match(/^streamguard_frames_decoded_total\{kind="webrtc"\} ([0-9.e+]+)$/m);
        return m ? Number(m[1]) : 0;
      };
      const height = c.height, width = Math.round(height * 16 / 9);
      const media = await navigator.mediaDevices.getUserMedia({
        video: { width: { exact: width }, height: { exact: height }, frameRate: { exact: 30 } }, audio: false });
      const track = media.getVideoTracks()[0];
      const pc = new RTCPeerConnection({ iceServers: [] });
      const tr = pc.addTransceiver(track, { direction: "sendonly", streams: [media] });
      const codecs = RTCRtpSender.getCapabilities("video").codecs;
      tr.setCodecPreferences(codecs.filter((k) => k.mimeType === "video/" + c.codec || k.mimeType === "video/rtx"));
      let setParameters = null;
      if (c.cap || c.keepResolution) {
        const params = tr.sender.getParameters();
        if (!params.encodings?.length) params.encodings = [{}];
        if (c.cap) {
          params.encodings[0].maxFramerate = c.capFps ?? 5;
          params.encodings[0].scaleResolutionDownBy = Math.max(1, height / (c.capHeight ?? 720));
        }
        // The loopback link's bandwidth estimate (aiortc's REMB) keeps Chromium at 640x360 whatever the camera;
        // holding the resolution shows which resolution limits it follows.
        if (c.keepResolution) params.degradationPreference = "maintain-resolution";
        try { await tr.sender.setParameters(params); setParameters = "ok"; } catch (e) { setParameters = String(e); }
      }
      await pc.setLocalDescription(await pc.createOffer());
      for (let i = 0; i < 30 && pc.iceGatheringState !== "complete"; i++) await sleep(100);
      const res = await fetch("/v1/whip?participant_id=caps-" + Math.random().toString(36).slice(2, 8), {
        method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp });
      if (res.status !== 201) return { error: `WHIP ${res.status}: ${await res.text()}` };
      const session = new URL(res.headers.get("Location"), window.location.href).toString();
      const answer = await res.text();
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
      const sent = async () => {
        const stats = await pc.getStats();
        return [...stats.values()].find((s) => s.type === "outbound-rtp" && s.kind === "video") || {};
      };
      for (let i = 0; i < 100 && pc.connectionState !== "connected"; i++) await sleep(100);
      await sleep(warmup * 1000);  // warm-up: bandwidth estimation ramps the resolution up
      const s0 = await sent(), d0 = await decoded(), t0 = performance.now();
      await sleep(seconds * 1000);
      const s1 = await sent(), d1 = await decoded(), dt = (performance.now() - t0) / 1000;
      const streams = await (await fetch("/v1/streams")).json();
      const serverMode = streams.find((s) => s.kind === "webrtc")?.decode_mode ?? null;
      const fmtp = answer.split("\r\n").filter((l) => l.startsWith("a=fmtp:") && /max-/.test(l));
      pc.close();
      track.stop();
      await fetch(session, { method: "DELETE" });
      await sleep(500);
      return {
        ...c, connection: "connected", setParameters, answerHints: fmtp,
        sentFps: (s1.framesSent - s0.framesSent) / dt, encoderFps: s1.framesPerSecond ?? null,
        sentSize: `${s1.frameWidth}x${s1.frameHeight}`, limitation: s1.qualityLimitationReason ?? null,
        encoder: s1.encoderImplementation ?? null, serverFps: (d1 - d0) / dt, serverMode,
        keyFps: (s1.keyFramesEncoded - s0.keyFramesEncoded) / dt, pliPerS: (s1.pliCount - s0.pliCount) / dt,
        sentKbps: (8 * (s1.bytesSent - s0.bytesSent)) / dt / 1000,
      };
    }, { c, seconds, warmup });
    out.results.push(r);
  }
  out.ok = out.results.every((r) => !r.error);
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
  console.log(JSON.stringify(out));
}
