"""URL lists: the crawler's input, in the formats img2dataset takes.

A URL list is a parquet, csv or tsv file (csv/tsv may be compressed: .gz, .bz2,
.xz, .zst) with one image-text pair a row: a `url` column and a `caption`
column. Other column names (img2dataset's `URL` / `TEXT`, for instance) are
used only when they are configured explicitly, so a list with unexpected
columns fails loudly instead of crawling the wrong field.

Every row keeps its position in the file as `row` (0-based), whatever it holds:
a row with an empty url is returned with `url == ""` so that row numbers stay
stable and the crawler records it as a failure with reason "empty_url" rather
than dropping it silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# compressed suffixes pandas reads itself for text formats
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


class UrlListError(ValueError):
    """A URL list that cannot be used; the message names the file and the setting."""


@dataclass(frozen=True)
class UrlRow:
    row: int  # 0-based position in the URL list (stable across reruns)
    url: str  # stripped; "" for an empty url (a failure "empty_url" in the crawl)
    caption: str  # "" when missing


def url_list_format(path: str | Path) -> str:
    """'parquet', 'csv' or 'tsv' from the file name; UrlListError otherwise."""
    name = Path(path).name.lower()
    for comp in ("",) + _COMPRESSIONS:
        for ext, fmt in _FORMATS.items():
            if name.endswith(ext + comp):
                if fmt == "parquet" and comp:
                    continue  # parquet compresses internally
                return fmt
    supported = ", ".join(
        [".parquet"] + [f"{e}[{'|'.join(_COMPRESSIONS)}]" for e in (".csv", ".tsv")]
    )
    raise UrlListError(
        f"URL list {path}: unknown format (file extension {''.join(Path(path).suffixes) or 'none'!r});"
        f" supported: {supported}"
    )


def _columns(path: Path, fmt: str) -> list[str]:
    import pandas as pd

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return [str(c) for c in pd.read_csv(path, sep="," if fmt == "csv" else "\t", nrows=0).columns]


def read_url_list(
    path: str | Path,
    url_col: str = "url",
    caption_col: str | None = "caption",
) -> list[UrlRow]:
    """Read a parquet / csv / tsv URL list into `UrlRow`s, in file order.

    `caption_col=None` reads a list without captions (all captions "").
    Raises UrlListError (naming the file and the setting) for an unknown
    extension, a missing file, a missing column (listing the columns found) or
    a list with no rows.
    """
    import pandas as pd

    path = Path(path)
    fmt = url_list_format(path)
    if not path.is_file():
        raise UrlListError(f"URL list {path}: file not found")
    try:
        columns = _columns(path, fmt)
    except Exception as e:  # unreadable header / corrupt parquet footer
        raise UrlListError(f"URL list {path}: cannot read it as {fmt}: {e}") from e
    for setting, col in (("url_col", url_col), ("caption_col", caption_col)):
        if col is not None and col not in columns:
            raise UrlListError(
                f"URL list {path}: no column {col!r} (setting {setting}={col!r});"
                f" columns found: {', '.join(map(repr, columns)) or 'none'}"
            )
    wanted = [url_col] + ([caption_col] if caption_col is not None and caption_col != url_col else [])
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path, columns=wanted)
        else:
            df = pd.read_csv(
                path,
                sep="," if fmt == "csv" else "\t",
                usecols=wanted,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
            )
    except Exception as e:
        raise UrlListError(f"URL list {path}: cannot read it as {fmt}: {e}") from e
    if len(df) == 0:
        raise UrlListError(f"URL list {path}: no rows (column {url_col!r} is empty)")

    def clean(values) -> list[str]:
        out = []
        for v in values:
            if v is None or (isinstance(v, float) and v != v):  # None / NaN
                out.append("")
            elif isinstance(v, bytes):
                out.append(v.decode("utf-8", errors="replace").strip())
            else:
                out.append(str(v).strip())
        return out

    urls = clean(df[url_col].tolist())
    captions = clean(df[caption_col].tolist()) if caption_col is not None else [""] * len(urls)
    return [UrlRow(row=i, url=u, caption=c) for i, (u, c) in enumerate(zip(urls, captions))]
