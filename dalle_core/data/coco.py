"""MS-COCO captions: the zero-shot evaluation set's format (paper section 3.2).

Reads and writes the official captions JSON (`captions_val2014.json`,
`captions_val2017.json`): a top-level object with `images` (id, file_name,
width, height, ...) and `annotations` (id, image_id, caption), usually five
captions per image. The demo world writes its held-out evaluation set in the
same format, so the evaluation code cannot tell it from the real thing.

A captions file is input, not code: every `file_name` must name a file inside
the image folder (a plain relative path: no absolute path, no `..`, no
backslash or drive letter, nothing that resolves outside the folder through a
link). The whole file is checked before any image is touched, and a bad entry
is refused with its index and the reason (`CocoFormatError`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class CocoFormatError(ValueError):
    """A captions file (or its image folder) that cannot be used, with the reason."""


_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_LISTED = 5  # bad entries named in one error


def unsafe_file_name(file_name: str) -> str | None:
    """Why `file_name` is not a plain relative path inside the image folder, or None.

    On the name alone (no file system): the same rule holds for an image folder
    and for the storage keys the evaluation set is copied to.
    """
    if not file_name:
        return "empty file_name"
    if _CONTROL.search(file_name):
        return "control character in file_name"
    if "\\" in file_name:
        return "backslash in file_name (a Windows path separator; use '/')"
    if _DRIVE.match(file_name):
        return "drive letter: an absolute Windows path"
    if file_name.startswith("/"):
        return "absolute path"
    parts = file_name.split("/")
    if ".." in parts:
        return "'..' component: leaves the image folder"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path component (not a plain relative path)"
    return None


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
    must exist there as `image_dir / file_name`, inside `image_dir` also once
    links are resolved. Images without any caption are kept with an empty
    caption list (`check_eval_set` refuses them for an evaluation). Every
    entry's file_name is checked (`unsafe_file_name`) before anything else
    happens; nothing is read but the JSON and the folder's file names.
    """
    captions_json = Path(captions_json)

    def fail(problem: str) -> CocoFormatError:
        return CocoFormatError(f"{captions_json}: {problem}")

    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise fail(f"limit={limit!r} must be a positive integer (or None for every image)")

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
    names: dict[str, int] = {}
    unsafe: list[str] = []
    for i, entry in enumerate(data["images"]):
        try:
            image_id, file_name = int(entry["id"]), entry["file_name"]
        except (KeyError, TypeError, ValueError):
            raise fail(f"images[{i}] needs an integer 'id' and a 'file_name'") from None
        if not isinstance(file_name, str):
            raise fail(f"images[{i}] (id {image_id}) file_name {file_name!r} is not a string")
        if image_id in images:
            raise fail(f"images[{i}] repeats image id {image_id}")
        why = unsafe_file_name(file_name)
        if why:
            unsafe.append(f"images[{i}] (id {image_id}) file_name {file_name!r}: {why}")
        elif file_name in names:
            raise fail(f"images[{i}] (id {image_id}) repeats file_name {file_name!r} of image id {names[file_name]}")
        names[file_name] = image_id
        images[image_id] = CocoImage(image_id, file_name, entry.get("width"), entry.get("height"))
    if unsafe:
        more = f" (and {len(unsafe) - MAX_LISTED} more)" if len(unsafe) > MAX_LISTED else ""
        raise fail(
            f"{len(unsafe)} file_name(s) would leave the image folder, refused before reading anything: "
            + "; ".join(unsafe[:MAX_LISTED]) + more
        )

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
    root = Path(image_dir).resolve() if image_dir is not None else None
    if root is not None and not root.is_dir():
        raise fail(f"image folder {image_dir} does not exist")
    for image in out:
        # annotation order within an image follows annotation ids, as in COCO
        image.captions = [c for _, c in sorted(captions[image.image_id])]
        if root is not None:
            image.path = Path(image_dir) / image.file_name
            if not image.path.resolve().is_relative_to(root):  # a link that points out of the folder
                raise fail(
                    f"image {image.image_id} file_name {image.file_name!r} resolves to"
                    f" {image.path.resolve()}, outside the image folder {root}"
                )
            if not image.path.is_file():
                raise fail(f"image {image.image_id} file {image.path} does not exist")
    return out


def check_eval_set(images: list[CocoImage], captions_json: str | Path) -> None:
    """An evaluation set must have images, and every image a caption (zero-shot scores each image's
    captions); else CocoFormatError naming the file and what is missing."""
    if not images:
        raise CocoFormatError(f"{captions_json}: the evaluation set has no images (its 'images' list is empty)")
    if not any(im.captions for im in images):
        raise CocoFormatError(
            f"{captions_json}: the evaluation set has no captions ({len(images)} image(s), no 'annotations' for any)"
        )
    bare = [im.image_id for im in images if not im.captions]
    if bare:
        shown = ", ".join(str(i) for i in bare[:MAX_LISTED]) + (", ..." if len(bare) > MAX_LISTED else "")
        raise CocoFormatError(
            f"{captions_json}: {len(bare)} of {len(images)} image(s) have no caption (image ids {shown});"
            " every evaluation image needs at least one"
        )


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
