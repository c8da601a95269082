"""Great Expectations suites for the filtered pairs and the written shards.

All Great Expectations use lives here (GE 1.x API: an ephemeral context, a
pandas data source with one dataframe asset per suite, a whole-dataframe batch
definition; batches are validated against an `ExpectationSuite`). Building the
context costs a few seconds of imports, so it is built once per process and
reused (`_ge()`).

Checks on filtered pairs (one row per pair, `pairs_frame`): captions present
and non-empty, caption length within the profile's bounds, language "en",
aspect ratio of the original within [1/2, 2], original sides >= min_image_side,
stored images exactly image_size square, keys unique, and no pair within the
near-duplicate distance of an evaluation image. Those restate the filters' own
promises, which only a filter bug can break; bad *data* is caught by the
crawl-batch suite (`batch_frame`, one row per figure with its bounds): the
crawl's failure rate, the kept fraction and each filter's drop rate within the
profile's bounds, and the mean caption length and the non-English share within
a drift bound of the earlier passing batches. Checks on shards (one row per
shard, `shards_frame`): checksum ok, sample count equal to the manifest's,
no shard outside the manifest, and the total equal to the filtered count.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .filters import DEFAULT_LANGUAGES, detect_language, min_hamming_distances, pair_phash
from .pairs import Pair
from .shards import MANIFEST_NAME

log = logging.getLogger(__name__)

PAIR_COLUMNS = [
    "key",
    "caption",
    "caption_chars",
    "caption_words",
    "lang",
    "lang_prob",
    "width",
    "height",
    "original_width",
    "original_height",
    "aspect_ratio",
    "phash",
    "eval_overlap_distance",
]

# --------------------------------------------------------------------------- frames


def _row_from_pair(pair: Pair, languages) -> dict:
    caption = pair.caption
    lang, prob = detect_language(caption, languages) if caption and caption.strip() else ("", 0.0)
    width, height = pair.image_size
    ow = pair.meta.get("original_width")
    oh = pair.meta.get("original_height")
    return {
        "key": pair.key,
        "caption": caption,
        "lang": lang,
        "lang_prob": prob,
        "width": width,
        "height": height,
        "original_width": ow,
        "original_height": oh,
        "phash": pair_phash(pair),
    }


def pairs_frame(
    items: Iterable[Pair | Mapping[str, Any]],
    eval_phashes: Mapping[str, str] | Sequence[str] = (),
    languages: Sequence[str] | None = DEFAULT_LANGUAGES,
) -> pd.DataFrame:
    """One row per pair with the columns in `PAIR_COLUMNS`.

    `items` are `Pair`s, WebDataset samples (dicts with "__key__"), or records
    already holding some of the columns (missing derived columns are computed
    from caption / original sizes / phash). `eval_overlap_distance` is the
    smallest Hamming distance from the pair's pHash to any evaluation image's
    pHash (NaN when there is no evaluation set).
    """
    rows = []
    for item in items:
        if isinstance(item, Pair):
            rows.append(_row_from_pair(item, languages))
        elif isinstance(item, Mapping) and "__key__" in item:
            rows.append(_row_from_pair(Pair.from_sample(item), languages))
        elif isinstance(item, Mapping):
            row = dict(item)
            caption = row.get("caption")
            if "lang" not in row:
                if isinstance(caption, str) and caption.strip():
                    row["lang"], row["lang_prob"] = detect_language(caption, languages)
                else:
                    row["lang"], row["lang_prob"] = "", 0.0
            rows.append(row)
        else:
            raise TypeError(f"pairs_frame: expected Pair or mapping, got {type(item).__name__}")
    df = pd.DataFrame(rows)
    for col in PAIR_COLUMNS:
        if col not in df.columns:
            df[col] = None
    cap = df["caption"]
    df["caption_chars"] = [len(c) if isinstance(c, str) else None for c in cap]
    df["caption_words"] = [len(c.split()) if isinstance(c, str) else None for c in cap]

    def _ratio(w, h):
        try:
            w, h = float(w), float(h)
        except (TypeError, ValueError):
            return math.nan
        return w / h if h > 0 else math.nan

    df["aspect_ratio"] = [_ratio(w, h) for w, h in zip(df["original_width"], df["original_height"])]
    hashes = list(eval_phashes.values()) if isinstance(eval_phashes, Mapping) else list(eval_phashes)
    if len(df) and hashes:
        valid = [isinstance(h, str) and len(h) == 16 for h in df["phash"]]
        dists = min_hamming_distances([h for h, ok in zip(df["phash"], valid) if ok], hashes)
        it = iter(dists)
        df["eval_overlap_distance"] = [float(next(it)) if ok else math.nan for ok in valid]
    elif "eval_overlap_distance" not in {k for r in rows for k in r}:
        df["eval_overlap_distance"] = math.nan
    for col in ("width", "height", "original_width", "original_height", "caption_chars", "caption_words"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["lang_prob"] = pd.to_numeric(df["lang_prob"], errors="coerce")
    df["eval_overlap_distance"] = pd.to_numeric(df["eval_overlap_distance"], errors="coerce")
    return df[PAIR_COLUMNS + [c for c in df.columns if c not in PAIR_COLUMNS]]


def shards_frame(manifest, verify_problems: Sequence) -> pd.DataFrame:
    """One row per shard: name, count, in_manifest, checksum_ok, count_ok, problems."""
    by_shard: dict[str, list] = {}
    for p in verify_problems:
        by_shard.setdefault(p.shard, []).append(p)
    rows = []
    for info in manifest.shards:
        probs = by_shard.get(info.name, [])
        kinds = {p.kind for p in probs}
        rows.append(
            {
                "name": info.name,
                "count": int(info.count),
                "in_manifest": True,
                "checksum_ok": not (kinds & {"checksum", "size", "missing", "unreadable"}),
                "count_ok": not (kinds & {"count", "missing", "unreadable"}),
                "problems": "; ".join(f"{p.kind}: {p.detail}" for p in probs),
            }
        )
    listed = {i.name for i in manifest.shards}
    for name, probs in by_shard.items():
        if name in listed or name == MANIFEST_NAME:  # manifest-level problems are not rows
            continue
        rows.append(
            {
                "name": name,
                "count": 0,
                "in_manifest": False,
                "checksum_ok": False,
                "count_ok": False,
                "problems": "; ".join(f"{p.kind}: {p.detail}" for p in probs),
            }
        )
    return pd.DataFrame(
        rows, columns=["name", "count", "in_manifest", "checksum_ok", "count_ok", "problems"]
    )


# --------------------------------------------------------------------------- results


@dataclass
class QualityResult:
    success: bool
    failures: list[dict] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    suite: str = ""

    def to_dict(self) -> dict:
        return {
            "suite": self.suite,
            "success": self.success,
            "failures": [dict(f) for f in self.failures],
            "statistics": dict(self.statistics),
        }

    def failure_lines(self) -> list[str]:
        lines = []
        for f in self.failures:
            if f.get("expectation") == BATCH_FIGURE:  # the figures say it all: "crawl_failure_rate 0.8 not in [0, 0.5] (...)"
                lines.append(f"{f['unexpected_count']} batch figure(s) out of bounds: " + "; ".join(map(str, f["examples"])))
                continue
            where = f" on column `{f['column']}`" if f.get("column") else ""
            if f.get("unexpected_count") is not None:
                of = f" of {f['element_count']}" if f.get("element_count") is not None else ""
                what = f"{f['unexpected_count']}{of} rows unexpected"
            elif f.get("error"):
                what = f"error: {f['error']}"
            else:
                what = f"observed {f.get('observed_value')!r}"
            ex = f" (e.g. {', '.join(map(str, f['examples'][:5]))})" if f.get("examples") else ""
            lines.append(f"{f['expectation']}{where} failed: {what}{ex}")
        return lines

    def to_markdown(self) -> str:
        s = self.statistics
        head = f"**{self.suite or 'data quality'}: {'passed' if self.success else 'FAILED'}**"
        if s:
            head += (
                f" ({s.get('successful_expectations', 0)}/{s.get('evaluated_expectations', 0)}"
                f" expectations met, {s.get('rows', '?')} rows)"
            )
        if not self.failures:
            return head + "\n"
        return head + "\n\n" + "\n".join(f"- {line}" for line in self.failure_lines()) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


# --------------------------------------------------------------------------- GE plumbing

_GE_LOCK = threading.Lock()
_VALIDATE_LOCK = threading.Lock()  # one validation at a time per process
_GE_STATE: dict[str, Any] = {}


def _ge():
    """(gx module, context, pandas data source), built once per process."""
    with _GE_LOCK:
        if not _GE_STATE:
            import great_expectations as gx

            ctx = gx.get_context(mode="ephemeral")
            try:
                from great_expectations.data_context.types.base import ProgressBarsConfig

                ctx.variables.progress_bars = ProgressBarsConfig(
                    globally=False, metric_calculations=False
                )
            except Exception:  # progress bars are cosmetic
                pass
            source = ctx.data_sources.add_pandas("dalle_data")
            _GE_STATE.update(gx=gx, ctx=ctx, source=source, batch_defs={})
        return _GE_STATE


def _batch_definition(asset_name: str):
    state = _ge()
    with _GE_LOCK:
        bd = state["batch_defs"].get(asset_name)
        if bd is None:
            asset = state["source"].add_dataframe_asset(name=asset_name)
            bd = asset.add_batch_definition_whole_dataframe(f"{asset_name}_whole")
            state["batch_defs"][asset_name] = bd
        return bd


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        try:
            return v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _run_suite(
    asset_name: str, df: pd.DataFrame, expectations: list, index_column: str, max_examples: int = 5
) -> QualityResult:
    gx = _ge()["gx"]
    suite = gx.ExpectationSuite(name=f"{asset_name}_suite")
    for e in expectations:
        suite.add_expectation(e)
    fmt = {"result_format": "COMPLETE"}
    if index_column in df.columns and len(df):
        fmt["unexpected_index_column_names"] = [index_column]
    bd = _batch_definition(asset_name)
    with _VALIDATE_LOCK:
        batch = bd.get_batch(batch_parameters={"dataframe": df})
        result = batch.validate(suite, result_format=fmt)
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = dict(cfg.kwargs)
        res = dict(r.result or {})
        column = kwargs.get("column") or ",".join(
            str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs
        )
        examples = []
        for item in (res.get("unexpected_index_list") or [])[:max_examples]:
            examples.append(_jsonable(item))
        if not examples and res.get("partial_unexpected_list"):
            examples = _jsonable(res["partial_unexpected_list"][:max_examples])
        exc = r.exception_info or {}
        error = None
        if isinstance(exc, dict) and exc.get("raised_exception"):
            error = str(exc.get("exception_message"))
        failures.append(
            {
                "expectation": cfg.type,
                "column": column or None,
                "unexpected_count": _jsonable(res.get("unexpected_count")),
                "element_count": _jsonable(res.get("element_count")),
                "observed_value": _jsonable(res.get("observed_value")),
                "examples": examples,
                "kwargs": _jsonable(
                    {k: v for k, v in kwargs.items() if k not in ("batch_id", "column")}
                ),
                "error": error,
            }
        )
    stats = _jsonable(dict(result.statistics))
    stats["rows"] = int(len(df))
    return QualityResult(
        success=bool(result.success), failures=failures, statistics=stats, suite=asset_name
    )


# --------------------------------------------------------------------------- suites


def validate_filtered_pairs(df: pd.DataFrame, data_config) -> QualityResult:
    """The filtered pairs meet every filter's promise (see module docstring)."""
    gxe = _ge()["gx"].expectations
    low, high = data_config.aspect_ratio_range
    size = data_config.image_size
    d = data_config.near_duplicate_max_distance
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(column="caption"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="caption", min_value=1, max_value=data_config.max_caption_chars
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="caption_words", min_value=data_config.min_caption_words
        ),
        gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=["en"]),
        gxe.ExpectColumnValuesToBeBetween(
            column="lang_prob", min_value=data_config.english_min_confidence, max_value=1.0
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="aspect_ratio"),
        gxe.ExpectColumnValuesToBeBetween(
            column="aspect_ratio", min_value=low - 1e-9, max_value=high + 1e-9
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="original_width", min_value=data_config.min_image_side
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="original_height", min_value=data_config.min_image_side
        ),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=size, max_value=size),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=size, max_value=size),
        gxe.ExpectColumnValuesToNotBeNull(column="key"),
        gxe.ExpectColumnValuesToBeUnique(column="key"),
        # NaN (no evaluation set) counts as missing and passes
        gxe.ExpectColumnValuesToBeBetween(column="eval_overlap_distance", min_value=d + 1),
    ]
    return _run_suite("filtered_pairs", df, expectations, index_column="key")


def validate_shards(manifest, verify_problems: Sequence, n_expected: int) -> QualityResult:
    """The shards are intact and hold exactly the `n_expected` filtered pairs."""
    gxe = _ge()["gx"].expectations
    df = shards_frame(manifest, verify_problems)
    expectations = [
        gxe.ExpectColumnValuesToBeInSet(column="checksum_ok", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="count_ok", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="in_manifest", value_set=[True]),
        gxe.ExpectColumnValuesToBeUnique(column="name"),
        gxe.ExpectColumnSumToBeBetween(column="count", min_value=n_expected, max_value=n_expected),
    ]
    result = _run_suite("shards", df, expectations, index_column="name")
    # the manifest's own total must agree as well (a manifest-level fact, not a row)
    if int(manifest.total) != int(n_expected):
        result.success = False
        result.failures.append(
            {
                "expectation": "manifest_total_equals_filtered_count",
                "column": "total",
                "unexpected_count": None,
                "element_count": None,
                "observed_value": int(manifest.total),
                "examples": [],
                "kwargs": {"value": int(n_expected)},
                "error": None,
            }
        )
    for p in verify_problems:
        if getattr(p, "shard", None) != MANIFEST_NAME:
            continue
        result.success = False
        result.failures.append(
            {
                "expectation": f"manifest_{p.kind}",
                "column": None,
                "unexpected_count": None,
                "element_count": None,
                "observed_value": str(p.detail),
                "examples": [],
                "kwargs": {},
                "error": str(p),
            }
        )
    return result


# --------------------------------------------------------------------------- crawl-batch figures

BATCH_FIGURE = "batch_figure_within_bounds"
FILTER_NAMES = ("caption_too_short", "non_english", "boilerplate_date", "aspect_ratio", "image_too_small",
                "exact_duplicate", "near_duplicate", "eval_overlap")


def batch_statistics(crawl_summary: Mapping[str, Any], filter_report: Mapping[str, Any],
                     pairs: pd.DataFrame) -> dict:
    """The figures of one crawl batch that bad data moves: what the crawl lost, what the
    filters dropped (each), what they kept, and the mix of what was kept."""
    rows, failed = int(crawl_summary.get("n_rows", 0)), int(crawl_summary.get("n_failed", 0))
    seen = int(filter_report.get("input_count", 0))
    removed = filter_report.get("removed", {})
    stats = {
        "crawl_rows": rows,
        "crawl_failure_rate": failed / rows if rows else 1.0,
        "kept_fraction": int(filter_report.get("kept_count", 0)) / seen if seen else 0.0,
        # the language mix of the crawl, as the English filter saw it (kept pairs are all English)
        "non_english_share": int(removed.get("non_english", 0)) / seen if seen else 0.0,
        "mean_caption_words": float(pairs["caption_words"].mean()) if len(pairs) else float("nan"),
    }
    for name in sorted(set(FILTER_NAMES) | set(removed)):
        stats[f"drop_rate.{name}"] = int(removed.get(name, 0)) / seen if seen else 0.0
    return stats


def drift_reference(earlier: Sequence[Mapping[str, Any]]) -> dict | None:
    """Mean caption length and non-English share over earlier batches that passed (None: no history)."""
    usable = [s for s in earlier if s and not math.isnan(float(s.get("mean_caption_words", math.nan)))]
    if not usable:
        return None
    return {k: sum(float(s[k]) for s in usable) / len(usable) for k in ("mean_caption_words", "non_english_share")} \
        | {"batches": len(usable)}


def batch_frame(stats: Mapping[str, Any], reference: Mapping[str, Any] | None, data_config) -> pd.DataFrame:
    """One row per bounded figure: check (a readable name with value and bound), value, low, high."""
    d = data_config
    per_filter = dict(d.filter_drop_rate_bounds)
    rows = [("crawl_failure_rate", stats["crawl_failure_rate"], 0.0, d.max_crawl_failure_rate, "max_crawl_failure_rate"),
            ("kept_fraction", stats["kept_fraction"], d.min_kept_fraction, 1.0, "min_kept_fraction")]
    for key in sorted(k for k in stats if k.startswith("drop_rate.")):
        name = key.split(".", 1)[1]
        bound = per_filter.get(name, d.max_filter_drop_rate)
        rows.append((key, stats[key], 0.0, bound,
                     "filter_drop_rate_bounds" if name in per_filter else "max_filter_drop_rate"))
    if reference is not None:
        ref, drift = reference["mean_caption_words"], d.max_caption_words_drift
        rows.append(("mean_caption_words", stats["mean_caption_words"], ref * (1 - drift), ref * (1 + drift),
                     f"max_caption_words_drift vs {reference['batches']} earlier batches"))
        ref, drift = reference["non_english_share"], d.max_non_english_drift
        rows.append(("non_english_share", stats["non_english_share"], ref - drift, ref + drift,
                     f"max_non_english_drift vs {reference['batches']} earlier batches"))
    return pd.DataFrame(
        [{"check": f"{name} {value:.3g} not in [{low:.3g}, {high:.3g}] ({field})",
          "value": float(value), "low": float(low), "high": float(high)} for name, value, low, high, field in rows])


def validate_crawl_batch(pairs: pd.DataFrame, stats: Mapping[str, Any], reference: Mapping[str, Any] | None,
                         data_config) -> QualityResult:
    """One crawl batch's suite: the filtered pairs' invariants, then its figures within their bounds."""
    gxe = _ge()["gx"].expectations
    within = _run_suite("crawl_batch", batch_frame(stats, reference, data_config), [
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="value", column_B="low", or_equal=True),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="high", column_B="value", or_equal=True),
        gxe.ExpectColumnValuesToNotBeNull(column="value"),
    ], index_column="check")
    # a failed figure reads best as the figure itself: "crawl_failure_rate 0.8 not in [0, 0.5] (...)"
    within.failures = [{**f, "expectation": BATCH_FIGURE, "column": None,
                        "examples": [e.get("check", e) if isinstance(e, dict) else e for e in f["examples"]]}
                       for f in within.failures]
    return merge_results("filtered_pairs", validate_filtered_pairs(pairs, data_config), within)


def merge_results(suite: str, *results: QualityResult) -> QualityResult:
    stats: dict = {}
    for r in results:
        for k, v in r.statistics.items():
            if k in ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations"):
                stats[k] = stats.get(k, 0) + (v or 0)
    stats["rows"] = results[0].statistics.get("rows", 0) if results else 0
    return QualityResult(success=all(r.success for r in results),
                         failures=[f for r in results for f in r.failures], statistics=stats, suite=suite)


__all__ = [
    "PAIR_COLUMNS",
    "batch_frame",
    "batch_statistics",
    "drift_reference",
    "validate_crawl_batch",
    "QualityResult",
    "pairs_frame",
    "shards_frame",
    "validate_filtered_pairs",
    "validate_shards",
]
