"""URL lists in the formats img2dataset takes: parquet, csv, tsv (compressed too)."""

from __future__ import annotations

import pandas as pd
import pytest

from dalle_core.data.urllist import UrlListError, UrlRow, read_url_list, url_list_format

CAPTIONS = [
    "a red circle",
    'a "quoted", comma caption',
    "un carré bleu — ünïcødé",
    "",
]
URLS = ["http://h/img/0", "http://h/img/1", "  http://h/img/2  ", "http://h/img/3"]


def _write(df: pd.DataFrame, path):
    name = path.name
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
    elif ".tsv" in name:
        df.to_csv(path, sep="\t", index=False)
    else:
        df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "name", ["list.parquet", "list.csv", "list.tsv", "list.csv.gz", "list.tsv.gz", "LIST.CSV"]
)
def test_formats_round_trip(tmp_path, name):
    df = pd.DataFrame({"url": URLS, "caption": CAPTIONS, "other": [1, 2, 3, 4]})
    rows = read_url_list(_write(df, tmp_path / name))
    assert rows == [
        UrlRow(0, "http://h/img/0", "a red circle"),
        UrlRow(1, "http://h/img/1", 'a "quoted", comma caption'),
        UrlRow(2, "http://h/img/2", "un carré bleu — ünïcødé"),
        UrlRow(3, "http://h/img/3", ""),
    ]


def test_empty_urls_keep_their_row_numbers(tmp_path):
    df = pd.DataFrame({"url": ["http://h/a", None, "", "http://h/b"], "caption": ["a", "b", None, "d"]})
    for name in ("l.parquet", "l.csv"):
        rows = read_url_list(_write(df, tmp_path / name))
        assert [r.row for r in rows] == [0, 1, 2, 3]
        assert [r.url for r in rows] == ["http://h/a", "", "", "http://h/b"]
        assert rows[2].caption == ""


def test_unknown_extension_names_the_file(tmp_path):
    p = tmp_path / "urls.json"
    p.write_text("[]")
    with pytest.raises(UrlListError, match=r"urls\.json.*unknown format.*\.parquet"):
        read_url_list(p)
    with pytest.raises(UrlListError, match="unknown format"):
        url_list_format(tmp_path / "urls.parquet.gz")


def test_missing_file(tmp_path):
    with pytest.raises(UrlListError, match="not found"):
        read_url_list(tmp_path / "nope.csv")


@pytest.mark.parametrize("name", ["l.parquet", "l.csv", "l.tsv"])
def test_missing_column_names_column_setting_and_columns_found(tmp_path, name):
    df = pd.DataFrame({"URL": ["http://h/a"], "TEXT": ["a cat"]})
    path = _write(df, tmp_path / name)
    with pytest.raises(UrlListError) as e:
        read_url_list(path)
    msg = str(e.value)
    assert name in msg and "'url'" in msg and "url_col" in msg and "'URL', 'TEXT'" in msg
    with pytest.raises(UrlListError, match=r"no column 'caption' \(setting caption_col"):
        read_url_list(path, url_col="URL")
    # img2dataset's aliases work only when configured explicitly
    assert read_url_list(path, url_col="URL", caption_col="TEXT") == [UrlRow(0, "http://h/a", "a cat")]


def test_without_caption_column(tmp_path):
    path = _write(pd.DataFrame({"url": ["http://h/a", "http://h/b"]}), tmp_path / "l.csv")
    assert [r.caption for r in read_url_list(path, caption_col=None)] == ["", ""]


@pytest.mark.parametrize("name", ["l.parquet", "l.csv", "l.tsv"])
def test_empty_list_is_an_error(tmp_path, name):
    path = _write(pd.DataFrame({"url": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)}), tmp_path / name)
    with pytest.raises(UrlListError, match=f"{name}: no rows"):
        read_url_list(path)


def test_unreadable_file_names_the_file(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"this is not parquet")
    with pytest.raises(UrlListError, match=r"broken\.parquet: cannot read it as parquet"):
        read_url_list(p)
