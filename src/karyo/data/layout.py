"""karyo's own dataset layout (the one ../shared/data uses), read lazily and written one sample at a time.

::

    <root>/images/<id>.png       image (uint8 PNG; .tif for 16-bit, float or multi-channel images)
    <root>/instances/<id>.png    16-bit instance map, 0 = background (.tif when ids exceed 65535)
    <root>/classes/<id>.csv      header ``instance_id,class_id``; only when classes are known
    <root>/classes.json          {"<class_id>": "<name>"}; when present every id needs a class CSV
    <root>/split.csv             header ``id,split`` (+ optional ``tissue``, ``mpp`` columns)

Only ``images/`` is required; without ``split.csv`` the ids are the image names and have no split.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from karyo.data.io import (
    IMAGE_SUFFIXES,
    _caller_stacklevel,
    check_mpp,
    image_stem,
    mpp_override,
    read_image_meta,
    read_instances,
    write_image,
    write_instances,
    write_text,
)
from karyo.data.sample import Sample, SampleSequence, validate_classes
from karyo.errors import InputError

CLASS_CSV_HEADER = ("instance_id", "class_id")
INSTANCE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def read_class_names(path: str | os.PathLike) -> dict[int, str]:
    """Read ``classes.json`` ({"<class_id>": "<name>"}) as {int id: name}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read class names ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, 'expected a non-empty object {"<class_id>": "<name>"}')
    try:
        names = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise InputError(path, f"class ids must be integers, got {sorted(raw)}") from None
    if min(names) < 1:
        raise InputError(path, f"class ids start at 1 (0 is background), got {sorted(names)}")
    return dict(sorted(names.items()))


def read_class_csv(path: str | os.PathLike, instances: np.ndarray | None = None,
                   class_names: dict[int, str] | None = None, *, complete: bool = False) -> dict[int, int]:
    """Read a ``instance_id,class_id`` CSV, checked against the instance map and the known class ids.

    ``complete``: every instance of ``instances`` must have a row (class 0 for unclassified). A CSV given by
    hand beside an instance map is then checked to be that map's: another image's CSV would otherwise
    classify some nuclei and silently leave the rest without a class."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "class file not found" + (" (classes.json exists, so every image needs one)"
                                                         if class_names else ""))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read class CSV ({exc})") from None
    rows = list(csv.reader(_io.StringIO(text)))
    header = tuple(c.strip() for c in rows[0]) if rows else ()
    if header != CLASS_CSV_HEADER:
        raise InputError(path, f"class CSV header must be {','.join(CLASS_CSV_HEADER)!r}, got {','.join(header)!r}")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    bad = next((n for n, r in enumerate(body, start=2) if len(r) != 2), None)
    if bad is not None:
        raise InputError(path, f"line {bad}: expected 2 fields, got {len(body[bad - 2])}")
    try:
        table = np.array([[int(a), int(b)] for a, b in body], dtype=np.int64).reshape(-1, 2)
    except ValueError as exc:
        raise InputError(path, f"class CSV holds a non-integer value ({exc})") from None
    ids, counts = np.unique(table[:, 0], return_counts=True)
    if np.any(counts > 1):
        raise InputError(path, f"instance id(s) listed more than once: {ids[counts > 1][:10].tolist()}")
    if complete and instances is not None:
        present = np.unique(instances)
        present = present[present > 0]
        lacking = np.setdiff1d(present, ids)
        if lacking.size:
            raise InputError(path, f"lists {len(ids)} instance(s) but the instance map holds {len(present)}; no row "
                                   f"for id(s) {lacking[:10].tolist()}{' ...' if lacking.size > 10 else ''} (is it "
                                   f"this image's class CSV?)")
    classes = dict(zip(table[:, 0].tolist(), table[:, 1].tolist(), strict=True))
    return validate_classes(classes, instances, class_names, str(path))


class LayoutDataset(SampleSequence):
    """A dataset folder in karyo's layout as a lazy sequence of :class:`Sample`.

    ``split`` keeps the ids of one split (or several, as a list); ``ids`` keeps these ids, in this order.
    ``mpp`` applies to samples whose ``split.csv`` row and image file do not state one.
    """

    def __init__(self, root: str | os.PathLike, split: str | list[str] | None = None,
                 ids: list[str] | None = None, mpp: float | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "dataset folder not found")
        self.mpp = mpp
        self._rows = self._read_split_csv()
        self._images = _index_by_stem(self.root / "images", IMAGE_SUFFIXES)
        if self._rows is None:
            stems = self._images or _index_by_stem(self.root / "instances", INSTANCE_SUFFIXES)
            if not stems:
                raise InputError(self.root, "no images/ (or instances/) files and no split.csv: not a dataset folder")
            self._rows = {stem: {"id": stem} for stem in stems}
        self.splits: dict[str, list[str]] = {}
        for id_, row in self._rows.items():
            if row.get("split"):
                self.splits.setdefault(row["split"], []).append(id_)
        selected = list(self._rows)
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            unknown = [s for s in wanted if s not in self.splits]
            if unknown:
                raise InputError(self.root / "split.csv" if self.splits else self.root,
                                 f"no split named {', '.join(map(repr, unknown))}; splits here: "
                                 f"{', '.join(sorted(self.splits)) or 'none (no split.csv with id,split rows)'}")
            selected = [i for i in selected if self._rows[i].get("split") in wanted]
        if ids is not None:
            missing = [i for i in ids if i not in self._rows]
            if missing:
                raise InputError(self.root, f"unknown id(s) {missing[:5]}")
            keep = set(selected)
            selected = [i for i in ids if i in keep]
        self._ids = selected
        names_path = self.root / "classes.json"
        self.class_names = read_class_names(names_path) if names_path.is_file() else None

    def _read_split_csv(self) -> dict[str, dict[str, str]] | None:
        path = self.root / "split.csv"
        if not path.is_file():
            return None
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = [c.strip() for c in reader.fieldnames or []]
                if "id" not in fields:
                    raise InputError(path, f"needs an 'id' column (header 'id,split'), got {fields}")
                rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(path, f"cannot read split.csv ({exc})") from None
        out: dict[str, dict[str, str]] = {}
        for r in rows:
            if r.get("id"):
                if r["id"] in out:
                    raise InputError(path, f"id {r['id']!r} is listed more than once")
                out[r["id"]] = r
        return out

    def split_of(self, id_: str) -> str | None:
        return self._rows[id_].get("split") or None

    def tissue_of(self, id_: str) -> str | None:
        return self._rows[id_].get("tissue") or None

    def image_path(self, id_: str) -> Path:
        path = self._images.get(id_)
        if path is None:
            raise InputError(self.root / "images" / f"{id_}.png", "image file not found")
        return path

    def labels(self, i: int) -> tuple[np.ndarray | None, dict[int, int] | None]:
        """Instance map and classes of item ``i`` without decoding its image (what evaluation needs)."""
        return self._labels(self._ids[self._index(i)], None)

    def _labels(self, id_: str, shape: tuple[int, int] | None) -> tuple[np.ndarray | None, dict[int, int] | None]:
        inst_dir = self.root / "instances"
        if not inst_dir.is_dir():
            return None, None
        path = _find_by_stem(inst_dir, id_, INSTANCE_SUFFIXES)
        if path is None:
            near = sorted(p.name for p in inst_dir.glob(f"{id_}*"))[:3]
            hint = (f"; {', '.join(near)} is there: the instance map must be named by its image's id exactly"
                    if near else f" (looked for {id_} with {', '.join(INSTANCE_SUFFIXES)})")
            raise InputError(inst_dir / f"{id_}.png", "instance map not found" + hint)
        instances = read_instances(path, shape)
        csv_path = self.root / "classes" / f"{id_}.csv"
        if self.class_names is None and not csv_path.is_file():
            return instances, None
        try:
            return instances, read_class_csv(csv_path, instances, self.class_names)
        except InputError:
            if shape is None:  # read without the image: a cropped map loses ids, so say that first if it is so
                self.check_against_image(id_, instances.shape)
            raise

    def check_against_image(self, id_: str, shape: tuple[int, ...]) -> None:
        """Refuse, naming the file, an instance map of ``shape`` read without its image (evaluation reads labels
        only) that does not fit that image; nothing to check in a labels-only folder."""
        image = self._images.get(id_)
        if image is None:
            return
        path = _find_by_stem(self.root / "instances", id_, INSTANCE_SUFFIXES)
        image_shape = read_image_meta(image)[0].shape[:2]
        if tuple(image_shape) != tuple(shape[:2]):
            raise InputError(path, f"instance map shape {shape[1]}×{shape[0]} differs from image shape "
                                   f"{image_shape[1]}×{image_shape[0]} ({image.name})")

    def _load(self, i: int) -> Sample:
        id_ = self._ids[i]
        row = self._rows[id_]
        path = self.image_path(id_)
        image, meta = read_image_meta(path)
        instances, classes = self._labels(id_, image.shape[:2])
        listed = _float_or_none(row.get("mpp"), self.root / "split.csv")
        override = mpp_override(listed, meta["mpp"])
        if override:
            warnings.warn(f"{self.root / 'split.csv'}: id {id_!r}: {override} ({path.name})",
                          stacklevel=_caller_stacklevel())
        mpp = listed or meta["mpp"] or self.mpp
        return Sample(image=image, instances=instances, classes=classes, name=id_, tissue=row.get("tissue") or None,
                      class_names=self.class_names, mpp=mpp, channel_names=meta["channel_names"], source=str(path),
                      meta={"split": row.get("split") or None, "photometric": meta.get("photometric")})


def write_layout_sample(root: str | os.PathLike, sample: Sample, split: str | None = None,
                        image: bool = True) -> None:
    """Write one sample into a layout folder (each file atomically) and add or replace its split.csv row.

    The image goes to PNG when it is uint8 with 1 or 3 channels, else to an OME-TIFF carrying channel names
    and mpp. ``image=False`` writes labels only (predictions beside an existing image folder). ``split``
    defaults to ``sample.meta["split"]`` or ``"test"``. Not safe for two processes writing one root at once.
    """
    root = Path(root)
    name = sample.name
    if not name or name != Path(name).name or name.startswith("."):
        raise InputError(root, f"sample name {name!r} cannot be a file name in the layout")
    names_path = root / "classes.json"
    if sample.class_names:
        if names_path.is_file() and read_class_names(names_path) != sample.class_names:
            raise InputError(names_path, f"holds class names {read_class_names(names_path)}, the sample has "
                                         f"{sample.class_names}")
        write_text(names_path, json.dumps({str(k): v for k, v in sorted(sample.class_names.items())}, indent=1))
    if image:
        img = sample.image
        if img.dtype == np.uint8 and img.shape[2] in (1, 3):
            target = write_image(root / "images" / f"{name}.png", img)
        else:
            target = write_image(root / "images" / f"{name}.tif", img, channel_names=sample.channel_names,
                                 mpp=sample.mpp)
        _remove_other_suffixes(target, IMAGE_SUFFIXES)
    if sample.instances is not None:
        big = sample.instances.max(initial=0) > 65535
        target = write_instances(root / "instances" / f"{name}{'.tif' if big else '.png'}", sample.instances)
        _remove_other_suffixes(target, INSTANCE_SUFFIXES)
    class_csv = root / "classes" / f"{name}.csv"
    if sample.classes is not None:
        lines = ["instance_id,class_id"] + [f"{k},{v}" for k, v in sorted(sample.classes.items())]
        write_text(class_csv, "\n".join(lines) + "\n")
    elif class_csv.is_file():  # an older version of this sample had classes; they no longer apply
        class_csv.unlink()
    _update_split_csv(root / "split.csv", name, {
        "split": split or sample.meta.get("split") or "test",
        "tissue": sample.tissue or "",
        "mpp": "" if sample.mpp is None else repr(float(sample.mpp)),
    })


def _update_split_csv(path: Path, id_: str, values: dict[str, str]) -> None:
    rows: dict[str, dict[str, str]] = {}
    columns = ["id", "split"]
    if path.is_file():
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "id" not in (reader.fieldnames or []):
                raise InputError(path, f"needs an 'id' column (header 'id,split'), got {reader.fieldnames}")
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows = {r["id"]: r for r in reader}
    row = rows.setdefault(id_, {"id": id_})
    for key, value in values.items():
        if value or key in columns:
            row[key] = value
            if key not in columns:
                columns.append(key)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows.values())
    write_text(path, buf.getvalue())


def _index_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{stem: path} of a folder's files with these suffixes; two files for one stem are refused."""
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes:
            stem = image_stem(p)  # cells.ome.tif → cells, as everywhere else
            if stem in out:
                raise InputError(p, f"two files for id {stem!r} ({out[stem].name}, {p.name})")
            out[stem] = p
    return out


def _find_by_stem(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    names = [f"{stem}{s}" for s in suffixes] + [f"{stem}.ome{s}" for s in suffixes if s.startswith(".tif")]
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _remove_other_suffixes(target: Path, suffixes: tuple[str, ...]) -> None:
    for s in suffixes:
        other = target.with_suffix(s)
        if other != target and other.is_file():
            other.unlink()


def _float_or_none(text: str | None, source: Path) -> float | None:
    """An mpp cell of split.csv: empty, or a plausible µm/px (the range ``--mpp`` has)."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(source, f"mpp {text!r} is not a number") from None
    return check_mpp(value, source)
