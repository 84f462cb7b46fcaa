"""Training pieces: SBI and cross-identity blends, augmentations (codecs included), identity split, balanced and
group-weighted sampling, the crop cut, a tiny end-to-end run with ONNX export."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install -e .[train]")

from streamguard.faces.crop import resize_square  # noqa: E402
from streamguard.training import augment as aug  # noqa: E402
from streamguard.training.data import (  # noqa: E402
    REAL,
    SBI,
    XRAY,
    CropConfig,
    ExtractConfig,
    FaceDataset,
    FaceExtractor,
    FaceSet,
    IdentityBalancedSampler,
    MediaItem,
    cut_crop,
    discover,
    discover_real,
    eval_keys,
    split_by_identity,
)
from streamguard.training.sbi import ellipse_landmarks, self_blend  # noqa: E402
from streamguard.training.xray import cross_blend, normalised_shapes, pick_donor  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_FACES = SHARED / "real_faces"
needs_shared = pytest.mark.skipif(not REAL_FACES.is_dir(), reason=f"needs the shared test data at {SHARED}")


@pytest.fixture(scope="module")
def face_crops() -> FaceSet:
    """A few real faces through the real pipeline (detector, square crop, face mesh), or synthetic faces without
    the shared data."""
    if REAL_FACES.is_dir():
        items = [MediaItem(REAL_FACES / n, 0, n) for n in ("img1.jpg", "img13.jpg", "img20.jpg", "img30.jpg")]
        extractor = FaceExtractor(None)
        try:
            faces = extractor.extract_all(items, progress=False)
        finally:
            extractor.close()
        assert len(faces) >= 4
        return faces
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(4):
        img = np.full((256, 256, 3), rng.integers(60, 200, 3), np.uint8)
        cv2.ellipse(img, (128, 136), (62, 85), 0, 0, 360, tuple(int(v) for v in rng.integers(120, 240, 3)), -1)
        crops.append(cv2.add(img, rng.integers(0, 20, img.shape, dtype=np.uint8)))
    lms = np.full((4, 468, 2), np.nan, np.float32)
    return FaceSet(np.stack(crops), lms, np.zeros(4, np.int64), [f"id{i}" for i in range(4)], ["x"] * 4)


class TestSelfBlend:
    @pytest.mark.parametrize("seed", range(6))
    def test_changes_only_inside_the_mask(self, face_crops: FaceSet, seed: int):
        img, lm = face_crops.crops[0], face_crops.landmarks[0]
        out = self_blend(img, lm, np.random.default_rng(seed), augment_side="source")
        assert out.fake.shape == img.shape and out.fake.dtype == np.uint8
        # With the source side altered, the target is the input itself.
        assert np.array_equal(out.target, img)
        inside = cv2.dilate((out.mask > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        changed = np.any(out.fake != img, axis=2)
        assert changed.any(), "the blend changed nothing"
        assert not (changed & ~inside).any(), "pixels changed outside the (dilated) blend mask"
        # A face-sized mask: not empty, not the whole crop.
        area = float((out.mask > 0.05).mean())
        assert 0.05 < area < 0.8
        assert out.mask.max() <= 1.0 + 1e-6

    def test_target_side_blend_equals_target_outside_mask(self, face_crops: FaceSet):
        out = self_blend(face_crops.crops[1], face_crops.landmarks[1], np.random.default_rng(3), "target")
        outside = out.mask == 0
        assert np.array_equal(out.fake[outside], out.target[outside])

    def test_reproducible_from_seed(self, face_crops: FaceSet):
        a = self_blend(face_crops.crops[0], face_crops.landmarks[0], np.random.default_rng(11))
        b = self_blend(face_crops.crops[0], face_crops.landmarks[0], np.random.default_rng(11))
        assert np.array_equal(a.fake, b.fake)

    def test_without_landmarks_uses_an_ellipse(self, face_crops: FaceSet):
        out = self_blend(face_crops.crops[0], None, np.random.default_rng(0), "source")
        assert (out.mask > 0).any()
        assert ellipse_landmarks(256).shape == (36, 2)

    def test_mask_variants_full_face_no_forehead_and_lower_face(self, face_crops: FaceSet):
        from streamguard.training.sbi import NOSE_TIP, hull_mask

        lm = face_crops.landmarks[0]
        if not np.isfinite(lm).all():
            pytest.skip("synthetic faces carry no landmarks")
        tops = []
        for seed in range(60):
            m = hull_mask(lm, face_crops.crops[0].shape[:2], np.random.default_rng(seed))
            tops.append(int(np.flatnonzero(m.any(axis=1))[0]))
        nose_y, face_top = float(lm[NOSE_TIP, 1]), float(lm[:, 1].min())
        lower = [t for t in tops if t >= nose_y - 1]
        full = [t for t in tops if t <= face_top + 1]
        assert 0.05 < len(lower) / len(tops) < 0.3  # p = 0.15: only the mouth and jaw
        assert len(full) / len(tops) > 0.45  # p = 0.6: the whole face; the rest is cut at the eyebrows

    def test_rejects_non_uint8(self):
        with pytest.raises(ValueError):
            self_blend(np.zeros((64, 64, 3), np.float32), None, np.random.default_rng(0))

    @pytest.mark.parametrize("seed", range(4))
    def test_padding_outside_the_picture_stays_black(self, face_crops: FaceSet, seed: int):
        # A tight photo padded before detection: its crop has black bands. A colour-jittered target must not tint
        # them in the fake only (the model would learn the border, not the blend).
        img = face_crops.crops[0].copy()
        valid = np.zeros(img.shape[:2], bool)
        valid[20:-20, 30:-30] = True
        img[~valid] = 0
        out = self_blend(img, face_crops.landmarks[0], np.random.default_rng(seed), "target", valid=valid)
        assert not out.fake[~valid].any() and not out.target[~valid].any()
        assert (out.mask[~valid] == 0).all()
        assert np.any(out.fake[valid] != img[valid])


class TestCrossBlend:
    def test_face_of_another_person_inside_the_mask_only(self, face_crops: FaceSet):
        img, lm = face_crops.crops[0], face_crops.landmarks[0]
        if not np.isfinite(lm).all():
            pytest.skip("synthetic faces carry no landmarks")
        donor, dlm = face_crops.crops[2], face_crops.landmarks[2]
        out = cross_blend(img, lm, donor, dlm, np.random.default_rng(5))
        inside = cv2.dilate((out.mask > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        outside = ~inside
        assert np.array_equal(out.fake[outside], out.target[outside])
        # The inside really is someone else: far from the target there, where an SBI stays close to it.
        core = out.mask > 0.9
        sbi = self_blend(img, lm, np.random.default_rng(5), "source")
        swap_diff = np.abs(out.fake[core].astype(int) - out.target[core].astype(int)).mean()
        sbi_core = sbi.mask > 0.9
        sbi_diff = np.abs(sbi.fake[sbi_core].astype(int) - sbi.target[sbi_core].astype(int)).mean()
        assert swap_diff > sbi_diff

    def test_donor_is_another_identity_and_the_nearest_shape(self, face_crops: FaceSet):
        lms = face_crops.landmarks
        if not np.isfinite(lms).all():
            pytest.skip("synthetic faces carry no landmarks")
        pool = np.arange(len(face_crops))
        shapes = normalised_shapes(lms[pool])
        donor = pick_donor(0, lms[0], face_crops, (pool, shapes), np.random.default_rng(0), candidates=64)
        assert donor is not None and face_crops.identities[donor] != face_crops.identities[0]
        d = ((shapes - normalised_shapes(lms[:1])[0]) ** 2).sum(axis=(1, 2))
        others = [i for i in pool if face_crops.identities[i] != face_crops.identities[0]]
        assert donor == min(others, key=lambda i: d[i])
        # Only one identity in the pool: no donor.
        assert pick_donor(0, lms[0], face_crops, (pool[:1], shapes[:1]), np.random.default_rng(0)) is None


class TestAugment:
    @pytest.mark.parametrize("seed", range(10))
    def test_pipeline_keeps_shape_and_dtype(self, face_crops: FaceSet, seed: int):
        img = face_crops.crops[seed % len(face_crops)]
        out = aug.augment(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8 and out.flags.c_contiguous

    def test_each_augmentation_keeps_shape_and_dtype(self, face_crops: FaceSet):
        img = face_crops.crops[0]
        rng = np.random.default_rng(0)
        outs = [
            aug.hflip(img), aug.geometry(img, rng), aug.brightness_contrast(img, rng), aug.colour(img, rng),
            aug.gaussian_blur(img, rng), aug.gaussian_noise(img, rng), aug.downscale(img, rng), aug.jpeg(img, 40),
            aug.h264_like(img, rng, aug.AugmentConfig()),
        ]
        for out in outs:
            assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(aug.jpeg(img, 30), img)


    @pytest.mark.parametrize(("codec", "low", "high"), [("h264", 18, 45), ("vp8", 8, 56)])
    def test_video_codec_round_trip_degrades_with_quality(self, face_crops: FaceSet, codec: str, low: int, high: int):
        img = face_crops.crops[0][:255, :253]  # odd sides: yuv420p needs padding, the result keeps the shape
        fine, coarse = aug.video_codec(img, codec, low), aug.video_codec(img, codec, high)
        assert fine.shape == coarse.shape == img.shape and fine.dtype == np.uint8
        assert 25 < cv2.PSNR(fine, img) and cv2.PSNR(coarse, img) < cv2.PSNR(fine, img) - 3
        with pytest.raises(ValueError):
            aug.video_codec(img, "mjpeg", 10)

    def test_dim_light_darkens_and_adds_sensor_noise(self, face_crops: FaceSet):
        img = face_crops.crops[2]
        out = aug.dim_light(img, np.random.default_rng(1))
        assert out.shape == img.shape and out.dtype == np.uint8
        assert out.mean() < 0.65 * img.mean()
        # Noise: flat areas of the original are no longer flat (the residual after a blur grows).
        resid = lambda x: np.abs(x.astype(float) - cv2.GaussianBlur(x, (5, 5), 0)).mean()  # noqa: E731
        scale = out.mean() / img.mean()
        assert resid(out) > resid(img) * scale

    def test_beauty_filter_smooths_sharpening_sharpens_and_the_call_preset_runs(self, face_crops: FaceSet):
        img = face_crops.crops[1]
        out = aug.beauty_filter(img, np.random.default_rng(0))
        lap = lambda x: cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()  # noqa: E731
        assert out.shape == img.shape and lap(out) < lap(img)
        crisp = aug.unsharp(img, np.random.default_rng(0))
        assert crisp.shape == img.shape and crisp.dtype == np.uint8 and lap(crisp) > lap(img)
        for seed in range(6):
            out, mask = aug.augment_with_mask(img, np.ones(img.shape[:2], np.float32), np.random.default_rng(seed),
                                              aug.CALL_AUGMENT)
            assert out.shape == img.shape and mask is not None and mask.shape == img.shape[:2]


class TestCropCut:
    def test_cut_at_the_cached_margin_is_a_resize_and_tighter_margins_zoom_in(self):
        img = np.zeros((280, 280, 3), np.uint8)
        cv2.rectangle(img, (40, 40), (239, 239), (200, 100, 50), -1)  # the face box: 200 px at margin 1.4
        same, _ = cut_crop(img, None, 1.4, 140, 1.4)
        np.testing.assert_allclose(same.astype(int), resize_square(img, 140).astype(int), atol=1)
        tight, mask = cut_crop(img, np.ones((280, 280), np.float32), 1.4, 110, 1.1)
        # At margin 1.1 the box fills 1 / 1.1 of the crop: a 5 px black band each side at 110 px.
        assert tight[55, 2].sum() == 0 and tight[55, 8].sum() > 0
        assert mask is not None and mask.shape == (110, 110)
        shifted, _ = cut_crop(img, None, 1.4, 110, 1.1, shift=(0.1, 0.0))
        assert shifted[55, 100].sum() == 0 and shifted[55, 2].sum() > 0  # moved right: the band is on the right


UTKFACE = SHARED / "utkface"


class TestReflectPadding:
    """Tight photos (UTKFace: the face fills ~0.9 of the image) are padded before detection. Black padding framed
    nearly every training face in black, which no call or test crop shows; mirrored picture does not, and a blend
    must not leave a seam between the picture and its mirror."""

    @pytest.fixture(scope="class")
    @classmethod
    def tight_faces(cls) -> FaceSet:
        files = sorted(UTKFACE.glob("*.jpg"))[:6] if UTKFACE.is_dir() else []
        if not files:
            pytest.skip(f"needs tight face photos at {UTKFACE}")
        extractor = FaceExtractor(None, ExtractConfig(pad_mode="reflect"))
        try:
            faces = extractor.extract_all([MediaItem(f, 0, f.name) for f in files], progress=False)
        finally:
            extractor.close()
        assert len(faces) >= 4 and faces.pad_mode == "reflect"
        return faces

    def test_tight_photos_are_padded_with_picture_not_black(self, tight_faces: FaceSet):
        black = []
        for i in range(len(tight_faces)):
            crop = np.asarray(tight_faces.crops[i])
            outside = ~tight_faces.valid_mask(i)
            assert outside.mean() > 0.3  # the cached crop (margin 1.4) reaches far past the photo...
            black.append((crop[outside].max(axis=1) < 8).mean())  # ...and what lies past it is picture
            assert tight_faces.identities[i] == Path(tight_faces.sources[i].split("@")[0]).name  # one face a photo
        # Black is left only where the crop reaches past the padding too (its corners); black padding: ~100 %.
        assert max(black) < 0.3 and np.mean(black) < 0.15, black

    @pytest.mark.parametrize("kind", [SBI, XRAY])
    def test_a_blend_is_mirrored_into_the_padding_like_its_real(self, tight_faces: FaceSet, kind: int):
        ds = FaceDataset(tight_faces, 160, (0.5,) * 3, (0.5,) * 3, train=False, crop=CropConfig(tight_faces.margin),
                         donors=range(len(tight_faces)))
        for seed in range(8):
            real, _, _ = ds.sample((0, REAL, seed))
            fake, _, mask = ds.sample((0, kind, seed))
            assert mask is not None and mask.max() > 0
            # Every pixel of the padding mirrors the picture, in the fake as in the real: no seam at the photo's edge.
            img, _ = ds._blend(0, kind, seed)
            redone = tight_faces.repad(0, img)
            x0, y0, x1, y1 = tight_faces.valid[0]
            picture = np.ascontiguousarray(redone[y0:y1, x0:x1])
            side = redone.shape[0]
            mirrored = cv2.copyMakeBorder(picture, y0, side - y1, x0, side - x1, cv2.BORDER_REFLECT_101)
            assert np.array_equal(redone, mirrored)
            # The real's padding made again is the extraction's own, up to resampling (it mirrored the photo before
            # the crop was resized), where the crop reached only into the padding and not past it (black).
            crop = np.asarray(tight_faces.crops[0])
            again = tight_faces.repad(0, crop)
            padded = ~tight_faces.valid_mask(0) & (crop.max(axis=2) > 8)
            assert np.abs(again[padded].astype(int) - crop[padded].astype(int)).mean() < 12
            assert real.shape == fake.shape == (160, 160, 3)

    def test_black_padding_and_video_frames_are_left_alone_and_bad_modes_refused(self, face_crops: FaceSet):
        from dataclasses import replace

        img = np.asarray(face_crops.crops[0])
        assert replace(face_crops, pad_mode="black").repad(0, img) is img
        video = replace(face_crops, pad_mode="reflect", groups=["video"] * len(face_crops))
        assert video.repad(0, img) is img  # beyond a frame's edge is black, as the service's crops are
        with pytest.raises(ValueError, match="pad_mode"):
            ExtractConfig(pad_mode="mirror")


class TestSplitAndSampler:
    def test_split_has_no_identity_on_both_sides(self):
        ids = [f"p{i % 17}" for i in range(200)] + ["video"] * 50
        train, val = split_by_identity(ids, 0.3, seed=1, keep_in_train=["video"])
        assert set(train) | set(val) == set(range(len(ids))) and not set(train) & set(val)
        train_ids, val_ids = {ids[i] for i in train}, {ids[i] for i in val}
        assert not train_ids & val_ids
        assert "video" in train_ids
        assert len(val_ids) == round(0.3 * 17)
        assert split_by_identity(ids, 0.3, seed=1, keep_in_train=["video"])[1].tolist() == val.tolist()

    @needs_shared
    def test_real_faces_identities_follow_master_csv(self):
        items = {i.path.name: i.identity for i in discover_real(REAL_FACES)}
        # master.csv: img1, img2, img4, ... are one person; img8 and img9 another; img13 alone is not img8.
        assert items["img1.jpg"] == items["img2.jpg"] == items["img11.jpg"]
        assert items["img8.jpg"] == items["img9.jpg"] != items["img1.jpg"]
        assert items["img26.jpg"] == "img26.jpg"
        faces_ids = [items[n] for n in sorted(items)]
        train, val = split_by_identity(faces_ids, 0.25, seed=0)
        assert not {faces_ids[i] for i in train} & {faces_ids[i] for i in val}

    @pytest.mark.parametrize("paired", [False, True])
    def test_balanced_sampler_draws_half_fakes(self, paired: bool):
        # Unbalanced on purpose: one identity has 100 reals, others a few reals and some labelled fakes.
        labels = np.array([0] * 100 + [0, 0, 1, 1, 1, 1, 1, 1] * 5)
        ids = ["big"] * 100 + [f"p{i // 8}" for i in range(40)]
        sampler = IdentityBalancedSampler(labels, ids, range(len(labels)), 4000, seed=0, paired=paired)
        keys = list(sampler)
        assert len(keys) == 4000
        fake = np.array([labels[i] == 1 or kind != REAL for i, kind, _ in keys])
        assert abs(fake.mean() - 0.5) < 0.03
        # Identity-balanced: the identity with 100 faces is not drawn 100/140 of the time.
        share_big = np.mean([ids[i] == "big" for i, _, _ in keys])
        assert share_big < 0.3
        if paired:  # a real and its fake side by side, sharing a seed
            assert all(keys[k][2] == keys[k + 1][2] for k in range(0, len(keys), 2))
        sampler.set_epoch(1)
        assert list(sampler) != keys
        sampler.set_epoch(0)
        assert list(sampler) == keys


    def test_group_weights_and_cross_identity_share(self):
        # 300 photo identities and 3 video identities with many frames each.
        ids = [f"photo{i}" for i in range(300)] + [f"clip{i // 100}" for i in range(300)]
        groups = ["image"] * 300 + ["video"] * 300
        labels = np.zeros(len(ids), np.int64)
        sampler = IdentityBalancedSampler(labels, ids, range(len(ids)), 4000, seed=0, paired=True, xray_share=0.25,
                                          groups=groups, group_weights={"video": 0.2, "image": 0.8})
        keys = list(sampler)
        video = np.mean([groups[i] == "video" for i, _, _ in keys])
        assert abs(video - 0.2) < 0.03  # without weights: 3 of 303 identities, 1 %
        fakes = [k for k in keys if k[1] != REAL]
        assert abs(np.mean([k == XRAY for _, k, _ in fakes]) - 0.25) < 0.04
        assert all(k in (SBI, XRAY) for _, k, _ in fakes)
        with pytest.raises(ValueError):
            IdentityBalancedSampler(labels, ids, range(len(ids)), 10, seed=0, groups=groups,
                                    group_weights={"audio": 1.0})


class TestDiscover:
    def test_csv_and_layouts(self, tmp_path: Path):
        (tmp_path / "a.mp4").write_bytes(b"")
        (tmp_path / "b.mp4").write_bytes(b"")
        (tmp_path / "labels.csv").write_text("path,label,identity\na.mp4,real,alice\nb.mp4,fake,alice\n")
        items = discover(tmp_path / "labels.csv")
        assert [(i.path.name, i.label, i.identity) for i in items] == [("a.mp4", 0, "alice"), ("b.mp4", 1, "alice")]

        ff = tmp_path / "ffpp"
        (ff / "original_sequences/youtube/c23/videos").mkdir(parents=True)
        (ff / "manipulated_sequences/Deepfakes/c23/videos").mkdir(parents=True)
        for p in ("original_sequences/youtube/c23/videos/519.mp4", "original_sequences/youtube/c23/videos/515.mp4",
                  "original_sequences/youtube/c23/videos/700.mp4",
                  "manipulated_sequences/Deepfakes/c23/videos/519_515.mp4"):
            (ff / p).write_bytes(b"")
        got = {i.path.name: (i.label, i.identity) for i in discover(ff)}
        assert got["519_515.mp4"][0] == 1
        assert got["519.mp4"][1] == got["515.mp4"][1] == got["519_515.mp4"][1] != got["700.mp4"][1]

        celeb = tmp_path / "celeb"
        for sub, name in (("Celeb-real", "id0_0001.mp4"), ("Celeb-synthesis", "id0_id1_0001.mp4"),
                          ("YouTube-real", "00001.mp4"), ("Celeb-real", "id1_0003.mp4")):
            (celeb / sub).mkdir(parents=True, exist_ok=True)
            (celeb / sub / name).write_bytes(b"")
        got = {i.path.name: (i.label, i.identity) for i in discover(celeb)}
        assert got["id0_id1_0001.mp4"] == (1, got["id0_0001.mp4"][1])
        assert got["id1_0003.mp4"][1] == got["id0_0001.mp4"][1]
        assert got["00001.mp4"][0] == 0

        dfdc = tmp_path / "dfdc"
        dfdc.mkdir()
        for n in ("r.mp4", "f.mp4"):
            (dfdc / n).write_bytes(b"")
        (dfdc / "metadata.json").write_text(
            '{"r.mp4": {"label": "REAL"}, "f.mp4": {"label": "FAKE", "original": "r.mp4"}}'
        )
        got = {i.path.name: (i.label, i.identity) for i in discover(dfdc)}
        assert got["f.mp4"] == (1, got["r.mp4"][1]) and got["r.mp4"][0] == 0


class TestTinyTraining:
    def test_one_epoch_checkpoint_and_onnx_export(self, face_crops: FaceSet, tmp_path: Path, caplog):
        import logging

        import onnx
        import onnxruntime as ort

        from streamguard.training.export import check_onnx, export_onnx, write_card
        from streamguard.training.trainer import CHECKPOINT, TrainConfig, train

        faces = face_crops
        cfg = TrainConfig(epochs=1, samples_per_epoch=16, batch_size=8, input_size=64, val_sbi_per_face=1,
                          num_workers=0, seed=3, xray_share=0.5)
        idx = np.arange(len(faces))
        with caplog.at_level(logging.INFO, logger="streamguard.training.trainer"):
            result = train(faces, idx[:-1], idx[-1:], cfg, tmp_path, progress=False)
        assert (tmp_path / CHECKPOINT).exists()
        assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
        # Without progress bars the log says how far the epoch is and how fast it goes (2 steps: one line, halfway).
        assert any("epoch 1/1: 8/16 samples (50 %)" in m and "samples/s" in m for m in caplog.messages), caplog.messages
        # One held-out real face: itself, an SBI and a cross-identity blend.
        assert result.val_scores is not None and len(result.val_scores) == 3

        # Resuming after the last epoch loads the weights and trains nothing more.
        again = train(faces, idx[:-1], idx[-1:], cfg, tmp_path, resume=True, progress=False)
        for (k, a), b in zip(result.model.state_dict().items(), again.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), k

        # A fine-tuning phase starts from those weights (not ImageNet's): at lr 0 its convolutions stay theirs.
        from dataclasses import replace

        tuned = train(faces, idx[:-1], idx[-1:], replace(cfg, lr=0.0), tmp_path / "phase2", progress=False,
                      init_from=tmp_path / CHECKPOINT)
        first, second = result.model.state_dict(), tuned.model.state_dict()
        convs = [k for k in first if k.endswith("conv.weight") or k == "head.weight"]
        assert convs and all(torch.equal(first[k], second[k]) for k in convs)

        onnx_path = export_onnx(result.model, tmp_path / "tiny.onnx", cfg.input_size)
        assert check_onnx(result.model, onnx_path, cfg.input_size, batch=5) < 1e-4
        dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((7, 3, 64, 64)).astype(np.float32)
        p, fake_map = session.run(None, {"input": x})
        assert fake_map.shape == (7, 1, 2, 2)  # stride 32
        assert p.shape == (7, 1) and np.all((p >= 0) & (p <= 1))
        with torch.no_grad():
            want = torch.sigmoid(result.model(torch.from_numpy(x))).numpy()
        np.testing.assert_allclose(p, want, atol=1e-4)

        # Flip averaging: each crop scores the mean of itself and its mirror image, and its map is the mean of its
        # own and the mirror's map mirrored back, in torch (validation) and in the exported graph alike.
        flipped_path = export_onnx(result.model, tmp_path / "tiny-flip.onnx", cfg.input_size, flip_average=True)
        assert check_onnx(result.model, flipped_path, cfg.input_size, batch=5, flip_average=True) < 1e-4
        p2, map2 = ort.InferenceSession(str(flipped_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        mirror_p, mirror_map = session.run(None, {"input": np.ascontiguousarray(x[..., ::-1])})
        np.testing.assert_allclose(p2, (p + mirror_p) / 2, atol=1e-5)
        np.testing.assert_allclose(map2, (fake_map + mirror_map[..., ::-1]) / 2, atol=1e-5)
        assert not np.allclose(p, mirror_p, atol=1e-3)  # the mirror is another view, not the same score

        card = write_card(onnx_path, name="tiny", architecture="efficientnet-lite0-blendmap", input_size=64,
                          mean=cfg.mean, std=cfg.std, threshold=0.6, raise_threshold=0.8, clear_threshold=0.6,
                          training="test", metrics={}, crop_margin=cfg.margin)
        from streamguard.inference.models import load_classifier

        clf = load_classifier(str(onnx_path))
        assert clf.card == card and clf.card.raise_threshold == 0.8 and clf.card.preprocess.crop_margin == 1.15
        assert clf.predict(np.zeros((3, 64, 64, 3), np.uint8)).shape == (3,)

    def test_fine_tune_from_an_exported_model(self, face_crops: FaceSet, tmp_path: Path):
        from streamguard.training.export import export_onnx
        from streamguard.training.model import build_model
        from streamguard.training.recover import folded_convs, load_from_onnx
        from streamguard.training.trainer import TrainConfig, train

        cfg = TrainConfig(epochs=1, samples_per_epoch=16, batch_size=8, input_size=64, val_sbi_per_face=1,
                          num_workers=0, seed=6, dropout=0.0)
        idx = np.arange(len(face_crops))
        trained = train(face_crops, idx[:-1], idx[-1:], cfg, tmp_path / "a", progress=False).model
        onnx_path = export_onnx(trained, tmp_path / "a.onnx", 64, flip_average=True)

        rebuilt = build_model(dropout=0.0, pretrained=False)
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((6, 3, 64, 64)).astype(np.float32))
        assert load_from_onnx(rebuilt, onnx_path, [x], flip_average=True) < 1e-5
        # The trained BatchNorms differ from the rebuilt ones, the function does not; the convolutions are the
        # graph's folded ones.
        assert not torch.equal(trained.backbone._bn1.weight, rebuilt.backbone._bn1.weight)
        assert np.array_equal(folded_convs(onnx_path)[-1][0], rebuilt.head.weight.detach().numpy())
        # Statistics measured on x: train mode (BatchNorm on the batch's own statistics) scores x as eval mode does.
        with torch.no_grad():
            want = rebuilt.eval()(x)
            got = rebuilt.train()(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

        with pytest.raises(ValueError, match="flip-average"):
            load_from_onnx(build_model(pretrained=False), onnx_path, [x], flip_average=False)
        # train(init_from=...onnx): the phase starts from the export; at lr 0 the convolutions stay the graph's.
        from dataclasses import replace

        tuned = train(face_crops, idx[:-1], idx[-1:], replace(cfg, lr=0.0), tmp_path / "b", progress=False,
                      init_from=onnx_path, flip_average=True)
        assert np.array_equal(folded_convs(onnx_path)[0][0], tuned.model.backbone._conv_stem.weight.detach().numpy())

    def test_the_default_model_can_seed_a_fine_tune(self):
        from streamguard.training.model import build_model
        from streamguard.training.recover import load_from_onnx

        x = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 3, 160, 160)).astype(np.float32) * 0.5)
        shipped = Path(__file__).resolve().parents[1] / "engines" / "streamguard-sbi.onnx"
        assert load_from_onnx(build_model(pretrained=False), shipped, [x], flip_average=True) < 1e-4

    def test_average_of_the_last_epochs_weights(self, face_crops: FaceSet, tmp_path: Path):
        from streamguard.training.trainer import EPOCH_WEIGHTS, TrainConfig, train

        cfg = TrainConfig(epochs=3, samples_per_epoch=16, batch_size=8, input_size=64, val_sbi_per_face=1,
                          num_workers=0, seed=4)
        idx = np.arange(len(face_crops))
        last = train(face_crops, idx[:-1], idx[-1:], cfg, tmp_path, progress=False)
        assert last.averaged_epochs == []
        epochs = [torch.load(tmp_path / EPOCH_WEIGHTS.format(e), weights_only=True)["model"] for e in (2, 3)]
        # Resumed after its last epoch with --average-last 2: epochs 2 and 3 averaged, then validated.
        avg = train(face_crops, idx[:-1], idx[-1:], cfg, tmp_path, resume=True, progress=False, average_last=2)
        assert avg.averaged_epochs == [2, 3] and avg.val_scores is not None and len(avg.val_scores) == 3
        state = avg.model.state_dict()
        trained = [k for k in state if (k.startswith("head.") or "_blocks.15." in k) and state[k].is_floating_point()]
        assert trained and any(not torch.equal(epochs[0][k], epochs[1][k]) for k in trained)
        for k in trained:
            torch.testing.assert_close(state[k], (epochs[0][k] + epochs[1][k]) / 2)
        (tmp_path / EPOCH_WEIGHTS.format(1)).unlink()
        with pytest.raises(FileNotFoundError, match=r"epochs \[1\]"):
            train(face_crops, idx[:-1], idx[-1:], cfg, tmp_path, resume=True, progress=False, average_last=3)

    def test_training_is_reproducible(self, face_crops: FaceSet, tmp_path: Path):
        from streamguard.training.trainer import TrainConfig, train

        cfg = TrainConfig(epochs=1, samples_per_epoch=16, batch_size=8, input_size=64, val_sbi_per_face=1,
                          num_workers=0, seed=5)
        idx = np.arange(len(face_crops))
        a = train(face_crops, idx[:-1], idx[-1:], cfg, tmp_path / "a", progress=False)
        b = train(face_crops, idx[:-1], idx[-1:], cfg, tmp_path / "b", progress=False)
        for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
            assert torch.equal(x, y), k

    def test_eval_keys_and_dataset(self, face_crops: FaceSet):
        keys = eval_keys(face_crops, [0, 1], sbi_per_face=3, seed=0)
        assert len(keys) == 8 and sum(k[1] == SBI for k in keys) == 6
        ds = FaceDataset(face_crops, 96, (0.5,) * 3, (0.5,) * 3, train=False, map_stride=32, crop=CropConfig(1.15))
        x, y, target, known = ds[keys[1]]
        assert x.shape == (3, 96, 96) and x.dtype == torch.float32 and float(y) == 1.0
        # An SBI's blend-map target is known and marks part of the 3x3 map (stride 32).
        assert float(known) == 1.0 and target.shape == (1, 3, 3) and 0 < float(target.max()) <= 1.0
        # Eval samples are fixed: the same key gives the same tensor.
        assert torch.equal(ds[keys[1]][0], x)

    def test_memory_mapped_set_round_trips_and_pickles_small(self, face_crops: FaceSet, tmp_path: Path):
        import pickle

        face_crops.save(tmp_path / "set")
        loaded = FaceSet.load(tmp_path / "set")
        assert isinstance(loaded.crops, np.memmap) and np.array_equal(loaded.crops, face_crops.crops)
        assert loaded.identities == face_crops.identities and loaded.margin == face_crops.margin
        blob = pickle.dumps(FaceDataset(loaded, 64, (0.5,) * 3, (0.5,) * 3))
        assert len(blob) < face_crops.crops.nbytes / 2  # a DataLoader worker reopens the map instead
        again = pickle.loads(blob)
        assert np.array_equal(again.faces.crops, face_crops.crops)


def test_low_resolution_pairs_are_blended_small(face_crops: FaceSet):
    """p_low_res_blend: a real face and its pseudo-fakes are made at a fraction of the side and brought back, so the
    fake's blend is as coarse as the face (not a sharp blend smoothed afterwards); off, nothing changes."""
    from dataclasses import replace

    still = aug.AugmentConfig(p_flip=0, p_geometry=0, p_brightness_contrast=0, p_colour=0, p_blur=0, p_noise=0,
                              p_downscale=0, p_jpeg=0)
    small = replace(still, p_low_res_blend=1.0, low_res_range=(0.25, 0.3))
    crop = CropConfig(face_crops.margin)

    def dataset(cfg: aug.AugmentConfig) -> FaceDataset:
        return FaceDataset(face_crops, 128, (0.5,) * 3, (0.5,) * 3, train=True, augment_cfg=cfg, crop=crop)

    def detail(img: np.ndarray) -> float:
        return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())

    for kind in (REAL, SBI, XRAY):
        key = (0, kind, 11)
        full, full_label, full_mask = dataset(still).sample(key)
        low, label, mask = dataset(small).sample(key)
        assert low.shape == full.shape == (128, 128, 3) and low.dtype == np.uint8 and label == full_label
        if kind != SBI:  # (an SBI may sharpen its whole target side, at whatever resolution it is made)
            assert detail(low) < detail(full) / 3, kind  # a quarter of the side: the fine detail is gone
        assert mask is not None and mask.shape == (128, 128)
        if kind != REAL:
            assert label == 1 and 0.05 < float((mask > 0.05).mean()) < 0.8  # a face-sized blend region
        # Train-only: validation crops are never shrunk.
        val = FaceDataset(face_crops, 128, (0.5,) * 3, (0.5,) * 3, train=False, augment_cfg=small, crop=crop)
        plain = FaceDataset(face_crops, 128, (0.5,) * 3, (0.5,) * 3, train=False, crop=crop)
        assert np.array_equal(val.sample(key)[0], plain.sample(key)[0])
    # Off (the default), a sample is exactly what it was before the option existed.
    assert np.array_equal(dataset(still).sample((1, SBI, 5))[0],
                          dataset(replace(still, p_low_res_blend=0.0)).sample((1, SBI, 5))[0])


@pytest.mark.parametrize(("flags", "message"), [
    (["--average-last", "0"], "--average-last: at least 1 epoch"),
    (["--min-downscale", "0.95"], "--min-downscale: a factor in (0, 0.9)"),
    (["--p-downscale", "1.5"], "--p-downscale: a probability in [0, 1]"),
    (["--p-low-res-blend", "-0.1"], "--p-low-res-blend: a probability in [0, 1]"),
])
def test_train_cli_refuses_bad_settings_naming_the_flag(flags: list[str], message: str):
    """A bad setting is a CLI error naming the flag (exit 2), not a run that silently does something else (exports
    the last epoch for an average of none, never downscales)."""
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "train.py"
    proc = subprocess.run([sys.executable, str(tool), "--real", "unused", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_frozen_batchnorm_keeps_the_starting_statistics(frozen_bn: bool):
    """`frozen_bn`: a training step normalises with the model's own statistics and leaves them as they were, while
    BatchNorm's scale and shift still learn; without it the unfrozen blocks' statistics follow the batches. The
    stem and frozen blocks keep theirs either way."""
    from streamguard.training.model import build_model

    torch.manual_seed(0)
    model = build_model(frozen_blocks=3, dropout=0.0, pretrained=False, frozen_bn=frozen_bn).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    frozen = {id(m) for b in model._frozen_modules() for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = [m.running_mean.clone() for m in bns]
    x = torch.randn(4, 3, 64, 64) * 2 + 1  # far from the initial statistics (0, 1)
    model(x).sum().backward()
    moved = [not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True)]
    assert not any(mv for m, mv in zip(bns, moved, strict=True) if id(m) in frozen)
    trainable = [mv for m, mv in zip(bns, moved, strict=True) if id(m) not in frozen]
    assert trainable and (not any(trainable) if frozen_bn else all(trainable))
    learning = [m for m in bns if id(m) not in frozen]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in learning)
    assert all(m.training is not frozen_bn for m in learning)


def load_train_tool():  # type: ignore[no-untyped-def]  # a script loaded as a module
    import importlib.util
    import sys

    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))  # train.py imports its neighbours
    try:
        spec = importlib.util.spec_from_file_location("train_tool", tools / "train.py")
        assert spec is not None and spec.loader is not None
        train_tool = importlib.util.module_from_spec(spec)
        sys.modules["train_tool"] = train_tool  # its dataclasses look their module up while being made
        spec.loader.exec_module(train_tool)
    finally:
        sys.path.remove(str(tools))
        sys.modules.pop("train_tool", None)
    return train_tool


def test_train_cli_frozen_bn_reaches_the_config():
    train_tool = load_train_tool()
    assert train_tool.config_of(train_tool.parse_args(["--real", "x", "--frozen-bn"])).frozen_bn is True
    assert train_tool.config_of(train_tool.parse_args(["--real", "x"])).frozen_bn is False


def test_heldout_metrics_give_the_operating_point_at_the_calibrated_threshold():
    """Beside the AUCs, the card gets the share of held-out pseudo-fakes (and real faces) at or above the card
    threshold: what the service would call fake."""
    from streamguard.training.data import REAL, SBI, XRAY
    from streamguard.training.trainer import TrainResult

    train_tool = load_train_tool()
    keys = [(0, REAL, 0), (1, REAL, 0), (2, REAL, 0), (3, REAL, 0),
            (0, SBI, 1), (1, SBI, 1), (2, SBI, 1), (3, SBI, 1), (0, XRAY, 2), (1, XRAY, 2)]
    scores = np.array([0.1, 0.2, 0.3, 0.95, 0.5, 0.92, 0.96, 0.99, 0.97, 0.4], np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], np.float32)
    result = TrainResult(model=None, val_keys=keys, val_scores=scores, val_labels=labels)  # type: ignore[arg-type]
    m = train_tool.heldout_metrics(result, n_ids=4, threshold=0.9)
    assert m["heldout_sbi"]["sbi_called_fake"] == 0.75  # 0.92, 0.96, 0.99 of 0.5 / 0.92 / 0.96 / 0.99
    assert m["heldout_sbi"]["real_called_fake"] == 0.25  # the 0.95 real face
    assert m["heldout_cross_identity"]["called_fake"] == 0.5
    assert m["heldout_sbi"]["auc"] == 0.875  # 14 of 16 (fake, real) pairs ordered right
    without = train_tool.heldout_metrics(result, n_ids=4)
    assert "sbi_called_fake" not in without["heldout_sbi"] and "called_fake" not in without["heldout_cross_identity"]
