"""dalle_core.io: whole files or none, and one reader of weights files."""

import pytest
import torch

from dalle_core.io import atomic_open, atomic_torch_save, atomic_write_bytes, load_torch_file


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_bytes(tmp_path / "sub" / "x.bin", b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]


def test_load_torch_file_checks_the_format(tmp_path):
    atomic_torch_save({"format": "a/1", "w": torch.ones(2)}, tmp_path / "a.pt")
    assert load_torch_file(tmp_path / "a.pt", ("a/1",), "thing")["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="not a thing file"):
        load_torch_file(tmp_path / "a.pt", ("b/1",), "thing")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable thing file"):
        load_torch_file(tmp_path / "bad.pt", ("a/1",), "thing")
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pt", ("a/1",), "thing")
