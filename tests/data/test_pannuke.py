"""PanNuke native .npy folds, built in tmp from real shared patches in the release's exact format.

The fixture holds 5 real 256×256 patches: PanNuke breast demo patches 00000010, 00000097, 00000029, the
CoNSeP patch test_4_012 and the NuCLS patch test_3. Their classes go to PanNuke channels by a fixed rule:
demo Neoplastic → 0 (neoplastic); demo Non-neoplastic (the demo merged four classes) → 1 + id % 4;
CoNSeP other/inflammatory/epithelial/spindle → 3/1/4/2; NuCLS Tumor/Non-Tumor → 0/2. As in the release,
ids restart in every channel (here 3, 6, 9, ... in ascending original id), so channels share ids.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from karyo.data.datasets import detect_format, open_dataset
from karyo.data.layout import LayoutDataset
from karyo.data.pannuke import (
    PANNUKE_CLASS_NAMES,
    PanNukeFold,
    find_pannuke_folds,
    pannuke_from_arrays,
    pannuke_masks_to_instances,
)
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data

# (dataset, id, class of shared data → PanNuke channel (or None: the id rule), tissue)
PATCHES = {
    1: [("pannuke_breast_demo", "00000010", None, "Breast"),
        ("pannuke_breast_demo", "00000097", None, "Breast"),
        ("consep", "test_4_012", {1: 3, 2: 1, 3: 4, 4: 2}, "Colon")],
    2: [("pannuke_breast_demo", "00000029", None, "Breast"),
        ("nucls_examples", "test_3", {2: 0, 1: 2}, "Breast")],
}


def _channel(ids: np.ndarray, classes: np.ndarray, rule: dict | None) -> np.ndarray:
    if rule is None:
        return np.where(classes == 1, 0, 1 + ids % 4)
    return np.array([rule[c] for c in classes.tolist()], dtype=np.int64)


def _to_pannuke(sample, rule):
    """A real sample → (image, H×W×6 float64 mask as in the release, expected instances, expected classes)."""
    inst = sample.instances
    ids = np.array(sorted(sample.classes), dtype=np.int64)
    chan = _channel(ids, np.array([sample.classes[i] for i in ids]), rule)
    mask = np.zeros((*inst.shape, 6), dtype=np.float64)
    chan_lut = np.zeros(inst.max() + 1, dtype=np.int64)
    chan_lut[ids] = chan
    rank_lut = np.zeros(inst.max() + 1, dtype=np.int64)
    for c in range(5):
        in_c = ids[chan == c]
        rank_lut[in_c] = 3 * np.arange(1, len(in_c) + 1)  # ids restart per channel, with gaps
    fg = inst > 0
    mask[fg, chan_lut[inst[fg]]] = rank_lut[inst[fg]]
    mask[..., 5] = ~fg
    # The reader numbers instances by (channel, id): the expected map follows the same order.
    order = np.lexsort((ids, chan))
    new_lut = np.zeros(inst.max() + 1, dtype=np.int32)
    new_lut[ids[order]] = np.arange(1, len(ids) + 1)
    expected_classes = {int(new_lut[i]): int(c) + 1 for i, c in zip(ids, chan, strict=True)}
    return sample.image, mask, new_lut[inst], expected_classes


@pytest.fixture(scope="module")
def release(tmp_path_factory, shared_data):
    """Fold 1 in the release layout (float64 images), fold 2 flat (uint8 images); tissues checked against the
    PanNuke metadata."""
    meta_tissues = set(pd.read_csv(shared_data / "pannuke_meta/pannuke_patches.csv")["tissue"])
    root = tmp_path_factory.mktemp("pannuke")
    expected = {}
    for fold, patches in PATCHES.items():
        rows = []
        for ds_name, id_, rule, tissue in patches:
            assert tissue in meta_tissues
            rows.append((*_to_pannuke(LayoutDataset(shared_data / ds_name, ids=[id_])[0], rule), tissue))
        images = np.stack([r[0] for r in rows])
        masks = np.stack([r[1] for r in rows])
        types = np.array([r[4] for r in rows])
        if fold == 1:
            (root / "Fold 1/images/fold1").mkdir(parents=True)
            (root / "Fold 1/masks/fold1").mkdir(parents=True)
            np.save(root / "Fold 1/images/fold1/images.npy", images.astype(np.float64))
            np.save(root / "Fold 1/images/fold1/types.npy", types)
            np.save(root / "Fold 1/masks/fold1/masks.npy", masks)
        else:
            (root / "fold2").mkdir()  # compact dtypes: uint8 images, int16 masks
            np.save(root / "fold2/images.npy", images)
            np.save(root / "fold2/masks.npy", masks.astype(np.int16))
            np.save(root / "fold2/types.npy", types)
        expected[fold] = rows
    return root, expected


def _check(ds, rows, fold):
    assert len(ds) == len(rows)
    assert ds.class_names == PANNUKE_CLASS_NAMES
    for i, (s, (image, _, inst, classes, tissue)) in enumerate(zip(ds, rows, strict=True)):
        assert s.image.dtype == np.uint8
        np.testing.assert_array_equal(s.image, image)
        np.testing.assert_array_equal(s.instances, inst)
        assert s.classes == classes
        assert s.tissue == tissue and s.mpp == 0.25
        assert s.meta == {"fold": fold, "index": i}
        assert s.name == f"fold{fold}_{i}"


def test_release_layout_fold(release):
    root, expected = release
    ds = PanNukeFold(root / "Fold 1")
    assert ds.fold == 1 and ds.tissues == ["Breast", "Breast", "Colon"]
    assert isinstance(ds.images, np.memmap)  # lazy: nothing read up front
    _check(ds, expected[1], 1)
    # Every class channel is used and ids shared between channels became distinct instances.
    assert [s.n_instances for s in ds] == [18, 25, 33]
    assert set().union(*(s.classes.values() for s in ds)) == {1, 2, 3, 4, 5}
    assert all(np.any((r[1][..., :5] > 0).sum(axis=-1) == 0) for r in expected[1])
    shared = [np.intersect1d(r[1][..., 0], r[1][..., 4]) for r in expected[1]]
    assert max(np.count_nonzero(x) for x in shared) > 0  # some ids occur in two channels


def test_flat_layout_fold(release):
    root, expected = release
    ds = PanNukeFold(root / "fold2")
    assert ds.fold == 2
    _check(ds, expected[2], 2)
    assert ds[1].n_instances == 53  # NuCLS test_3: 28 Non-Tumor + 25 Tumor


def test_pickles_paths_not_pixels(release):
    root, expected = release
    ds = PanNukeFold(root / "Fold 1")
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the arrays are ~14 MB
    again = pickle.loads(blob)
    assert isinstance(again.images, np.memmap)
    _check(again, expected[1], 1)


def test_open_dataset_release_root(release):
    root, expected = release
    assert detect_format(root) == "pannuke"
    assert find_pannuke_folds(root) == {1: root / "Fold 1", 2: root / "fold2"}
    ds = open_dataset(root)
    assert len(ds) == 5 and ds.ids[3] == "fold2_0"
    np.testing.assert_array_equal(ds[3].instances, expected[2][0][2])
    only2 = open_dataset(root, split="fold2")
    assert only2.ids == ["fold2_0", "fold2_1"]
    assert open_dataset(root / "Fold 1/images/fold1/images.npy").ids == ["fold1_0", "fold1_1", "fold1_2"]
    with pytest.raises(InputError, match=r"no fold \[3\]; folds here: \[1, 2\]"):
        open_dataset(root, split="3")


def test_from_arrays_and_metadata(release):
    root, expected = release
    rows = expected[1]
    ds = pannuke_from_arrays(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                             [r[4] for r in rows], fold=1)
    _check(ds, rows, 1)
    meta = PanNukeFold(root / "fold2").metadata()
    assert meta.to_dict("list") == {"pannuke_fold": [2, 2], "index": [0, 1], "tissue": ["Breast", "Breast"]}


def test_overlapping_channels_later_wins(release):
    _, expected = release
    mask = expected[1][0][1].copy()
    inst = expected[1][0][2]
    victim = int(np.flatnonzero(np.bincount(inst.ravel()))[1])  # the first instance
    where = inst == victim
    mask[where, 4] = 99  # the same pixels also claimed by an epithelial nucleus
    got, classes = pannuke_masks_to_instances(mask)
    assert len(classes) == len(expected[1][0][3])  # the covered one vanished, the new one appeared
    new_id = got[where][0]
    assert np.all(got[where] == new_id) and classes[new_id] == 5


# --- bad input ---------------------------------------------------------------------------------------------

def _arrays(expected):
    rows = expected[2]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), np.array([r[4] for r in rows])


def test_bad_arrays(release):
    _, expected = release
    images, masks, types = _arrays(expected)
    with pytest.raises(InputError, match=r"PanNuke masks must be N×H×W×6 matching images"):
        pannuke_from_arrays(images, masks[:, :128])
    with pytest.raises(InputError, match=r"2 tissue types for 1 patches"):
        pannuke_from_arrays(images[:1], masks[:1], types)
    with pytest.raises(InputError, match=r"PanNuke images are empty"):
        pannuke_from_arrays(np.zeros((1, 0, 0, 3), np.uint8), np.zeros((1, 0, 0, 6)))
    frac = masks.copy()
    frac[0, ..., 2][frac[0, ..., 2] > 0] += 0.5
    with pytest.raises(InputError, match=r"\[0\]: instance map holds non-integer values"):
        pannuke_from_arrays(images, frac)[0]
    bright = images.astype(np.float64)
    bright[1, 0, 0, 0] = 300.0
    with pytest.raises(InputError, match=r"\[1\]: PanNuke float image values must lie in 0\.\.255"):
        pannuke_from_arrays(bright, masks)[1]


def test_bad_files(tmp_path, release):
    _, expected = release
    images, masks, types = _arrays(expected)
    np.save(tmp_path / "images.npy", images)
    with pytest.raises(InputError, match=r"no masks\.npy found"):
        PanNukeFold(tmp_path)
    np.save(tmp_path / "masks.npy", masks[:, :, :100])
    with pytest.raises(InputError, match=r"masks\.npy: PanNuke masks must be N×H×W×6"):
        PanNukeFold(tmp_path)
    np.save(tmp_path / "masks.npy", masks)
    data = (tmp_path / "images.npy").read_bytes()
    (tmp_path / "images.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"images\.npy: cannot read \.npy"):
        PanNukeFold(tmp_path)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "types.npy", np.array(list(types), dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"types\.npy: holds Python objects"):
        PanNukeFold(tmp_path)
    (tmp_path / "types.npy").unlink()
    assert PanNukeFold(tmp_path)[0].tissue is None
    (tmp_path / "copy").mkdir()
    np.save(tmp_path / "copy/images.npy", images)
    with pytest.raises(InputError, match=r"several images\.npy files"):
        PanNukeFold(tmp_path)


def test_protocols_on_the_fixture(release):
    from karyo.data.protocols import apply_protocol, ivaan_organ_group_splits, pannuke_official_splits

    root, _ = release
    table = pd.concat([PanNukeFold(root / "Fold 1").metadata(), PanNukeFold(root / "fold2").metadata()])
    official = apply_protocol(pannuke_official_splits()[1], table)  # train fold 2, val fold 1, test fold 3
    assert official == {"train": [(2, 0), (2, 1)], "val": [(1, 0), (1, 1), (1, 2)], "test": []}
    colon_group = apply_protocol(ivaan_organ_group_splits()[1], table)  # group 2 holds Colon
    assert colon_group == {"train": [(1, 0), (1, 1), (2, 0), (2, 1)], "val": [], "test": [(1, 2)]}
    breast_group = apply_protocol(ivaan_organ_group_splits()[3], table)
    assert breast_group["test"] == [(1, 0), (1, 1), (2, 0), (2, 1)] and breast_group["train"] == [(1, 2)]
