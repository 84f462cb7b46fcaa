#!/usr/bin/env python
"""Measure models on the shared real data with the project's own `scan`/`eval` code, side by side.

    python tools/model_report.py                  # the default model and the MesoNet authors' DF models
    python tools/model_report.py --model streamguard-sbi --update-card --markdown out/model-report.md

Each set goes through `streamguard.evaluate.evaluate` (the `streamguard eval` command's code: the same Scanner as
`streamguard scan`, default settings, the model card's threshold and crop margin):

- `ffpp`: the FaceForensics++ c23 pair (real_519, its Deepfakes fake): file verdicts and face-level AUC at 1 FPS;
- `dfdc_videos`: the two DFDC fake videos: file verdicts;
- `dfdc_crops`: the 22 DFDC face crops (11 fake, 11 real), faces re-detected and cut as each model expects: AUC;
- `real_photos`: the 64 real photos: how many files are called fake (file level) and the per-face rate;
- `talking_heads`: the 8 real talking-head clips: how many are called fake;
- `mesonet_crops`: MesoNet's 4 aligned crops, scored as crops (`--images-are-crops`): AUC.

The ffpp pair and the DFDC material are validation only: nothing in training or calibration looks at them.
MesoNet models are imported from ../shared/data/mesonet into a temporary folder (never into engines/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamguard.evaluate import LabelledFile, Metrics, evaluate, load_labels  # noqa: E402
from streamguard.inference.classifier import Classifier  # noqa: E402
from streamguard.inference.importers.mesonet import Arch  # noqa: E402
from streamguard.inference.models import ENGINES_DIR, load_classifier  # noqa: E402
from streamguard.scan import Scanner, ScanSettings, expand_paths  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MESONET: dict[str, tuple[str, Arch]] = {
    "mesonet-meso4-df": ("Meso4_DF.h5", "meso4"), "mesonet-inception-df": ("MesoInception_DF.h5", "mesoinception"),
}


def labelled_sets(shared: Path) -> dict[str, tuple[list[LabelledFile], bool]]:
    """name → (labelled files, images are aligned crops)."""
    def real(folder: Path) -> list[LabelledFile]:
        return [LabelledFile(path=p, label=0) for p in expand_paths([folder])]

    sets: dict[str, tuple[list[LabelledFile], bool]] = {
        "ffpp": (load_labels(shared / "ffpp_smoke"), False),
        "dfdc_videos": ([LabelledFile(path=p, label=1)
                         for p in sorted((shared / "dfdc_sample" / "train_sample_videos").glob("*.mp4"))], False),
        "dfdc_crops": (load_labels(shared / "dfdc_sample" / "prepared_dataset"), False),
        "real_photos": (real(shared / "real_faces"), False),
        "talking_heads": (real(shared / "talking_heads"), False),
        "mesonet_crops": (load_labels(shared / "mesonet" / "test_images"), True),
    }
    return {k: v for k, v in sets.items() if v[0]}


def _interval(metrics: Metrics | None) -> list[float] | None:
    """The AUC's 95 % bootstrap interval, rounded (null without both classes)."""
    if metrics is None or metrics.auc_ci95 is None:
        return None
    return [round(v, 3) for v in metrics.auc_ci95]


def _auc_cell(result: dict, level: str) -> str:
    auc, ci = result.get(f"{level}_auc"), result.get(f"{level}_auc_ci95")
    return f"{auc} [{ci[0]:.2f}, {ci[1]:.2f}]" if auc is not None and ci else str(auc)


def measure(classifier: Classifier, items: list[LabelledFile], crops: bool) -> dict:
    scanner = Scanner(classifier, ScanSettings(images_are_crops=crops))
    try:
        report, _ = evaluate(scanner, items)
    finally:
        scanner.close()
    t = report.threshold
    scored = [r for r in report.rows if r["score"] is not None]
    out: dict = {
        "files": len(items),
        "scored_files": len(scored),
        "no_face": report.no_face,
        "errors": report.errors,
        "fakes_called_fake": f"{sum(r['score'] >= t for r in scored if r['label'] == 'fake')}/"
                             f"{sum(r['label'] == 'fake' for r in report.rows)}",
        "reals_called_fake": f"{sum(r['score'] >= t for r in scored if r['label'] == 'real')}/"
                             f"{sum(r['label'] == 'real' for r in report.rows)}",
        "file_auc": None if report.files is None or report.files.auc is None else round(report.files.auc, 4),
        "file_auc_ci95": _interval(report.files),
        "face_auc": None if report.faces is None or report.faces.auc is None else round(report.faces.auc, 4),
        "face_auc_ci95": _interval(report.faces),
        "face_fpr": None if report.faces is None or report.faces.fpr is None else round(report.faces.fpr, 4),
        "face_tpr": None if report.faces is None or report.faces.tpr is None else round(report.faces.tpr, 4),
    }
    if len(items) <= 12:  # small sets: every file's score, for the card and the README
        out["scores"] = {Path(r["path"]).name: None if r["score"] is None else round(r["score"], 4)
                         for r in report.rows}
    return out


def mesonet_models(folder: Path, shared: Path) -> dict[str, Path]:
    from streamguard.inference.importers import import_mesonet

    out = {}
    for name, (h5, arch) in MESONET.items():
        src = shared / "mesonet" / "weights" / h5
        if src.is_file():
            out[name] = import_mesonet(src, arch, output=folder / f"{name}.onnx", name=name)[0]
    return out


def markdown(results: dict[str, dict]) -> str:
    def row(name: str, r: dict) -> str:
        f, dv, dc, ph, th, mc = (r.get(k, {}) for k in ("ffpp", "dfdc_videos", "dfdc_crops", "real_photos",
                                                       "talking_heads", "mesonet_crops"))
        ffs = f.get("scores", {})
        return (f"| {name} | {r['threshold']:.2f} | {f.get('face_auc')} | {ffs.get('fake_deepfakes_519_515.mp4')} / "
                f"{ffs.get('real_519.mp4')} | {dv.get('fakes_called_fake')} | {_auc_cell(dc, 'file')} | "
                f"{ph.get('reals_called_fake')} | {th.get('reals_called_fake')} | {_auc_cell(mc, 'file')} |")

    head = ("| model | threshold | FF++ pair face AUC | FF++ file score fake / real | DFDC fake videos called fake | "
            "DFDC crops AUC [95 % interval] | real photos called fake | talking heads called fake | "
            "MesoNet crops AUC [95 % interval] |\n"
            "|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(row(n, r) for n, r in results.items())]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model name or ONNX path (repeatable; default: the default model)")
    p.add_argument("--no-mesonet", action="store_true", help="leave the MesoNet authors' models out")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    p.add_argument("--sets", help="comma-separated subset of the sets")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the comparison table here")
    p.add_argument("--update-card", action="store_true",
                   help="store the first model's results in its card's metrics (key 'evaluation')")
    args = p.parse_args(argv)
    if not args.shared.is_dir():
        p.error(f"--shared: {args.shared} is not a folder (see ../shared/data/README.md for the sets)")
    sets = labelled_sets(args.shared)
    if args.sets:
        wanted = set(args.sets.split(","))
        if unknown := wanted - set(sets):
            p.error(f"--sets: unknown {sorted(unknown)}; choose from {sorted(sets)}")
        sets = {k: v for k, v in sets.items() if k in wanted}

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {m: m for m in (args.model or [None])}
        if not args.no_mesonet:
            models.update({n: str(path) for n, path in mesonet_models(Path(tmp), args.shared).items()})
        for label, ref in models.items():
            classifier = load_classifier(ref)
            name = classifier.card.name if label is None else Path(str(label)).stem
            results[name] = {"threshold": classifier.card.threshold}
            for set_name, (items, crops) in sets.items():
                results[name][set_name] = measure(classifier, items, crops)
                print(f"{name} {set_name}: {json.dumps(results[name][set_name])}", flush=True)
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    if args.update_card:
        first = args.model[0] if args.model else None
        update_card(first, results[next(iter(results))])
    return 0


def update_card(model: str | None, result: dict) -> None:
    from streamguard.inference.models import resolve_model

    onnx_path, card = resolve_model(model, ENGINES_DIR)
    card.metrics["evaluation"] = {
        "what": "tools/model_report.py: streamguard eval/scan code, default settings, this card's threshold; ffpp "
                "and DFDC are validation only (never trained or calibrated on)",
        **{k: v for k, v in result.items() if k != "threshold"},
    }
    card.save(onnx_path.with_suffix(".json"))


if __name__ == "__main__":
    raise SystemExit(main())
