"""The Table S1 augmentation pipeline on real CoNSeP patches: label consistency, fragments, seeds, channels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from skimage.measure import label

from karyo.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    Augmenter,
    ThreePointAffine,
    build_augmentation,
    prepare_image,
    seed_pipeline,
    split_fragments,
)
from karyo.data.io import read_image, read_instances
from karyo.errors import InputError

CONSEP_IDS = ("train_1_000", "train_4_005", "test_3_010")


def load(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    image = read_image(root / "images" / f"{name}.png")
    instances = read_instances(root / "instances" / f"{name}.png", image.shape[:2])
    classes: dict[int, int] = {}
    table = root / "classes" / f"{name}.csv"
    if table.is_file():
        with table.open(newline="") as fh:
            classes = {int(r["instance_id"]): int(r["class_id"]) for r in csv.DictReader(fh)}
    return image, instances, classes


@pytest.fixture(scope="module")
def consep(shared_data: Path) -> list[tuple[np.ndarray, np.ndarray, dict[int, int]]]:
    return [load(shared_data / "consep", name) for name in CONSEP_IDS]


def flat_steps(pipe) -> list[tuple[str, object]]:
    out = []
    for t in pipe.transforms:
        out.append((type(t).__name__, t))
        if isinstance(t, A.BaseCompose):
            out += flat_steps(t)
    return out


GEOMETRIC_ONLY = {"pixel": False, "colour": False, "normalize": False, "interpolation": "nearest",
                  "min_fragment_area": 0, "p_grid_shuffle": 0.0, "p_rotate90": 0.0, "p_hflip": 0.0,
                  "p_vflip": 0.0, "p_sized_crop": 0.0, "p_scale": 0.0, "p_elastic": 0.0}


def coordinate_image(h: int, w: int) -> np.ndarray:
    """uint8 image whose pixel (y, x) holds (y, x, 255): after a nearest-neighbour geometric transform each
    output pixel tells where it came from (channel 2 = 0 marks constant padding)."""
    assert h <= 256 and w <= 256
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 255)], axis=2).astype(np.uint8)


def check_labels_follow_pixels(out_img, out_inst, out_cls, inst0, cls0):
    """Every output instance covers source pixels of exactly one source instance, with its class; a source
    instance's id stays on its largest piece, other pieces get new ids above the source ids present."""
    real = out_img[..., 2] == 255
    assert np.all(out_inst[~real] == 0), "constant padding must carry no instance"
    src = np.zeros_like(out_inst)
    src[real] = inst0[out_img[..., 0][real].astype(int), out_img[..., 1][real].astype(int)]
    np.testing.assert_array_equal(out_inst == 0, src == 0)  # min area 0: nothing dropped, nothing invented
    ids = np.unique(out_inst[out_inst > 0])
    owners = {}
    for k in ids.tolist():
        vals = np.unique(src[out_inst == k])
        assert len(vals) == 1, f"output instance {k} mixes source instances {vals}"
        owners[k] = int(vals[0])
        assert out_cls.get(k) == cls0.get(owners[k]), f"instance {k} lost its class"
    top = max(owners.values(), default=0)
    for k, v in owners.items():
        if k != v:
            assert k > top, f"new fragment id {k} collides with source ids ≤ {top}"
            assert v in owners, f"fragment {k} of {v} but {v} itself vanished"
            assert (out_inst == v).sum() >= (out_inst == k).sum(), "the id must stay on the largest piece"
    return owners


def test_default_config_is_table_s1():
    cfg = AugmentConfig()
    assert cfg.crop_size == 256
    assert (cfg.p_grid_shuffle, cfg.grid) == (0.5, (4, 4))
    assert cfg.p_rotate90 == 0.5
    assert cfg.p_hflip == 0.5
    assert cfg.p_vflip == 0.5
    assert (cfg.p_downscale, cfg.downscale_scale) == (0.15, 0.5)
    assert (cfg.p_blur, cfg.blur_limit) == (0.2, 10)
    assert (cfg.p_gauss_noise, cfg.gauss_noise_var) == (0.25, 50.0)
    assert (cfg.p_color_jitter, cfg.color_jitter) == (0.2, (0.25, 0.25, 0.1, 0.05))
    assert (cfg.p_superpixels, cfg.superpixels_p_replace, cfg.superpixels_n_segments,
            cfg.superpixels_max_size) == (0.1, 0.1, 200, 128)
    assert (cfg.p_zoom_blur, cfg.zoom_blur_max_factor) == (0.1, 1.05)
    assert (cfg.p_sized_crop, cfg.min_max_height) == (0.1, (128, 256))
    assert (cfg.p_elastic, cfg.elastic_sigma, cfg.elastic_alpha, cfg.elastic_alpha_affine) == (0.2, 25, 0.5, 15)
    assert (cfg.normalize, cfg.mean, cfg.std) == (True, IMAGENET_MEAN, IMAGENET_STD)
    assert cfg.mean == (0.485, 0.456, 0.406)
    assert cfg.std == (0.229, 0.224, 0.225)


def test_pipeline_is_table_s1_in_2x_terms():
    steps = flat_steps(build_augmentation(AugmentConfig(), 3))
    names = [n for n, _ in steps]
    assert names == ["PadIfNeeded", "RandomGridShuffle", "RandomCrop", "RandomRotate90", "HorizontalFlip",
                     "VerticalFlip", "Downscale", "Blur", "GaussNoise", "ColorJitter", "Superpixels", "ZoomBlur",
                     "RandomSizedCrop", "Sequential", "ThreePointAffine", "ElasticTransform", "Normalize"]
    t = dict(steps)
    expected_p = {"RandomGridShuffle": 0.5, "RandomCrop": 1.0, "RandomRotate90": 0.5, "HorizontalFlip": 0.5,
                  "VerticalFlip": 0.5, "Downscale": 0.15, "Blur": 0.2, "GaussNoise": 0.25, "ColorJitter": 0.2,
                  "Superpixels": 0.1, "ZoomBlur": 0.1, "RandomSizedCrop": 0.1, "Sequential": 0.2,
                  "ThreePointAffine": 1.0, "ElasticTransform": 1.0, "Normalize": 1.0}
    assert {k: t[k].p for k in expected_p} == expected_p
    assert tuple(t["RandomGridShuffle"].grid) == (4, 4)
    assert (t["RandomCrop"].height, t["RandomCrop"].width) == (256, 256)
    assert tuple(t["Downscale"].scale_range) == (0.5, 0.5)
    assert tuple(t["Blur"].blur_limit) == (3, 9)  # 1.x blur_limit=10 drew kernels {3, 5, 7, 9}
    assert t["GaussNoise"].std_range == pytest.approx((0.0, math.sqrt(50) / 255))
    cj = t["ColorJitter"]
    assert (tuple(cj.brightness), tuple(cj.contrast), tuple(cj.saturation)) == ((0.75, 1.25), (0.75, 1.25),
                                                                                  (0.9, 1.1))
    assert tuple(cj.hue) == pytest.approx((-0.05, 0.05))
    sp = t["Superpixels"]
    assert (tuple(sp.p_replace), tuple(sp.n_segments), sp.max_size) == ((0.1, 0.1), (200, 200), 128)
    assert tuple(t["ZoomBlur"].max_factor) == (1.0, 1.05)
    assert (tuple(t["RandomSizedCrop"].min_max_height), tuple(t["RandomSizedCrop"].size)) == ((128, 256),
                                                                                               (256, 256))
    assert (t["ElasticTransform"].alpha, t["ElasticTransform"].sigma) == (0.5, 25)
    assert t["ThreePointAffine"].alpha_affine == 15
    assert tuple(t["Normalize"].mean) == IMAGENET_MEAN
    assert tuple(t["Normalize"].std) == IMAGENET_STD


@pytest.mark.parametrize(("n_channels", "dtype"), [(1, np.uint8), (5, np.uint8), (3, np.float32)])
def test_colour_steps_only_for_rgb_uint8(n_channels, dtype):
    names = [n for n, _ in flat_steps(build_augmentation(AugmentConfig(), n_channels, dtype))]
    assert "ColorJitter" not in names
    assert "Superpixels" not in names
    assert {"Blur", "GaussNoise", "Downscale", "ZoomBlur", "ThreePointAffine"} <= set(names)


@pytest.mark.shared_data
@pytest.mark.parametrize("step", ["p_grid_shuffle", "p_rotate90", "p_hflip", "p_vflip", "p_sized_crop",
                                  "p_scale", "p_elastic", "all"])
def test_every_geometric_step_keeps_image_and_labels_aligned(consep, step):
    probs = {k: 1.0 for k in GEOMETRIC_ONLY if k.startswith("p_")} if step == "all" else {step: 1.0}
    aug = Augmenter(AugmentConfig(**{**GEOMETRIC_ONLY, **probs}))
    for i, (image, inst0, cls0) in enumerate(consep):
        coded = coordinate_image(*image.shape[:2])
        changed = 0
        for seed in range(3):
            out_img, out_inst, out_cls = aug(coded, inst0, cls0, seed=100 * i + seed)
            assert out_img.shape == (256, 256, 3)
            assert out_img.dtype == np.uint8
            check_labels_follow_pixels(out_img, out_inst, out_cls, inst0, cls0)
            changed += not np.array_equal(out_inst, inst0)
        assert changed >= 1, f"{step} at p=1 never changed the patch"


@pytest.mark.shared_data
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_inputs_smaller_than_the_crop_are_padded(consep, pad_mode):
    _, inst0, cls0 = consep[0]
    aug = Augmenter(AugmentConfig(**{**GEOMETRIC_ONLY, "crop_size": 320, "pad_mode": pad_mode}))
    out_img, out_inst, out_cls = aug(coordinate_image(256, 256), inst0, cls0, seed=1)
    assert out_inst.shape == (320, 320)
    check_labels_follow_pixels(out_img, out_inst, out_cls, inst0, cls0)
    padded = out_img[..., 2] == 0
    assert padded.sum() == (pad_mode == "constant") * (320 * 320 - 256 * 256)


@pytest.mark.shared_data
def test_instances_cut_by_the_crop_keep_id_and_class(consep):
    _, inst0, cls0 = consep[1]
    aug = Augmenter(AugmentConfig(**{**GEOMETRIC_ONLY, "crop_size": 160}))
    cut_seen = 0
    for seed in range(4):
        out_img, out_inst, out_cls = aug(coordinate_image(256, 256), inst0, cls0, seed=seed)
        y0, x0 = int(out_img[0, 0, 0]), int(out_img[0, 0, 1])
        window = inst0[y0:y0 + 160, x0:x0 + 160]
        owners = check_labels_follow_pixels(out_img, out_inst, out_cls, inst0, cls0)
        border = np.unique(np.concatenate([out_inst[0], out_inst[-1], out_inst[:, 0], out_inst[:, -1]]))
        for k in border[border > 0].tolist():
            if owners[k] == k and (out_inst == k).sum() < (inst0 == k).sum():
                cut_seen += 1
                assert out_cls[k] == cls0[k]
                np.testing.assert_array_equal(out_inst == k, window == k)
    assert cut_seen >= 5, "the test patch should have nuclei on the crop border"


def test_split_fragments_hand_made():
    inst = np.zeros((8, 12), dtype=np.int32)
    inst[0:2, 0:3] = 5      # 6 px piece of 5
    inst[5:8, 0:4] = 5      # 12 px piece of 5: the largest, keeps id 5
    inst[0:3, 5:7] = 2      # 6 px; touches 3 on the right: must not merge
    inst[0:3, 7:9] = 3      # 6 px
    inst[6, 11] = 3         # 1 px piece of 3: dropped (< 4 px)
    inst[3:5, 10:12] = 7    # 4 px: kept (= min area)
    inst[7, 6:9] = 9        # 3 px instance: dropped entirely
    inst[4, 5] = 2          # single pixel diagonal to nothing of 2: dropped
    out, cls = split_fragments(inst, {5: 1, 2: 2, 3: 3, 7: 4, 9: 1}, min_area=4)
    expected = inst.copy()
    expected[0:2, 0:3] = 10  # new id above the current maximum (9)
    expected[6, 11] = 0
    expected[7, 6:9] = 0
    expected[4, 5] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int32
    assert cls == {5: 1, 10: 1, 2: 2, 3: 3, 7: 4}


def test_split_fragments_orders_new_ids_and_uses_8_connectivity():
    inst = np.zeros((6, 20), dtype=np.int32)
    inst[0:2, 0:2] = 1         # 4 px
    inst[0:3, 4:7] = 1         # 9 px: largest of 1
    inst[4:6, 0:3] = 1         # 6 px
    inst[2, 2] = 1             # diagonal to the first piece: joins it (5 px)
    inst[0:2, 10:12] = 4       # 4 px
    inst[3:6, 10:13] = 4       # 9 px: keeps 4
    out, cls = split_fragments(inst, {1: 2, 4: 3}, min_area=4)
    # pieces of 1 by size: 9 (keeps 1), 6 → 5, 5 → 6; then pieces of 4: 9 (keeps 4), 4 → 7
    assert np.unique(out[0:3, 4:7]).tolist() == [1]
    assert np.unique(out[4:6, 0:3]).tolist() == [5]
    assert out[0, 0] == 6
    assert out[2, 2] == 6
    assert np.unique(out[0:2, 10:12]).tolist() == [7]
    assert np.unique(out[3:6, 10:13]).tolist() == [4]
    assert cls == {1: 2, 5: 2, 6: 2, 4: 3, 7: 3}
    same, _ = split_fragments(np.zeros((4, 4), dtype=np.int32), {}, min_area=4)
    assert not same.any()


@pytest.mark.shared_data
def test_grid_shuffle_fragments_become_connected_instances(consep):
    image, inst0, cls0 = consep[0]
    aug = Augmenter(AugmentConfig(**{**GEOMETRIC_ONLY, "p_grid_shuffle": 1.0, "min_fragment_area": 4}))
    _, out_inst, out_cls = aug(image, inst0, cls0, seed=3)

    pieces = label(out_inst, background=0, connectivity=2)
    ids = np.unique(out_inst[out_inst > 0])
    assert len(ids) == pieces.max(), "every output id is exactly one connected piece"
    assert len(ids) > len(cls0), "a 4×4 shuffle of a dense CoNSeP patch cuts nuclei"
    areas = np.bincount(out_inst.ravel())[ids]
    assert areas.min() >= 4
    assert set(out_cls) == set(ids.tolist())


@pytest.mark.shared_data
def test_seeded_runs_are_identical_and_seeds_differ(consep):
    image, inst0, cls0 = consep[2]
    aug = Augmenter(AugmentConfig())
    a = aug(image, inst0, cls0, seed=42)
    b = Augmenter(AugmentConfig())(image, inst0, cls0, seed=42)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    outs = [aug(image, inst0, cls0, seed=s)[1] for s in range(6)]
    assert sum(not np.array_equal(outs[0], o) for o in outs[1:]) >= 4


def test_seeded_draws_are_independent_across_transforms():
    """albumentations 2.0.8 seeds each transform alike; seed_pipeline must not correlate the coin flips."""
    pipe = build_augmentation(AugmentConfig(pixel=False, colour=False, normalize=False, p_grid_shuffle=0,
                                            p_rotate90=0, p_sized_crop=0, p_elastic=0, crop_size=8), 1)
    pipe.save_applied_params = True
    img = np.zeros((8, 8, 1), dtype=np.uint8)
    both = hflip = 0
    n = 400
    for seed in range(n):
        seed_pipeline(pipe, seed)
        names = {name for name, _ in pipe(image=img)["applied_transforms"]}
        hflip += "HorizontalFlip" in names
        both += {"HorizontalFlip", "VerticalFlip"} <= names
    assert 0.4 < hflip / n < 0.6
    assert 0.17 < both / n < 0.33  # independent: 0.25; correlated seeding would give 0.5


@pytest.mark.shared_data
@pytest.mark.parametrize("n_channels", [1, 5])
def test_other_channel_counts(consep, shared_data, n_channels):
    if n_channels == 1:  # a real fluorescence image
        image, inst0, cls0 = load(shared_data / "dsb2018_fluo_subset",
                                  "02903040e19ddf92f452907644ad3822918f54af41dd85e5a3fe3e1b6d6f9339")
        assert image.shape[2] == 1
    else:
        rgb, inst0, cls0 = consep[0]
        grey = rgb.mean(axis=2, keepdims=True).astype(np.uint8)
        image = np.concatenate([rgb, grey, 255 - grey], axis=2)
    aug = Augmenter(AugmentConfig(p_blur=1, p_downscale=1, p_gauss_noise=1, p_zoom_blur=1, p_elastic=1))
    out_img, out_inst, _ = aug(image, inst0, cls0, seed=0)
    assert out_img.shape == (256, 256, n_channels)
    assert out_img.dtype == np.float32
    assert np.isfinite(out_img).all()
    assert out_inst.shape == (256, 256)
    # with only the crop left, normalisation is exact: 0.5/0.5 fallback for non-RGB channel counts
    plain = Augmenter(AugmentConfig(geometric=False, pixel=False, crop_size=256))
    out, _, _ = plain(image[:256, :256], inst0[:256, :256], cls0, seed=0)
    np.testing.assert_allclose(out, (image[:256, :256] / 255.0 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.shared_data
def test_uint16_normalises_like_uint8(consep):
    image, inst0, cls0 = consep[0]
    cfg = AugmentConfig(pixel=False, colour=False)  # geometry + normalisation
    a = Augmenter(cfg)(image, inst0, cls0, seed=5)
    b = Augmenter(cfg)(image.astype(np.uint16) * 257, inst0, cls0, seed=5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_array_equal(a[1], b[1])


def test_three_point_affine_identity_and_multichannel():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 50, 6), dtype=np.uint8)
    mask = rng.integers(0, 9, (40, 50)).astype(np.int32)
    still = ThreePointAffine(alpha_affine=0, p=1)(image=img, mask=mask)
    np.testing.assert_array_equal(still["image"], img)
    np.testing.assert_array_equal(still["mask"], mask)
    t = ThreePointAffine(alpha_affine=15, p=1)
    t.set_random_seed(1)
    moved = t(image=img, mask=mask)
    assert moved["image"].shape == img.shape
    assert not np.array_equal(moved["image"], img)
    assert set(np.unique(moved["mask"])) <= set(np.unique(mask))
    t.set_random_seed(1)
    first3 = t(image=np.ascontiguousarray(img[..., :3]), mask=mask)["image"]
    np.testing.assert_array_equal(first3, moved["image"][..., :3])


def test_prepare_image_reads_wide_integer_dtypes_by_their_values():
    """An 8-bit image held as int64 (np.array(..., dtype=int), a nested list) must not turn black."""
    rgb = np.array([[[0, 128, 255]]], np.uint8)
    for dtype in (np.int16, np.int32, np.int64, np.uint32):
        out = prepare_image(rgb.astype(dtype))
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, rgb)
    wide = prepare_image(np.array([[[0, 1000, 65535]]], np.int64))
    np.testing.assert_allclose(wide, [[[0.0, 1000 / 65535, 1.0]]])
    # uint16 keeps its documented meaning: divided by 65535 even when the values are small
    assert prepare_image(np.array([[[255]]], np.uint16)).dtype == np.float32
    with pytest.raises(InputError, match=r"a\.png.*-1\.\.3"):
        prepare_image(np.array([[[-1, 2, 3]]], np.int32), "a.png")
    with pytest.raises(InputError, match="70000"):
        prepare_image(np.array([[[0, 2, 70000]]], np.int64), "b.png")


def test_prepare_image_and_config_round_trip():
    assert prepare_image(np.full((2, 2, 1), 65535, np.uint16)).max() == 1.0
    assert prepare_image(np.full((2, 2, 1), 7, np.uint8)).dtype == np.uint8
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        prepare_image(np.full((2, 2, 1), 200.0, np.float32), "x.tif")
    cfg = AugmentConfig(crop_size=128, seed=3, mean=(0.5,), std=(0.25,))
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}  # as JSON gives it
    assert AugmentConfig.from_dict(data) == cfg
    assert cfg.channel_stats(4) == ((0.5,) * 4, (0.25,) * 4)
    assert AugmentConfig().channel_stats(2) == ((0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="p_blur"):
        AugmentConfig(p_blur=1.5)
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"p_blurr": 0.1})


def test_hed_jitter_changes_stain_not_geometry():
    from skimage.color import hed_from_rgb

    from karyo.data.augment import HedJitter

    def rgb2hed(im):
        return -np.log((im.astype(np.float64) + 1.0) / 256.0) @ hed_from_rgb

    rng = np.random.default_rng(0)
    img = rng.integers(60, 250, size=(32, 32, 3), dtype=np.uint8)
    t = HedJitter(sigma=0.2, bias=0.0, p=1.0)
    out = t.apply(img, alpha=np.array([1.2, 1.0, 1.0]), beta=np.zeros(3))
    h_in, h_out = rgb2hed(img)[..., 0], rgb2hed(out)[..., 0]
    # The hematoxylin OD scales by 1.2 (up to 8-bit rounding); eosin stays put.
    assert np.nanmedian(h_out / np.where(np.abs(h_in) > 0.05, h_in, np.nan)) == pytest.approx(1.2, abs=0.05)
    # Eosin is untouched except where 8-bit clipping of the new colour bites.
    assert np.median(np.abs(rgb2hed(out)[..., 1] - rgb2hed(img)[..., 1])) < 0.005
    identity = t.apply(img, alpha=np.ones(3), beta=np.zeros(3))
    assert np.abs(identity.astype(int) - img).max() <= 1
    pipe = build_augmentation(AugmentConfig(p_hed_jitter=0.5), 3)
    assert any(isinstance(step, HedJitter) for step in pipe.transforms)


def test_scale_zooms_in_and_out_about_the_centre():
    """karyo's p_scale: a disc's area scales by the zoom factor squared, both ways, and stays centred."""
    from skimage.draw import disk

    image = np.full((256, 256, 3), 220, np.uint8)
    instances = np.zeros((256, 256), np.int32)
    rr, cc = disk((128, 128), 20)
    image[rr, cc] = 60
    instances[rr, cc] = 1
    aug = Augmenter(AugmentConfig(**{**GEOMETRIC_ONLY, "p_scale": 1.0, "scale_range": (0.8, 1.25)}))
    ratios = []
    for seed in range(12):
        _, out, _ = aug(image, instances, {1: 1}, seed=seed)
        ys, xs = np.nonzero(out == 1)
        assert abs(ys.mean() - 127.5) < 1.5 and abs(xs.mean() - 127.5) < 1.5
        ratios.append(len(ys) / len(rr))
    assert 0.8**2 * 0.95 <= min(ratios) < 0.95 and 1.05 < max(ratios) <= 1.25**2 * 1.05
    assert "CentreZoom" not in [n for n, _ in flat_steps(build_augmentation(AugmentConfig(), 3))]  # off by default


@pytest.mark.parametrize("bad", [(1.1, 1.3), (0.8, 0.9), (0.0, 1.2), (0.8,)])
def test_scale_range_must_bracket_one(bad):
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=bad)
