"""`streamguard scan` and `eval` end to end on real media, through the real CLI."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.inference.importers.mesonet import import_mesonet
from streamguard.inference.models import load_classifier
from streamguard.scan import Scanner, ScanSettings

runner = CliRunner()


def plain(output: str) -> str:
    """CLI output with rich's panel borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def meso4(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "meso4-df.onnx"
    import_mesonet(shared_data / "mesonet" / "weights" / "Meso4_DF.h5", "meso4", output=out)
    return out


@pytest.fixture(scope="module")
def scanner(meso4):
    s = Scanner(load_classifier(str(meso4)))
    yield s
    s.close()


@pytest.mark.parametrize("name", ["real_519.mp4", "fake_deepfakes_519_515.mp4"])
def test_ffpp_videos_have_one_participant_with_enough_samples(scanner, shared_data, name):
    report = scanner.scan(shared_data / "ffpp_smoke" / name).report
    assert report.error is None
    assert report.verdict.value in ("real", "fake")
    assert 29 <= report.sampled_frames <= 31  # 30 s at 1 FPS
    assert len(report.participants) == 1
    person = report.participants[0]
    assert person.samples >= 25
    assert person.samples + person.low_quality <= report.sampled_frames
    assert 0.01 <= report.score <= 0.99
    assert len(person.sample_scores) == person.samples
    assert person.face_px is not None and 70 <= person.face_px <= 110  # the anchor's face in 640x480 (~85 px)


def test_image_with_several_people_has_several_participants(scanner, shared_data):
    report = scanner.scan(shared_data / "real_faces" / "selfie-many-people.jpg").report
    assert report.kind == "image"
    assert len(report.participants) >= 3
    assert all(p.samples + p.low_quality == 1 for p in report.participants)


def test_image_without_face_is_no_face(scanner, tmp_path):
    empty = tmp_path / "wall.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(empty), cv2.GaussianBlur(rng.integers(0, 255, (360, 480, 3), np.uint8), (0, 0), 5))
    report = scanner.scan(empty).report
    assert report.verdict.value == "no_face"
    assert report.score is None and report.participants == []


def test_folder_scan_survives_bad_files(meso4, shared_data, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.mp4").write_text("this is not a video")
    (folder / "truncated.jpg").write_bytes((shared_data / "real_faces" / "img1.jpg").read_bytes()[:200])
    good = folder / "img2.jpg"
    good.write_bytes((shared_data / "real_faces" / "img2.jpg").read_bytes())
    (tmp_path / "notes.txt").write_text("not media")
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["scan", str(folder), str(tmp_path / "missing.mp4"), str(tmp_path / "notes.txt"),
                                 "--model", str(meso4), "--json", str(out), "-q"])
    assert result.exit_code == 1, result.output  # some files failed, the rest were scanned
    report = json.loads(out.read_text())
    by_name = {Path(f["path"]).name: f for f in report["files"]}
    assert by_name["img2.jpg"]["verdict"] in ("real", "fake") and len(by_name["img2.jpg"]["participants"]) == 1
    for bad in ("broken.mp4", "truncated.jpg", "missing.mp4", "notes.txt"):
        assert by_name[bad]["verdict"] == "error" and by_name[bad]["error"], bad
        assert by_name[bad]["score"] is None
    assert "no such file" in by_name["missing.mp4"]["error"]
    assert "unsupported" in by_name["notes.txt"]["error"]
    assert report["model"]["name"] and report["model"]["backend"] == "onnxruntime"
    assert {"id", "samples", "low_quality", "score"} <= set(by_name["img2.jpg"]["participants"][0])


def test_scan_json_to_stdout_is_pure_json(meso4, shared_data):
    result = runner.invoke(app, ["scan", str(shared_data / "real_faces" / "couple.jpg"), "--model", str(meso4),
                                 "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["files"][0]["participants"]) == 2


def test_missing_model_says_how_to_import(tmp_path, shared_data):
    result = runner.invoke(app, ["scan", str(shared_data / "real_faces" / "img1.jpg"), "--model", "no-such-model"])
    assert result.exit_code == 2
    assert "streamguard models import" in plain(result.output)


def test_bad_setting_names_the_flag(meso4, shared_data):
    result = runner.invoke(app, ["scan", str(shared_data / "real_faces"), "--model", str(meso4), "--fps", "0"])
    assert result.exit_code == 2
    assert "--fps" in plain(result.output)


def test_eval_on_mesonet_crops(meso4, shared_data, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(shared_data / "mesonet" / "LABELS.csv"), "--model", str(meso4),
                                 "--images-are-crops", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    files = report["files"]
    assert files["n"] == 4 and files["n_fake"] == 2 and files["n_real"] == 2
    assert files["auc"] == 1.0  # Meso4_DF ranks both deepfakes above both reals
    assert files["auc_ci95"] == [1.0, 1.0]  # so does every resample of the 2 fakes and the 2 reals
    assert "AUC 1.000 [1.00, 1.00]" in result.output
    assert 0.0 <= files["log_loss"] < 5
    assert (out / "roc.png").stat().st_size > 1000


def test_eval_on_ffpp_folder_labels_by_file_name(meso4, shared_data, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(shared_data / "ffpp_smoke"), "--model", str(meso4), "--out", str(out),
                                 "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["files"]["n_real"] == 1 and report["files"]["n_fake"] == 1
    assert report["faces"]["n"] >= 50
    assert report["faces"]["auc"] is not None
    assert {r["label"] for r in report["rows"]} == {"real", "fake"}


def test_eval_rejects_bad_labels(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label\na.jpg,maybe\n")
    result = runner.invoke(app, ["eval", str(csv_file)])
    assert result.exit_code == 2
    assert "neither real nor fake" in plain(result.output)


def test_settings_validate():
    with pytest.raises(ValueError):
        ScanSettings(fps=-1)


def test_heatmaps_for_flagged_participants(meso4, shared_data, tmp_path):
    out = tmp_path / "heat"
    report_path = tmp_path / "r.json"
    crops = shared_data / "mesonet" / "test_images"
    result = runner.invoke(app, ["scan", str(crops), "--images-are-crops", "--model", str(meso4),
                                 "--heatmaps", str(out), "--json", str(report_path), "-q"])
    assert result.exit_code == 0, result.output
    files = {Path(f["path"]).name: f for f in json.loads(report_path.read_text())["files"]}
    for name, f in files.items():
        person = f["participants"][0]
        if name.startswith("df"):  # Meso4_DF flags both deepfakes: each gets a heatmap
            png = cv2.imread(person["heatmap"])
            assert png is not None and png.shape[0] == png.shape[1] >= 64
        else:  # reals are not flagged: no heatmap
            assert person["heatmap"] is None
    assert len(list(out.glob("*.png"))) == 2


def test_default_models_heatmap_is_its_own_map_and_lights_the_face(shared_data, tmp_path):
    """The default model has an artefact map: the fake's heatmap comes from it (16 copies, not 226) and is hottest
    on the face, not on the background at the crop's edges."""
    from streamguard.inference.heatmap import heatmapper_for
    from streamguard.inference.models import resolve_model

    classifier = load_classifier(None)
    mapper = heatmapper_for(classifier, resolve_model(None)[0])
    assert mapper.method == "model"
    scanner = Scanner(classifier)
    try:
        result = scanner.scan(shared_data / "ffpp_smoke" / "fake_deepfakes_519_515.mp4")
    finally:
        scanner.close()
    written = result.write_heatmaps(mapper, classifier.card.threshold, tmp_path / "heat")
    assert len(written) == 1 and result.report.participants[0].heatmap == str(written[0])
    ((p_fake, crop),) = result.evidence.values()
    assert cv2.imread(str(written[0])).shape == crop.shape
    heat = mapper(crop)
    h, w = heat.shape
    centre, border = heat[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4], heat.copy()
    border[h // 8 : 7 * h // 8, w // 8 : 7 * w // 8] = np.nan
    assert p_fake >= classifier.card.threshold and centre.mean() > 0.5 > np.nanmean(border), (centre.mean(),
                                                                                            np.nanmean(border))


def test_heatmaps_say_so_when_nobody_is_flagged(meso4, shared_data, tmp_path):
    real = sorted((shared_data / "mesonet" / "test_images").glob("real*"))[:1]
    assert real, "the MesoNet test set has real crops"
    result = runner.invoke(app, ["scan", str(real[0]), "--images-are-crops", "--model", str(meso4),
                                 "--heatmaps", str(tmp_path / "heat"), "-q"])
    assert result.exit_code == 0, result.output
    assert "no participant was flagged (P(fake) >= 0.5), so no heatmap was written" in result.output


def camera_copy(src: Path, dst: Path) -> Path:
    """src re-encoded as an IP camera sends it: H.264, a keyframe every second, no B-frames (crf 18: near-lossless,
    so the copy's scores measure the encoding little and the decoding mode not at all)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        rate = vin.average_rate
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = vin.width, vin.height, "yuv420p"
        gop = str(round(float(rate)))
        stream.options = {"crf": "18", "preset": "veryfast", "g": gop, "keyint_min": gop, "bf": "0"}
        for frame in inp.decode(vin):
            frame.pict_type = av.video.frame.PictureType.NONE  # the source's frame types are not the camera's
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return dst


@pytest.mark.slow
def test_ffpp_scores_keyframes_only_equal_full_decoding(scanner, shared_data, tmp_path):
    """Live pull streams with a 1 s GOP decode keyframes only (sources.keyframes_only): on the FF++ pair as a camera
    sends it, that samples the same frames as decoding everything, so every score is the same; and the scores stay
    within noise of the original files' (the camera encoding itself changes them a little)."""
    from streamguard.ingest.av_source import DecodeStats, iter_sampled_frames

    for name in ("real_519.mp4", "fake_deepfakes_519_515.mp4"):
        src = shared_data / "ffpp_smoke" / name
        camera = camera_copy(src, tmp_path / name)
        reports = {}
        for label, max_gop_s in (("full", None), ("keyframes", 1.0)):
            stats = DecodeStats()
            frames = iter_sampled_frames(str(camera), stream_id=name, stats=stats, keyframes_max_gop_s=max_gop_s)
            reports[label] = scanner._scan_frames(camera, "video", frames, 3, stats).report
            if label == "keyframes":
                assert stats.decoded <= 2 * 25 + 1 + 30 and stats.skipped_nonkey > 600, stats
        full, fast = reports["full"], reports["keyframes"]
        assert fast.sampled_frames == full.sampled_frames >= 29
        assert fast.participants[0].sample_scores == pytest.approx(full.participants[0].sample_scores, abs=1e-6)
        original = scanner.scan(src).report
        print(name, "original", original.score, "camera copy, keyframes only", fast.score)
        assert fast.score == pytest.approx(original.score, abs=0.05)
