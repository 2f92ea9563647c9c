import numpy as np
import pytest
from skimage.draw import disk

import karyo
from karyo.models.classical import ClassicalConfig, ClassicalModel


def synthetic_he(centres, radius=9, size=128):
    """Pink background with purple (hematoxylin-rich) discs: what an H&E tile looks like to deconvolution."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 190, 215)
    truth = np.zeros((size, size), np.int32)
    for i, (r, c) in enumerate(centres, 1):
        rr, cc = disk((r, c), radius, shape=truth.shape)
        img[rr, cc] = (70, 40, 130)
        truth[rr, cc] = i
    return img, truth


def test_separated_nuclei_found_exactly():
    centres = [(20, 20), (20, 90), (70, 50), (105, 100)]
    img, truth = synthetic_he(centres)
    res = karyo.load("classical").segment(img)
    assert res.n_nuclei == 4
    for r, c in centres:
        lab = res.instances[r, c]
        assert lab > 0
        overlap = (res.instances == lab) & (truth == truth[r, c])
        iou = overlap.sum() / ((res.instances == lab) | (truth == truth[r, c])).sum()
        assert iou > 0.8


def test_touching_nuclei_split_by_watershed():
    img, _ = synthetic_he([(64, 50), (64, 66)], radius=9)
    res = ClassicalModel().segment(img)
    assert res.n_nuclei == 2
    assert res.instances[64, 45] != res.instances[64, 71]


def test_blank_tile_gives_no_nuclei():
    res = ClassicalModel().segment(np.full((64, 64, 3), 255, np.uint8))
    assert res.n_nuclei == 0 and res.instances.shape == (64, 64)


def test_fluorescence_bright_nuclei():
    img = np.zeros((96, 96, 1), np.uint16)
    for i, (r, c) in enumerate([(20, 20), (60, 70)]):
        rr, cc = disk((r, c), 8, shape=(96, 96))
        img[rr, cc, 0] = 40000 + 1000 * i
    res = ClassicalModel().segment(img)
    assert res.n_nuclei == 2


def test_points_segment_only_given_nuclei():
    img, _ = synthetic_he([(20, 20), (20, 90), (70, 50)])
    res = ClassicalModel().segment(img, points=[(20, 20), (50, 70)])  # (x, y): nuclei 1 and 3
    assert res.n_nuclei == 2
    assert res.instances[20, 20] > 0 and res.instances[70, 50] > 0 and res.instances[20, 90] == 0
    with pytest.raises(ValueError, match="outside the 128×128 image"):
        ClassicalModel().segment(img, points=[(500, 5)])


def test_points_on_background_give_a_table_with_the_same_columns():
    """A script reading the table of a --points run finds ``point_index`` even when no click found a nucleus."""
    img, _ = synthetic_he([(20, 20), (20, 90), (70, 50)])
    clicked = ClassicalModel().segment(img, points=[(20, 20)]).table()
    missed = ClassicalModel().segment(np.zeros_like(img), points=[(120, 120)]).table()  # nothing to segment
    assert missed.empty and list(missed.columns) == list(clicked.columns)
    assert clicked["point_index"].tolist() == [0] and missed["point_index"].dtype == clicked["point_index"].dtype
    assert "point_index" not in ClassicalModel().segment(np.zeros_like(img)).table().columns


def test_mpp_rescales_parameters():
    cfg = ClassicalConfig()
    img, _ = synthetic_he([(64, 64)], radius=4)
    # At the config's 0.25 µm/px a 4-px nucleus (~50 px²) is kept; declared at 0.125 µm/px the minimum
    # area quadruples (120 px²) and it is dropped as debris.
    assert ClassicalModel(cfg).segment(img, mpp=0.25).n_nuclei == 1
    assert ClassicalModel(cfg).segment(img, mpp=0.125).n_nuclei == 0


def test_config_round_trip(tmp_path):
    model = ClassicalModel(ClassicalConfig(marker_min_distance=5, bright_nuclei=True))
    model.save(tmp_path / "m")
    again = karyo.load(tmp_path / "m")
    assert isinstance(again, ClassicalModel) and again.config == model.config


def test_unknown_model_name_is_clear():
    with pytest.raises(karyo.InputError, match="unknown model 'nope'"):
        karyo.load("nope")


def test_slide_calibration_ignores_glass_and_white(shared_data):
    """Calibration tiles sampled from a slide hold glass and the white beyond its edge; the threshold must come
    from the stained pixels only, or Otsu separates glass from tissue instead of nuclei from tissue."""
    from karyo.data.layout import LayoutDataset

    tissue = [s.image for s in LayoutDataset(shared_data / "consep", ids=["test_1_005", "test_3_010"])]
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(238.0, 2.5, (256, 256, 3)), 0, 255).astype(np.uint8)
    white = np.full((256, 256, 3), 255, np.uint8)
    model = ClassicalModel()
    alone = model.for_slide(tissue).config.threshold
    mixed = model.for_slide([*tissue, glass, white, glass, white, white, glass]).config.threshold
    assert mixed == pytest.approx(alone)
    # all pixels (the old rule) would move the threshold a lot
    assert ClassicalModel().for_slide([glass, white]).config.threshold != pytest.approx(alone, rel=0.2)
    found = model.for_slide([*tissue, glass, white]).segment(tissue[0]).n_nuclei
    assert found > 0.5 * model.segment(tissue[0]).n_nuclei


def test_slide_calibration_is_robust_to_a_few_very_dark_pixels(shared_data):
    from karyo.data.layout import LayoutDataset

    tissue = [s.image for s in LayoutDataset(shared_data / "consep", ids=["test_1_005", "test_3_010", "test_7_002"])]
    inked = tissue[0].copy()
    inked[:40, :40] = (0, 8, 52)  # a blob of ink / pigment: optical density far above any nucleus
    model = ClassicalModel()
    clean = model.for_slide(tissue).config.threshold
    assert model.for_slide([*tissue, inked]).config.threshold == pytest.approx(clean, rel=0.1)


@pytest.fixture(scope="module")
def dsb_image(shared_data):
    """A real DSB2018 fluorescence image (one channel) and its annotated nuclei."""
    from karyo.data.io import read_image, read_instances

    root = shared_data / "dsb2018_fluo_subset"
    path = sorted((root / "images").glob("*.png"))[0]
    image = read_image(path)
    return image[..., :1], read_instances(next((root / "instances").glob(path.stem + ".*")))


def test_fluorescence_saved_as_rgb_or_beside_a_marker_is_segmented_on_its_nuclear_channel(dsb_image):
    """Averaging channels (or reading grey fluorescence as H&E) used to find the background as one nucleus."""
    from karyo.metrics import aggregated_jaccard_index

    image, truth = dsb_image
    model = ClassicalModel()
    one = model.segment(image).instances
    assert aggregated_jaccard_index(truth, one).value > 0.5  # 0.56
    with pytest.warns(UserWarning, match="R, G and B are equal and the background is dark"):
        rgb = model.segment(np.repeat(image, 3, axis=2)).instances
    np.testing.assert_array_equal(rgb, one)
    other = np.roll(image, 17, axis=1)
    with pytest.warns(UserWarning, match="2 channels, none named as a nuclear stain.*channel 0"):
        np.testing.assert_array_equal(model.segment(np.concatenate([image, other], axis=2)).instances, one)
    named = model.segment(np.concatenate([other, image], axis=2), channel_names=["CD45", "DAPI"]).instances
    np.testing.assert_array_equal(named, one)


def test_negative_points_alone_remove_their_nuclei_as_the_learned_models_do(tmp_path):
    """Also through `karyo segment --points` with label-0 rows only (they used to select nothing)."""
    from typer.testing import CliRunner

    from karyo.cli import app
    from karyo.data.io import read_instances, write_image

    centres = [(20, 20), (20, 90), (70, 50), (105, 100)]
    img, _ = synthetic_he(centres)
    model = ClassicalModel()
    without = model.segment(img, negative=[(90, 20), (50, 70)])  # x, y on the 2nd and 3rd nuclei
    assert without.n_nuclei == 2 and without.instances[20, 90] == 0 and without.instances[70, 50] == 0
    write_image(tmp_path / "t.png", img)
    (tmp_path / "p.csv").write_text("x,y,label\n90,20,0\n")
    res = CliRunner().invoke(app, ["segment", str(tmp_path / "t.png"), "--model", "classical", "--points",
                                   str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert len(np.unique(read_instances(tmp_path / "o" / "instances" / "t.png"))) - 1 == 3
