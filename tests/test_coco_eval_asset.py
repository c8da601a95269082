"""The real `coco_eval_set` asset, with the platform's own resources on the tiny profile, on captions
files the test makes: a good set is stored; a hostile or empty one is refused with the file and the
reason, before anything is written (the evaluation set already in storage stays as it was)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image


def _set(root: Path, images: list[dict], annotations: list[dict]) -> tuple[Path, Path]:
    """A captions file and its image folder under `root`; every plain file_name gets a small PNG."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        name = im["file_name"]
        if name and ".." not in name and not name.startswith("/"):
            (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 40), (30 * i % 255, 90, 160)).save(image_dir / name)
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, image_dir


def _materialize(settings, captions_json: Path, image_dir: Path):
    from assets.data import coco_eval_set
    from orchestration.definitions import build_resources

    return dg.materialize(
        [coco_eval_set],
        resources=build_resources(settings),
        run_config={"ops": {"coco_eval_set": {"config": {"captions_json": str(captions_json),
                                                         "image_dir": str(image_dir)}}}},
        raise_on_error=False,
    )


def _failure(result) -> str:
    [event] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return event.step_failure_data.error.message


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


@pytest.fixture
def settings(tmp_path):
    from orchestration.settings import Settings

    return Settings(run_dir=tmp_path / "run", profile="tiny")


def test_good_set_is_stored_and_bad_sets_are_refused_before_anything_is_written(tmp_path, settings):
    storage = Path(settings.storage_root)
    caption = "a small red circle above a large blue square"
    good_images = [{"id": 2, "file_name": "b.png"}, {"id": 1, "file_name": "sub/a.png"}]
    good = _set(tmp_path / "good", good_images,
                [{"image_id": 1, "id": 1, "caption": caption}, {"image_id": 2, "id": 2, "caption": "two shapes"}])
    result = _materialize(settings, *good)
    assert result.success
    assert json.loads((storage / "coco_eval" / "phashes.json").read_text()).keys() == {"b.png", "sub/a.png"}
    assert (storage / "coco_eval" / "images" / "sub" / "a.png").is_file()
    stored = _snapshot(storage)

    # a file_name that leaves the folder, with a real file where it points (it would be read and copied)
    outside = tmp_path / "hostile" / "secret.png"
    outside.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(outside)
    hostile = _set(tmp_path / "hostile", [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "../secret.png"}],
                   [{"image_id": 1, "id": 1, "caption": caption}, {"image_id": 2, "id": 2, "caption": caption}])
    empty = _set(tmp_path / "empty", [], [])
    silent = _set(tmp_path / "silent", [{"id": 1, "file_name": "a.png"}], [])
    cases = [
        (hostile, ["images[1] (id 2) file_name '../secret.png'", "'..' component: leaves the image folder"]),
        (empty, ["has no images"]),
        (silent, ["has no captions"]),
    ]
    for (captions_json, image_dir), expected in cases:
        result = _materialize(settings, captions_json, image_dir)
        assert not result.success
        message = _failure(result)
        assert "evaluation set refused" in message and str(captions_json) in message, message
        for text in expected:
            assert text in message, message
        assert _snapshot(storage) == stored, f"{captions_json}: storage changed by a refused set"
    assert not (storage / "coco_eval" / "images" / "secret.png").exists()
