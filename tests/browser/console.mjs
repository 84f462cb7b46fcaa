// Drives the StreamGuard console in Debian's headless Chromium with a fake camera playing a real face video.
//
//   node console.mjs --url http://127.0.0.1:PORT/ --video face.y4m --screenshot out.png [--token T] [--timeout 90]
//
// Steps (each failure exits 1 with the step named; the last screenshot is written either way):
//   1. open the console; if --token is given the server wants one: answer the token dialog
//   2. click "Monitor my camera" (WHIP publish of the fake camera)
//   3. wait until our participant shows scores (samples >= 1, a smoothed score, a sparkline)
//   3b. take the camera's track off its sender (the connection stays up): the stream and its participant must read
//      "no frames" (not "no face"); put it back and see frames again
//   4. drop the event WebSocket for a few seconds (the route refuses reconnects meanwhile) and check the console
//      reconnects with since=<last seq>, and that the seqs it received have no gap across the outage
//   5. wait until an alert is in the feed with both evidence images loaded
//   6. screenshot; click "Stop monitoring" and check the WHIP session was DELETEd
//   7. our alert, now cleared (we left), still names us by our display name
// Prints one JSON line of results on stdout.
import { chromium } from "playwright-core";

function arg(name, fallback) {
  const i = process.argv.indexOf("--" + name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const url = arg("url");
const video = arg("video");
const shot = arg("screenshot", "console.png");
const token = arg("token", null);
const timeoutMs = Number(arg("timeout", "90")) * 1000;
const chromiumPath = arg("chromium", "/usr/bin/chromium");
const dropMs = Number(arg("drop-ms", "4000"));
// whose alert to wait for: "mine" (the fake camera's participant) or "any" (also the pulled file's)
const alertOf = arg("alert-of", "mine");
const extraArgs = (arg("chromium-args", "") || "").split(" ").filter(Boolean);
if (!url || !video) {
  console.error("usage: node console.mjs --url URL --video FILE.y4m [--screenshot PNG] [--token T]");
  process.exit(2);
}

const t0 = Date.now();
const result = { steps: {}, wsUrls: [], whip: [], console: [] };
const mark = (step) => { result.steps[step] = (Date.now() - t0) / 1000; };

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    `--use-file-for-fake-video-capture=${video}`,
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    ...extraArgs,
  ],
});
let page;
let step = "launch";
try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
  page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") result.console.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => result.console.push("pageerror: " + e.message));
  page.on("request", (r) => { if (r.url().includes("/v1/whip")) result.whip.push(`${r.method()} ${new URL(r.url()).pathname}`); });

  // The event feed goes through a route so the test can cut it and refuse reconnects for a while: a real outage
  // as the page sees it (close, backoff, reconnect), with the server untouched.
  let holdUntil = 0;
  const live = [];
  await page.routeWebSocket(/\/v1\/events/, (ws) => {
    result.wsUrls.push(ws.url());
    if (Date.now() < holdUntil) { ws.close({ code: 4000, reason: "test: outage" }); return; }
    ws.connectToServer();
    live.push(ws);
  });

  step = "open";
  await page.goto(url, { waitUntil: "load", timeout: timeoutMs });
  if (token) {
    await page.waitForSelector("#tokenDialog[open]", { timeout: 15000 });
    await page.fill("#tokenInput", token);
    await page.click("#tokenDialog button[type=submit]");
    result.tokenDialog = true;
  }
  await page.waitForFunction(() => window.streamguard && window.streamguard.feed === "live", null, { timeout: 20000 });
  mark("opened");

  step = "monitor";
  await page.fill("#camName", "Console test");
  await page.click("#monitor");
  await page.waitForFunction(() => document.querySelector("#camState")?.textContent === "live", null, { timeout: 30000 });
  mark("camera_live");
  // which addresses the media flows between (host candidates: the machine's interface, or loopback)
  result.icePair = await page.evaluate(async () => {
    for (let i = 0; i < 50; i++) {
      const stats = await window.streamguard.camera.pc.getStats();
      const byId = new Map([...stats.values()].map((s) => [s.id, s]));
      const transport = [...stats.values()].find((s) => s.type === "transport" && s.selectedCandidatePairId);
      const pair = transport && byId.get(transport.selectedCandidatePairId);
      if (pair) {
        const l = byId.get(pair.localCandidateId), r = byId.get(pair.remoteCandidateId);
        return `${l.address}:${l.port} (${l.candidateType}) -> ${r.address}:${r.port} (${r.candidateType})`;
      }
      await new Promise((done) => setTimeout(done, 100));
    }
    return null;
  });

  step = "participant scores";
  await page.waitForFunction(() => {
    const cam = window.streamguard.camera;
    if (!cam) return false;
    const el = document.querySelector(`.stream[data-stream="${cam.streamId}"] .part[data-participant="${cam.participantId}"]`);
    return el && Number(el.dataset.samples) >= 1 && el.querySelector(".spark circle") && !el.querySelector(".score").textContent.startsWith("–");
  }, null, { timeout: timeoutMs, polling: 250 });
  mark("participant_scored");

  step = "no frames";
  // The camera stops sending while the peer connection stays up (a frozen publisher): after scoring.stale_after_s
  // the console must say the stream delivers no frames, and the participant "no frames", not "no face".
  await page.evaluate(() => {
    window.camCard = () => {  // our stream's card and our participant in it
      const cam = window.streamguard.camera;
      const card = document.querySelector(`.stream[data-stream="${cam.streamId}"]`);
      return { card, part: card?.querySelector(`.part[data-participant="${cam.participantId}"]`) };
    };
    return window.streamguard.camera.pc.getSenders()[0].replaceTrack(null);
  });
  await page.waitForFunction(() => {
    const { card, part } = window.camCard();
    return card?.querySelector('.badge[data-receiving="false"]') && part?.dataset.state === "no_frames";
  }, null, { timeout: 30000, polling: 250 });
  result.noFrames = await page.evaluate(() => {
    const { card, part } = window.camCard();
    return { stream: card.querySelector('.badge[data-receiving]').textContent, participant: part.querySelector(".badge").textContent };
  });
  mark("no_frames_shown");
  await page.evaluate(() => {
    const cam = window.streamguard.camera;
    return cam.pc.getSenders()[0].replaceTrack(cam.media.getVideoTracks()[0]);
  });
  await page.waitForFunction(() => {
    const { card, part } = window.camCard();
    return card?.querySelector('.badge[data-receiving="true"]') && part && part.dataset.state !== "no_frames";
  }, null, { timeout: 30000, polling: 250 });
  mark("frames_again");

  step = "feed outage";
  const seqBefore = await page.evaluate(() => window.streamguard.lastSeq);
  holdUntil = Date.now() + dropMs;
  const opened = result.wsUrls.length;
  for (const ws of live.splice(0)) ws.close({ code: 4000, reason: "test: outage" });
  await page.waitForFunction((n) => window.streamguard.feed === "live" && window.streamguard.reconnects >= 1, opened, { timeout: dropMs + 30000, polling: 200 });
  mark("feed_resumed");
  const resumeUrls = result.wsUrls.slice(opened);
  result.resume = { seqBefore, urls: resumeUrls.length };
  const finalUrl = new URL(resumeUrls[resumeUrls.length - 1]);
  const since = finalUrl.searchParams.get("since");
  if (since === null || Number(since) < seqBefore) throw new Error(`reconnected without since>=${seqBefore}: ${finalUrl}`);
  if (resumeUrls.length < 2) throw new Error(`expected refused reconnects during the outage, got ${resumeUrls.length} attempts`);

  step = "alert with evidence";
  await page.waitForFunction((alertOf) => {
    const cam = window.streamguard.camera;
    const alert = [...document.querySelectorAll("#alerts .alert-card")].find((el) => {
      const a = window.streamguard.alerts.get(el.dataset.alertId);
      return a && cam && (alertOf === "any" || a.participant_id === cam.participantId);
    });
    if (!alert) return false;
    const imgs = [...alert.querySelectorAll(".evidence img")];
    return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, alertOf, { timeout: timeoutMs, polling: 250 });
  mark("alert_shown");
  // let the next poll paint the participant in its alert state
  await page.waitForTimeout(1200);

  const state = await page.evaluate(() => {
    const s = window.streamguard;
    const r = s.received;
    let gaps = 0;
    for (let i = 1; i < r.length; i++) if (r[i] !== r[i - 1] + 1) gaps++;
    return { lastSeq: s.lastSeq, received: r.length, firstSeq: r[0], gaps, reconnects: s.reconnects,
             alerts: [...s.alerts.values()].map((a) => ({ id: a.alert_id, participant: a.participant_id, evidence: a.evidence, seq: a.raised_seq,
                                                          face_px: a.face_px, nums: document.querySelector(`[data-alert-id="${a.alert_id}"] .nums`)?.textContent })),
             participants: s.participants.map((p) => ({ id: p.id, state: p.state, samples: p.samples, smoothed: p.smoothed })) };
  });
  Object.assign(result, state);
  if (state.gaps) throw new Error(`the event seqs received have ${state.gaps} gap(s): events were lost across the reconnect`);

  step = "screenshot";
  await page.screenshot({ path: shot, fullPage: false });
  mark("screenshot");

  step = "stop";
  const myId = await page.evaluate(() => window.streamguard.camera.participantId);
  await page.click("#monitor");
  await page.waitForFunction(() => !window.streamguard.camera && document.querySelector("#camState").textContent === "stopped", null, { timeout: 10000 });
  await page.waitForTimeout(300);
  if (!result.whip.some((w) => w.startsWith("DELETE /v1/whip/"))) throw new Error("no DELETE of the WHIP session");
  mark("stopped");

  step = "cleared alert names the participant";
  // We left, so our alert is cleared and we are gone from the participant list: the card keeps our display name.
  await page.waitForFunction((pid) => [...document.querySelectorAll("#alerts .alert-card")].some((el) => {
    const a = window.streamguard.alerts.get(el.dataset.alertId);
    return a && a.participant_id === pid && a.cleared_ts && !window.streamguard.participants.some((p) => p.id === pid)
      && el.querySelector(".who").textContent.includes("Console test");
  }), myId, { timeout: 20000, polling: 250 });
  result.clearedWho = await page.evaluate((pid) => {
    const el = [...document.querySelectorAll("#alerts .alert-card")].find((e) => window.streamguard.alerts.get(e.dataset.alertId)?.participant_id === pid);
    return el.querySelector(".who").textContent;
  }, myId);
  mark("cleared_named");
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.failedStep = step;
  result.error = String(e && e.message || e).split("\n")[0];
  if (page) await page.screenshot({ path: shot }).catch(() => {});
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
