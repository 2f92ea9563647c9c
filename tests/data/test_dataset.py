"""NucleusDataset and collate_nuclei on real CoNSeP, MoNuSeg and DSB samples."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.measure import regionprops
from torch.utils.data import DataLoader

from karyo.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from karyo.data.dataset import NucleusDataset, collate_nuclei, instance_centroids
from karyo.data.io import read_image, read_instances
from karyo.data.sample import Sample
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data

CONSEP_IDS = ("train_1_000", "train_4_005", "test_3_010", "train_26_003")


def load_sample(root: Path, name: str) -> Sample:
    image = read_image(root / "images" / f"{name}.png")
    instances = read_instances(root / "instances" / f"{name}.png", image.shape[:2])
    classes = None
    table = root / "classes" / f"{name}.csv"
    if table.is_file():
        with table.open(newline="") as fh:
            classes = {int(r["instance_id"]): int(r["class_id"]) for r in csv.DictReader(fh)}
    return Sample(image=image, instances=instances, classes=classes, name=name)


@pytest.fixture(scope="module")
def consep(shared_data: Path) -> list[Sample]:
    return [load_sample(shared_data / "consep", name) for name in CONSEP_IDS]


@pytest.fixture(scope="module")
def monuseg(shared_data: Path) -> Sample:
    return load_sample(shared_data / "monuseg_test", "TCGA-2Z-A9J9-01A-01-TS1")


def check_item_consistency(item: dict) -> None:
    """types, classes, ids and centroids all agree with the instance map."""
    inst = item["instances"].numpy()
    ids = item["instance_ids"].numpy()
    np.testing.assert_array_equal(ids, np.unique(inst[inst > 0]))
    types = item["types"].numpy()
    for k, c, (x, y) in zip(ids, item["classes"].numpy(), item["centroids"].numpy(), strict=True):
        pix = inst == k
        assert np.all(types[pix] == c)
        ys, xs = np.nonzero(pix)
        assert (x, y) == pytest.approx((xs.mean(), ys.mean()), abs=1e-4)
    assert np.all(types[inst == 0] == 0)


def test_evaluation_items_are_the_normalised_sample(consep):
    ds = NucleusDataset(consep, AugmentConfig(seed=1), train=False)
    assert len(ds) == len(consep)
    for sample, item in zip(consep, ds, strict=True):
        assert item["name"] == sample.name
        img = item["image"].numpy()
        assert img.shape == (3, 256, 256)
        assert img.dtype == np.float32
        expect = (sample.image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        np.testing.assert_allclose(img, expect.transpose(2, 0, 1), atol=1e-5)
        np.testing.assert_array_equal(item["instances"].numpy(), sample.instances)
        assert item["instances"].dtype == torch.int64
        np.testing.assert_array_equal(item["types"].numpy(), sample.type_map())
        props = regionprops(sample.instances)
        np.testing.assert_array_equal(item["instance_ids"].numpy(), [p.label for p in props])
        np.testing.assert_allclose(item["centroids"].numpy(), [p.centroid[::-1] for p in props], atol=1e-4)
        np.testing.assert_array_equal(item["classes"].numpy(), [sample.classes[p.label] for p in props])
        assert item["orig_size"].tolist() == [256, 256]
    again = ds[1]
    np.testing.assert_array_equal(again["image"].numpy(), ds[1]["image"].numpy())


def test_evaluation_padding_to_a_multiple_of_32(consep):
    s = consep[0]
    small = Sample(image=s.image[:250, :230], instances=s.instances[:250, :230],
                   classes={k: v for k, v in s.classes.items() if (s.instances[:250, :230] == k).any()},
                   name="cut")
    plain = NucleusDataset([small], AugmentConfig(), train=False)[0]
    item = NucleusDataset([small], AugmentConfig(), train=False, pad_multiple=32)[0]
    assert item["image"].shape == (3, 256, 256)
    assert item["orig_size"].tolist() == [250, 230]
    np.testing.assert_array_equal(item["image"][:, :250, :230].numpy(), plain["image"].numpy())
    np.testing.assert_array_equal(item["image"][:, 250:, :230].numpy(),
                                  plain["image"].numpy()[:, 248:242:-1, :])  # reflected rows
    assert not item["instances"][250:].any()
    assert not item["instances"][:, 230:].any()
    np.testing.assert_array_equal(item["instances"][:250, :230].numpy(), small.instances)
    np.testing.assert_array_equal(item["centroids"].numpy(), plain["centroids"].numpy())


def test_training_items_are_consistent(consep):
    ds = NucleusDataset(consep, AugmentConfig(seed=0, p_elastic=1.0, p_grid_shuffle=1.0), train=True)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 256, 256)
        assert item["image"].dtype == torch.float32
        assert item["instances"].shape == (256, 256)
        check_item_consistency(item)
        assert set(item["classes"].tolist()) <= set(consep[i].classes.values())  # every CoNSeP nucleus is typed
        assert item["classes"].min() >= 1


def test_seeded_training_is_reproducible_per_epoch_and_worker_independent(consep):
    cfg = AugmentConfig(seed=7)
    a, b = NucleusDataset(consep, cfg), NucleusDataset(consep, AugmentConfig(seed=7))
    for i in (0, 2):
        np.testing.assert_array_equal(a[i]["image"].numpy(), b[i]["image"].numpy())
        np.testing.assert_array_equal(a[i]["instances"].numpy(), b[i]["instances"].numpy())
    first = a[0]["instances"].numpy()
    a.set_epoch(1)
    assert not np.array_equal(a[0]["instances"].numpy(), first)
    a.set_epoch(0)
    np.testing.assert_array_equal(a[0]["instances"].numpy(), first)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(a, batch_size=2, num_workers=workers, collate_fn=collate_nuclei)
        batches[workers] = list(loader)
    for x, y in zip(batches[0], batches[2], strict=True):
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)
        torch.testing.assert_close(x["instances"], y["instances"], rtol=0, atol=0)
    unseeded = NucleusDataset(consep, AugmentConfig())
    assert not all(np.array_equal(unseeded[0]["image"].numpy(), unseeded[0]["image"].numpy()) for _ in range(3))


def test_large_images_give_several_random_crops(consep, monuseg):
    ds = NucleusDataset([consep[0], monuseg], AugmentConfig(seed=0), crops_per_image="auto")
    assert len(ds) == 1 + 16  # 256 patch: 1; 1000×1000: ceil(1000/256)² = 16
    assert [ds.sample_index(i) for i in (0, 1, 16)] == [0, 1, 1]
    crops = [ds[i] for i in (1, 2, 3)]
    for item in crops:
        assert item["image"].shape == (3, 256, 256)
        assert item["name"] == monuseg.name
        assert item["orig_size"].tolist() == [1000, 1000]
        check_item_consistency(item)
    assert not np.array_equal(crops[0]["image"].numpy(), crops[1]["image"].numpy())
    assert len(NucleusDataset([consep[0]], AugmentConfig(), crops_per_image=3)) == 3
    with pytest.raises(ValueError, match="crops_per_image"):
        NucleusDataset([consep[0]], AugmentConfig(), train=False, crops_per_image=3)


def test_one_and_five_channel_images(consep, shared_data):
    fluo = load_sample(shared_data / "dsb2018_fluo_subset",
                       "0402a81e75262469925ea893b6706183832e85324f7b1e08e634129f5d522cdd")
    assert fluo.image.shape == (260, 347, 1)
    rgb = consep[0]
    grey = rgb.image.mean(axis=2, keepdims=True).astype(np.uint8)
    five = Sample(image=np.concatenate([rgb.image, grey, 255 - grey], axis=2), instances=rgb.instances,
                  classes=rgb.classes, name="five")
    cfg = AugmentConfig(seed=3, mean=(0.1, 0.2, 0.3, 0.4, 0.5), std=(0.5, 0.4, 0.3, 0.2, 0.1))
    for sample, c in ((fluo, 1), (five, 5)):
        item = NucleusDataset([sample], cfg)[0]
        assert item["image"].shape == (c, 256, 256)
        check_item_consistency(item)
        if c == 1:  # DSB has no classes: every nucleus is unclassified
            assert not item["classes"].any()
            assert not item["types"].any()
        ev = NucleusDataset([sample], cfg, train=False)[0]
        mean, std = cfg.channel_stats(c)
        expect = (sample.image / 255.0 - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(ev["image"].numpy(), expect.transpose(2, 0, 1), atol=1e-5)
    assert cfg.channel_stats(1) == ((0.5,), (0.5,))  # 5 stats do not fit 1 channel: fallback


def test_uint16_input_is_scaled_like_uint8(consep):
    s = consep[1]
    s16 = Sample(image=s.image.astype(np.uint16) * 257, instances=s.instances, classes=s.classes, name="u16")
    a = NucleusDataset([s], AugmentConfig(), train=False)[0]
    b = NucleusDataset([s16], AugmentConfig(), train=False)[0]
    np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), atol=1e-5)
    cfg = AugmentConfig(seed=2, pixel=False, colour=False)
    ta, tb = NucleusDataset([s], cfg)[0], NucleusDataset([s16], cfg)[0]
    np.testing.assert_allclose(ta["image"].numpy(), tb["image"].numpy(), atol=1e-5)


def test_collate_stacks_maps_and_lists_variable_fields(consep):
    ds = NucleusDataset(consep, AugmentConfig(seed=4))
    items = [ds[i] for i in range(3)]
    batch = collate_nuclei(items)
    assert batch["image"].shape == (3, 3, 256, 256)
    assert batch["instances"].shape == (3, 256, 256)
    assert batch["types"].shape == (3, 256, 256)
    assert batch["orig_size"].shape == (3, 2)
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["name"] == list(CONSEP_IDS[:3])
    for i, item in enumerate(items):
        torch.testing.assert_close(batch["image"][i], item["image"], rtol=0, atol=0)
        torch.testing.assert_close(batch["types"][i], item["types"], rtol=0, atol=0)
        for key in ("centroids", "classes", "instance_ids"):
            torch.testing.assert_close(batch[key][i], item[key], rtol=0, atol=0)
        assert batch["centroids"][i].shape == (len(item["instance_ids"]), 2)
    assert len({len(x) for x in batch["instance_ids"]}) > 1, "counts differ between images"
    small = Sample(image=consep[0].image[:100, :120], name="small")
    odd = NucleusDataset([small], AugmentConfig(), train=False)[0]
    with pytest.raises(ValueError, match="cannot stack"):
        collate_nuclei([items[0], odd])


def test_unannotated_samples(consep):
    bare = Sample(image=consep[0].image, name="bare")
    item = NucleusDataset([bare], AugmentConfig(), train=False)[0]
    assert not item["instances"].any()
    assert item["centroids"].shape == (0, 2)
    assert item["instance_ids"].shape == (0,)
    with pytest.raises(InputError, match="bare: has no instance map"):
        NucleusDataset([bare], AugmentConfig(), train=True)[0]


def test_instance_centroids_handles_gaps_and_empty_maps():
    inst = np.zeros((5, 6), dtype=np.int32)
    inst[0, 0:2] = 9
    inst[3:5, 4] = 2
    ids, cents = instance_centroids(inst)
    assert ids.tolist() == [2, 9]
    np.testing.assert_allclose(cents, [[4.0, 3.5], [0.5, 0.0]])
    ids, cents = instance_centroids(np.zeros((3, 3), dtype=np.int32))
    assert ids.shape == (0,)
    assert cents.shape == (0, 2)
