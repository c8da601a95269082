"""MS-COCO captions: the zero-shot evaluation set's format (paper section 3.2).

Reads and writes the official captions JSON (`captions_val2014.json`,
`captions_val2017.json`): a top-level object with `images` (id, file_name,
width, height, ...) and `annotations` (id, image_id, caption), usually five
captions per image. The demo world writes its held-out evaluation set in the
same format, so the evaluation code cannot tell it from the real thing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class CocoFormatError(ValueError):
    """A captions file (or its image folder) that cannot be used, with the reason."""


@dataclass
class CocoImage:
    image_id: int
    file_name: str
    width: int | None
    height: int | None
    captions: list[str] = field(default_factory=list)
    path: Path | None = None  # the image file, when an image folder was given


def load_coco_captions(
    captions_json: str | Path, image_dir: str | Path | None = None, limit: int | None = None
) -> list[CocoImage]:
    """Images with their captions, sorted by image id.

    `limit` keeps the first N images (by id). With `image_dir`, every kept image
    must exist there as `image_dir / file_name`. Images without any caption are
    kept with an empty caption list.
    """
    captions_json = Path(captions_json)

    def fail(problem: str) -> CocoFormatError:
        return CocoFormatError(f"{captions_json}: {problem}")

    if not captions_json.is_file():
        raise fail("captions file not found")
    try:
        data = json.loads(captions_json.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise fail(f"top level must be an object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise fail(f"missing or non-list {key!r} key (not a COCO captions file?)")

    images: dict[int, CocoImage] = {}
    for i, entry in enumerate(data["images"]):
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            raise fail(f"images[{i}] needs an integer 'id' and a 'file_name'") from None
        if image_id in images:
            raise fail(f"images[{i}] repeats image id {image_id}")
        images[image_id] = CocoImage(image_id, file_name, entry.get("width"), entry.get("height"))

    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, caption = int(ann["image_id"]), ann["caption"]
        except (KeyError, TypeError, ValueError):
            raise fail(f"annotations[{i}] needs an integer 'image_id' and a 'caption'") from None
        if not isinstance(caption, str):
            raise fail(f"annotations[{i}] caption is not a string")
        if image_id not in images:
            raise fail(f"annotations[{i}] refers to image id {image_id}, which has no entry in 'images'")
        captions[image_id].append((int(ann.get("id", i)), caption.strip()))

    out = [images[k] for k in sorted(images)]
    if limit is not None:
        out = out[:limit]
    for image in out:
        # annotation order within an image follows annotation ids, as in COCO
        image.captions = [c for _, c in sorted(captions[image.image_id])]
        if image_dir is not None:
            image.path = Path(image_dir) / image.file_name
            if not image.path.is_file():
                raise fail(f"image {image.image_id} file {image.path} does not exist")
    return out


def write_coco_captions(images: list[CocoImage], path: str | Path, info: dict | None = None) -> Path:
    """Write `images` as a COCO captions JSON (annotation ids numbered from 1)."""
    path = Path(path)
    annotations = []
    for image in sorted(images, key=lambda im: im.image_id):
        for caption in image.captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image.image_id, "caption": caption})
    data = {
        "info": info or {"description": "captions in MS-COCO format"},
        "licenses": [],
        "images": [
            {"id": im.image_id, "file_name": im.file_name, "width": im.width, "height": im.height}
            for im in sorted(images, key=lambda im: im.image_id)
        ],
        "annotations": annotations,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
