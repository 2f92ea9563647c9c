"""A plain folder of images without labels (what inference runs on), as Samples holding an image only."""

from __future__ import annotations

import os
from pathlib import Path

from karyo.data.io import IMAGE_SUFFIXES, list_images, read_image_meta
from karyo.data.sample import Sample, SampleSequence
from karyo.errors import InputError


class ImageFolder(SampleSequence):
    """The images of a folder (sorted by name; ``recursive`` also takes subfolders), or one image file.

    Ids are file stems (paths relative to the folder, without suffix, when recursive), so two files that
    differ only in suffix are refused rather than silently sharing an id.
    """

    def __init__(self, path: str | os.PathLike, recursive: bool = False):
        path = Path(path)
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(path, f"not an image file (suffixes: {', '.join(IMAGE_SUFFIXES)})")
            self.root, self._paths = path.parent, [path]
        elif recursive:
            if not path.is_dir():
                raise InputError(path, "folder not found")
            self.root = path
            self._paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                 and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            self.root, self._paths = path, list_images(path)
        if not self._paths:
            raise InputError(path, f"no image files ({', '.join(IMAGE_SUFFIXES)})")
        self._ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in self._paths]
        if len(set(self._ids)) != len(self._ids):
            dup = next(i for i in self._ids if self._ids.count(i) > 1)
            raise InputError(self.root, f"several images named {dup!r} (different suffixes)")

    def _load(self, i: int) -> Sample:
        path = self._paths[i]
        image, meta = read_image_meta(path)
        return Sample(image=image, name=self._ids[i], mpp=meta["mpp"], channel_names=meta["channel_names"],
                      source=str(path))
