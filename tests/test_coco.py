"""MS-COCO captions loader/writer, on a small file in the official layout."""

import json

import pytest

from dalle_core.data.coco import CocoFormatError, CocoImage, load_coco_captions, write_coco_captions


def coco_json(tmp_path, images=None, annotations=None):
    """A captions file shaped like captions_val2014.json (ids unsorted, 5-ish captions each)."""
    data = {
        "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                      "name": "Attribution-NonCommercial-ShareAlike License"}],
        "images": images if images is not None else [
            {"license": 1, "file_name": "COCO_val2014_000000000073.jpg", "coco_url": "http://x/73.jpg",
             "height": 480, "width": 640, "date_captured": "2013-11-14 11:18:45",
             "flickr_url": "http://y/73.jpg", "id": 73},
            {"license": 1, "file_name": "COCO_val2014_000000000042.jpg", "coco_url": "http://x/42.jpg",
             "height": 478, "width": 640, "date_captured": "2013-11-14 16:28:13",
             "flickr_url": "http://y/42.jpg", "id": 42},
            {"license": 1, "file_name": "COCO_val2014_000000000136.jpg", "height": 375, "width": 500,
             "id": 136},
        ],
        "annotations": annotations if annotations is not None else [
            {"image_id": 73, "id": 11, "caption": "A motorcycle parked in a parking space next to another motorcycle."},
            {"image_id": 42, "id": 5, "caption": "This wire metal rack holds several pairs of shoes and sandals\n"},
            {"image_id": 73, "id": 3, "caption": "An old motorcycle parked beside other motorcycles with a brown leather seat. "},
            {"image_id": 42, "id": 9, "caption": "A dog sleeping on a show rack in the shoes."},
            {"image_id": 136, "id": 20, "caption": "Two giraffes in a room with people looking at them."},
        ],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path


def test_groups_captions_by_image_sorted_by_id(tmp_path):
    images = load_coco_captions(coco_json(tmp_path))
    assert [im.image_id for im in images] == [42, 73, 136]
    first = images[0]
    assert first.file_name == "COCO_val2014_000000000042.jpg" and (first.width, first.height) == (640, 478)
    # captions in annotation-id order, stripped of COCO's stray whitespace
    assert first.captions == ["This wire metal rack holds several pairs of shoes and sandals",
                              "A dog sleeping on a show rack in the shoes."]
    assert images[1].captions[0].startswith("An old motorcycle") and len(images[1].captions) == 2
    assert all(im.path is None for im in images)


def test_limit_and_image_dir(tmp_path):
    path = coco_json(tmp_path)
    image_dir = tmp_path / "val2014"
    image_dir.mkdir()
    for name in ("COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"):
        (image_dir / name).write_bytes(b"jpeg")
    images = load_coco_captions(path, image_dir, limit=2)  # only the first two need files
    assert [im.image_id for im in images] == [42, 73]
    assert images[0].path == image_dir / "COCO_val2014_000000000042.jpg"
    with pytest.raises(CocoFormatError, match="COCO_val2014_000000000136.jpg"):
        load_coco_captions(path, image_dir)


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ('{"images": [', "not valid JSON"),
    ("[1, 2]", "top level must be an object"),
    ('{"info": {}, "annotations": []}', "'images'"),
])
def test_clear_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_coco_captions(path)
    assert str(path) in str(e.value)


def test_missing_annotations_key_and_orphan_annotation(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(CocoFormatError, match="'annotations'"):
        load_coco_captions(path)
    orphan = coco_json(tmp_path, annotations=[{"image_id": 999, "id": 1, "caption": "a cat"}])
    with pytest.raises(CocoFormatError, match="image id 999") as e:
        load_coco_captions(orphan)
    assert "captions_val2014.json" in str(e.value)


def test_bad_entries(tmp_path):
    no_id = coco_json(tmp_path, images=[{"file_name": "a.jpg"}], annotations=[])
    with pytest.raises(CocoFormatError, match=r"images\[0\]"):
        load_coco_captions(no_id)
    dup = coco_json(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                    annotations=[])
    with pytest.raises(CocoFormatError, match="repeats image id 1"):
        load_coco_captions(dup)
    not_text = coco_json(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}],
                         annotations=[{"image_id": 1, "id": 1, "caption": 5}])
    with pytest.raises(CocoFormatError, match="not a string"):
        load_coco_captions(not_text)


def test_write_then_load_round_trip(tmp_path):
    images = [CocoImage(7, "b.png", 128, 96, ["a red circle above a blue square", "two shapes"]),
              CocoImage(3, "a.png", 64, 64, ["a small green triangle"])]
    path = write_coco_captions(images, tmp_path / "out" / "captions.json", info={"description": "test"})
    data = json.loads(path.read_text())
    assert {"info", "images", "annotations"} <= set(data)
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3]
    back = load_coco_captions(path)
    assert [(i.image_id, i.file_name, i.width, i.height, i.captions) for i in back] == [
        (3, "a.png", 64, 64, ["a small green triangle"]),
        (7, "b.png", 128, 96, ["a red circle above a blue square", "two shapes"]),
    ]


# --------------------------------------------------------------------------- hostile or empty captions files


@pytest.mark.parametrize("file_name, reason", [
    ("/etc/passwd", "absolute path"),
    ("../secret.jpg", "'..' component"),
    ("val2014/../../secret.jpg", "'..' component"),
    ("val2014/..", "'..' component"),
    ("..\\secret.jpg", "backslash"),
    ("val2014\\x.jpg", "backslash"),
    ("C:\\Windows\\win.ini", "backslash"),
    ("C:secret.jpg", "drive letter"),
    ("c:/secret.jpg", "drive letter"),
    ("\\\\server\\share\\x.jpg", "backslash"),
    ("", "empty file_name"),
    ("a//b.jpg", "empty or '.' path component"),
    ("./a.jpg", "empty or '.' path component"),
    ("val2014/", "empty or '.' path component"),
    ("a\x00.jpg", "control character"),
])
def test_file_names_that_leave_the_image_folder_are_refused(tmp_path, file_name, reason):
    images = [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": file_name}]
    path = coco_json(tmp_path, images=images, annotations=[{"image_id": 1, "id": 1, "caption": "a cat"}])
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    (image_dir / "ok.jpg").write_bytes(b"jpeg")
    for folder in (image_dir, None):  # the name alone decides, with or without an image folder
        with pytest.raises(CocoFormatError) as e:
            load_coco_captions(path, folder, limit=1)  # the whole file is checked, not only what limit keeps
        msg = str(e.value)
        assert str(path) in msg and "images[1] (id 2)" in msg and reason in msg and repr(file_name) in msg


def test_every_bad_entry_is_counted_and_the_first_ones_named(tmp_path):
    images = [{"id": i, "file_name": f"../{i}.jpg"} for i in range(8)] + [{"id": 99, "file_name": "fine.jpg"}]
    path = coco_json(tmp_path, images=images, annotations=[])
    with pytest.raises(CocoFormatError, match=r"8 file_name\(s\) would leave the image folder") as e:
        load_coco_captions(path)
    assert "images[0] (id 0)" in str(e.value) and "images[4] (id 4)" in str(e.value)
    assert "images[5]" not in str(e.value) and "and 3 more" in str(e.value)


def test_subfolders_are_fine_links_out_of_the_folder_are_not(tmp_path):
    image_dir = tmp_path / "images"
    (image_dir / "val2014").mkdir(parents=True)
    (image_dir / "val2014" / "a.jpg").write_bytes(b"jpeg")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    (image_dir / "link.jpg").symlink_to(outside)
    ann = [{"image_id": 1, "id": 1, "caption": "a cat"}, {"image_id": 2, "id": 2, "caption": "a dog"}]
    ok = coco_json(tmp_path, images=[{"id": 1, "file_name": "val2014/a.jpg"}], annotations=ann[:1])
    assert load_coco_captions(ok, image_dir)[0].path == image_dir / "val2014" / "a.jpg"
    linked = coco_json(tmp_path, images=[{"id": 1, "file_name": "val2014/a.jpg"}, {"id": 2, "file_name": "link.jpg"}],
                       annotations=ann)
    with pytest.raises(CocoFormatError, match=r"image 2 file_name 'link.jpg' resolves to .*outside the image folder"):
        load_coco_captions(linked, image_dir)


def test_repeated_file_names_bad_limit_and_missing_folder(tmp_path):
    dup = coco_json(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}], annotations=[])
    with pytest.raises(CocoFormatError, match=r"images\[1\] \(id 2\) repeats file_name 'a.jpg' of image id 1"):
        load_coco_captions(dup)
    path = coco_json(tmp_path)
    for bad in (0, -1):
        with pytest.raises(CocoFormatError, match=f"limit={bad}"):
            load_coco_captions(path, limit=bad)
    with pytest.raises(CocoFormatError, match="image folder .*nowhere does not exist"):
        load_coco_captions(path, tmp_path / "nowhere")
    not_text = coco_json(tmp_path, images=[{"id": 1, "file_name": ["a.jpg"]}], annotations=[])
    with pytest.raises(CocoFormatError, match="is not a string"):
        load_coco_captions(not_text)


def test_an_evaluation_set_needs_images_and_captions(tmp_path):
    from dalle_core.data.coco import check_eval_set

    empty = coco_json(tmp_path, images=[], annotations=[])
    with pytest.raises(CocoFormatError, match="has no images") as e:
        check_eval_set(load_coco_captions(empty), empty)
    assert str(empty) in str(e.value)
    silent = coco_json(tmp_path, images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                       annotations=[])
    with pytest.raises(CocoFormatError, match=r"has no captions \(2 image\(s\), no 'annotations'"):
        check_eval_set(load_coco_captions(silent), silent)
    some = coco_json(tmp_path, annotations=[{"image_id": 42, "id": 1, "caption": "a shoe rack"}])
    with pytest.raises(CocoFormatError, match=r"2 of 3 image\(s\) have no caption \(image ids 73, 136\)"):
        check_eval_set(load_coco_captions(some), some)
    check_eval_set(load_coco_captions(coco_json(tmp_path)), "fine.json")  # every image captioned: accepted
