#!/usr/bin/env python
"""What an alert's heatmap costs and shows: the model's own artefact map against an occlusion map, on the most
suspicious face of each file (found with the scan code), back to back in one process.

    python tools/bench_heatmap.py ../shared/data/ffpp_smoke/*.mp4
    python tools/bench_heatmap.py clip.mp4 --model mesonet4-df --runs 3

Per file and method: wall ms p50 / max over `--runs` (one core for the model map, as the service runs it; the
classifier's own threads for occlusion), the map's peak, and the share of the map's mass in the crop's central half
(the face at the default margin; the rest is hair, neck and background). The service stores this heatmap before it
publishes the alert, so its wall time is added to the time to alert.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamguard.inference.heatmap import Heatmapper, ModelMap, OcclusionMap  # noqa: E402
from streamguard.inference.models import load_classifier, resolve_model  # noqa: E402
from streamguard.scan import Scanner  # noqa: E402


def measure(heatmapper: Heatmapper, crop: np.ndarray, runs: int) -> dict:
    times, heat = [], np.zeros(crop.shape[:2], np.float32)
    for _ in range(runs):
        t = time.perf_counter()
        heat = heatmapper(crop)
        times.append((time.perf_counter() - t) * 1000.0)
    h, w = heat.shape
    total = float(heat.sum())
    centre = float(heat[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].sum())
    return {"method": heatmapper.method, "ms_p50": round(float(np.median(times)), 1), "ms_max": round(max(times), 1),
            "peak": round(float(heat.max()), 3), "centre_share": round(centre / total, 3) if total > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="videos or images")
    ap.add_argument("--model", default=None, help="a model name in engines/ or an ONNX path (default model)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    classifier = load_classifier(args.model)
    onnx_path = resolve_model(args.model)[0]
    methods: list[Heatmapper] = [OcclusionMap(classifier)]
    if ModelMap.has_map(onnx_path):
        methods.insert(0, ModelMap(onnx_path, classifier.card))
    else:
        print(f"{classifier.card.name}: its graph has no fake_map output, occlusion only", file=sys.stderr)
    scanner = Scanner(classifier)
    try:
        for path in args.files:
            for person, (p_fake, crop) in scanner.scan(path).evidence.items():
                rows = [measure(m, crop, args.runs) for m in methods]
                print(json.dumps({"file": path.name, "participant": person, "p_fake": round(p_fake, 3),
                                  "crop": list(crop.shape[:2]), "maps": rows}))
    finally:
        scanner.close()


if __name__ == "__main__":
    main()
