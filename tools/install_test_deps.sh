#!/usr/bin/env bash
# System packages the test suite drives as real parts: GStreamer's RTSP server (run with Debian's python3),
# FFmpeg, Prometheus (+ promtool), coturn's turnserver (WHIP through a TURN relay), Chromium for the console test,
# NATS (nats-server, run with -js by the cluster tests), and Playwright's driver from npm.
# Idempotent and quick when everything is there already. Needs root (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav ffmpeg prometheus coturn chromium nats-server)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian's prometheus and nats-server packages start system instances; the tests run their own.
    (service prometheus stop || systemctl stop prometheus || pkill -x prometheus) >/dev/null 2>&1 || true
    (service nats-server stop || systemctl stop nats-server) >/dev/null 2>&1 || true
  else
    echo "install_test_deps: not root, skipping apt packages: ${missing[*]} (their tests will skip)" >&2
  fi
fi
if [ -f tests/browser/package.json ] && command -v npm >/dev/null && [ ! -d tests/browser/node_modules ]; then
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi
