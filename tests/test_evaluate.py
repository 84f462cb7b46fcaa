import numpy as np
import pytest

from streamguard.evaluate import auc_interval, compute_metrics, label_of_name, load_labels


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.2, 0.9, 0.4])
    m = compute_metrics(y, s, threshold=0.5)
    assert m.n == 5 and m.n_real == 3 and m.n_fake == 2
    assert m.tpr == 0.5 and m.fpr == pytest.approx(1 / 3)
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.auc == pytest.approx(5 / 6)  # 5 of 6 fake-real pairs ordered correctly
    expected_ll = -np.mean(np.log([0.9, 0.4, 0.8, 0.9, 0.4]))
    assert m.log_loss == pytest.approx(expected_ll, rel=1e-6)


def test_metrics_with_one_class_have_no_auc():
    m = compute_metrics(np.array([0, 0]), np.array([0.1, 0.7]), 0.5)
    assert m.auc is None and m.auc_ci95 is None and m.tpr is None and m.fpr == 0.5


def test_auc_interval_says_how_much_a_small_set_pins_down():
    """Classes resampled separately: the interval holds the AUC, is wide for 11 + 11 and narrow for 1000 + 1000,
    is the same on every run (seeded), and a perfect ranking stays perfect in every resample."""
    rng = np.random.default_rng(1)
    small_y = np.r_[np.zeros(11), np.ones(11)].astype(int)
    small_s = np.r_[rng.normal(0.0, 1.0, 11), rng.normal(1.0, 1.0, 11)]
    m = compute_metrics(small_y, small_s, 0.5)
    assert m.auc is not None and m.auc_ci95 is not None
    low, high = m.auc_ci95
    assert low < m.auc < high and high - low > 0.2
    assert auc_interval(small_y, small_s) == m.auc_ci95  # seeded: reproducible
    big_y = np.r_[np.zeros(1000), np.ones(1000)].astype(int)
    big_s = np.r_[rng.normal(0.0, 1.0, 1000), rng.normal(1.0, 1.0, 1000)]
    big = auc_interval(big_y, big_s)
    assert big is not None and big[1] - big[0] < 0.06 and big[0] < 0.76 < big[1]  # Phi(1 / sqrt 2) = 0.760
    assert auc_interval(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == (1.0, 1.0)
    assert auc_interval(np.array([0, 1]), np.array([0.3, 0.3])) == (0.5, 0.5)  # one pair, tied: half
    assert auc_interval(np.array([1, 1]), np.array([0.3, 0.9])) is None


def test_label_names():
    assert label_of_name("df") == 1 and label_of_name("Celeb-synthesis") == 1
    assert label_of_name("original") == 0 and label_of_name("YouTube-real") == 0
    assert label_of_name("misc") is None


def test_folder_labels_from_subfolders_and_prefixes(tmp_path):
    for rel in ["real/a.jpg", "df/b.jpg", "fake_c.mp4", "real_d.mp4", "other/e.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    labels = {p.path.name: p.label for p in load_labels(tmp_path)}
    assert labels == {"a.jpg": 0, "b.jpg": 1, "fake_c.mp4": 1, "real_d.mp4": 0}


def test_csv_labels_need_columns(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("file,y\n")
    with pytest.raises(ValueError, match="path,label"):
        load_labels(f)


def test_a_folder_of_real_files_only_is_a_false_positive_measurement(tmp_path):
    """Photos named img1.jpg... in a folder of their own: refused without a word on what they are, labelled real
    with --label real (or when the folder itself is called real/)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("img1.jpg", "img2.jpg", "fake_3.jpg"):
        (photos / name).write_bytes(b"x")
    (tmp_path / "unlabelled").mkdir()
    (tmp_path / "unlabelled" / "img9.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="--label real"):
        load_labels(tmp_path / "unlabelled")
    assert {p.path.name: p.label for p in load_labels(photos, 0)} == {"img1.jpg": 0, "img2.jpg": 0, "fake_3.jpg": 1}
    real = tmp_path / "real"
    photos.rename(real)
    assert {p.path.name: p.label for p in load_labels(real)} == {"img1.jpg": 0, "img2.jpg": 0, "fake_3.jpg": 1}


def test_eval_measures_fpr_on_real_photos_only(tmp_path, shared_data):
    import shutil

    from typer.testing import CliRunner

    from streamguard.cli import app

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("img1.jpg", "img2.jpg", "img3.jpg"):
        shutil.copy(shared_data / "real_faces" / name, photos / name)
    result = CliRunner().invoke(app, ["eval", str(photos), "--label", "real", "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    files = [line for line in result.output.splitlines() if line.startswith("files: ")]
    assert files and "n=3 (real 3, fake 0)" in files[0], result.output
    assert "FPR " in files[0] and "TPR   n/a" in files[0], result.output
    assert CliRunner().invoke(app, ["eval", str(photos), "--label", "maybe"]).exit_code == 2
