"""Models in the MLflow registry: logged as pyfunc models whose artifact is our own
weights file (config pinned inside), registered under a name with an alias that
downstream assets and the CLI resolve (`models:/dvae@champion`)."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc

from dalle_core.eval.fairness import SHORT, check_rules, decide, fingerprint_id

WEIGHTS = "weights"
DEFAULT_ALIAS = "champion"
_TYPE_HINT_NAG = "Add type hints to the `predict` method"


class _PythonModel(mlflow.pyfunc.PythonModel):
    """MLflow warns when a PythonModel subclass is created whose `predict` has no type
    hints ("Add type hints to the `predict` method ..."), so every `dalle` command printed
    it three times. Our models take dicts of arrays, which MLflow's type-hint validation
    cannot describe (a dict hint fails at class creation), and the CLI's user cannot act
    on it. A warnings filter cannot silence it: MLflow checks the hints under its own
    `catch_warnings` with a 'once' filter in front. So the subclass hook runs with its
    warnings recorded, that one message is dropped and any other is passed on."""

    def __init_subclass__(cls, **kwargs) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().__init_subclass__(**kwargs)
        for w in caught:
            if _TYPE_HINT_NAG not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class DVAEModel(_PythonModel):
    """pyfunc face of the dVAE: RGB uint8 images [B, H, W, 3] -> token grids [B, h, w]."""

    def load_context(self, context):
        from dalle_core.dvae.model import load_dvae

        self.encoder, self.decoder, self.config = load_dvae(context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from dalle_core.dvae.model import encode_to_codes

        x = torch.from_numpy(np.asarray(model_input, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
        with torch.no_grad():
            return encode_to_codes(self.encoder, x).numpy()


def log_and_register(model_file: Path, name: str, python_model, alias: str = DEFAULT_ALIAS,
                     extra_artifacts: dict[str, Path] | None = None) -> str:
    """Log the weights as a pyfunc model in the active run, register it, point `alias` at it.
    `extra_artifacts` travel with the model (e.g. the tokenizer the prior reads)."""
    import torch

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts={WEIGHTS: str(model_file), **{k: str(v) for k, v in (extra_artifacts or {}).items()}},
        registered_model_name=name,
        # explicit requirements: inference would load the model in a subprocess
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "dalle-platform"],
    )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version


CHALLENGER = "challenger"
METRIC_TAG = "eval."  # a version's figures, per fingerprint: eval.<fingerprint id>.<metric> = value
FINGERPRINT_TAG = "fingerprint."  # fingerprint.<id> = JSON of the conditions those figures were measured under
RUN_TAG = "eval_run."  # eval_run.<id> = the MLflow run that measured them
_FIGURE = re.compile(r"^eval\.(?P<fp>[0-9a-f]{%d})\.(?P<metric>.+)$" % SHORT)


@dataclass
class Figures:
    """A version's figures under one fingerprint."""
    fingerprint: dict[str, str]
    metrics: dict[str, float]
    run_id: str = ""


def version_figures(name: str, version: str) -> dict[str, Figures]:
    """{fingerprint id: Figures} recorded on a registered version. Figures stored before
    fingerprints existed (tags eval.<metric>) are not returned: their conditions are unknown."""
    tags = mlflow.MlflowClient().get_model_version(name, version).tags or {}
    out: dict[str, Figures] = {}
    for k, v in tags.items():
        m = _FIGURE.match(k)
        if m:
            fig = out.setdefault(m["fp"], Figures({}, {}))
            fig.metrics[m["metric"]] = float(v)
    for fp, fig in out.items():
        try:
            fig.fingerprint = json.loads(tags.get(f"{FINGERPRINT_TAG}{fp}", "{}"))
        except ValueError:
            fig.fingerprint = {}
        fig.run_id = tags.get(f"{RUN_TAG}{fp}", "")
    return out


def record_evaluation(name: str, version: str, fingerprint: dict[str, str], metrics: dict[str, float],
                      run_id: str = "") -> Figures:
    """Store a version's figures under their fingerprint (tags on the version itself), so a
    later challenger measured under the same conditions is compared with them.

    Figures already recorded under this fingerprint are never overwritten: the same
    fingerprint means the same captions, seed, candidates, scoring weights, radii and code,
    so a second evaluation can only repeat them (it keeps its own numbers in its own MLflow
    run); metrics the earlier one lacked are added. Figures under other fingerprints are
    untouched. Returns what the version holds under the fingerprint afterwards."""
    client = mlflow.MlflowClient()
    fp = fingerprint_id(fingerprint)
    have = version_figures(name, version).get(fp)
    if have is None:
        client.set_model_version_tag(name, version, f"{FINGERPRINT_TAG}{fp}", json.dumps(fingerprint, sort_keys=True))
        if run_id:
            client.set_model_version_tag(name, version, f"{RUN_TAG}{fp}", run_id)
        have = Figures(dict(fingerprint), {}, run_id)
    for k, v in metrics.items():
        if k not in have.metrics and math.isfinite(float(v)):
            client.set_model_version_tag(name, version, f"{METRIC_TAG}{fp}.{k}", repr(float(v)))
            have.metrics[k] = float(v)
    return have


def champion_version(name: str, alias: str = DEFAULT_ALIAS) -> str | None:
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except Exception:  # MlflowException: no such model or alias
        return None


def resolve_version(name: str, ref: str) -> str:
    """A version number from '7', 'v7', '@challenger' or 'challenger' (an alias)."""
    ref = ref.strip()
    if ref.lstrip("v").isdigit():
        return ref.lstrip("v")
    alias = ref.lstrip("@")
    v = champion_version(name, alias)
    if v is None:
        raise ModelNotFoundError(f"model {name!r} has no version with alias @{alias} in the MLflow registry "
                                 f"({mlflow.get_tracking_uri()})")
    return v


def champion_figures(name: str, version: str, fingerprint: dict[str, str]) -> dict[str, float] | None:
    """The version's figures under exactly this fingerprint, or None."""
    fig = version_figures(name, version).get(fingerprint_id(fingerprint))
    return dict(fig.metrics) if fig is not None else None


def champion_to_rescore(name: str, version: str, fingerprint: dict[str, str], rules: dict[str, str]) -> str | None:
    """The champion version `version` is about to be compared with, if it lacks figures under
    `fingerprint` for a metric `rules` names (so it must be scored under these conditions
    first); None when there is no other champion or its recorded figures will do."""
    champ = champion_version(name)
    if champ is None or champ == version:
        return None
    stored = champion_figures(name, champ, fingerprint)
    return champ if stored is None or any(k not in stored for k in rules) else None


class Promotion(tuple):
    """(promoted, reason), so `promoted, reason = promote_if_better(...)` reads as before,
    with the comparison's details as attributes."""

    def __new__(cls, promoted: bool, reason: str, champion: str | None = None,
                champion_metrics: dict | None = None, fingerprint_id: str = ""):
        self = super().__new__(cls, (promoted, reason))
        self.champion = champion  # the champion compared with (before this decision); None: there was none
        self.champion_metrics = champion_metrics  # its figures under the fingerprint; None: it has none
        self.fingerprint_id = fingerprint_id
        return self

    @property
    def promoted(self) -> bool:
        return self[0]

    @property
    def reason(self) -> str:
        return self[1]


# callers that do not say under which conditions they measured share this one fingerprint
# (so they compare with each other as before, and never with fingerprinted figures)
UNSPECIFIED = {"conditions": "not recorded by the evaluation"}


def promote_if_better(name: str, version: str, metrics: dict[str, float], rules: dict[str, str],
                      fingerprint: dict[str, str] | None = None, champion_metrics: dict[str, float] | None = None,
                      run_id: str = "") -> Promotion:
    """Champion / challenger under one fingerprint: `version` is (already) the challenger;
    it becomes the champion if there is none, or if it beats the champion on every metric
    that `rules` names ({"contrastive_fd": "lower"}), the champion's figures being those
    measured under the same `fingerprint`. `champion_metrics`: the champion re-scored under
    this fingerprint in the same run (recorded on it, without replacing figures it already
    has there). Without champion figures under the fingerprint, or with a rule's metric
    missing from them, the challenger is not promoted (the reason says why). The
    challenger's figures are recorded on it either way."""
    check_rules(rules, metrics)
    fingerprint = dict(fingerprint or UNSPECIFIED)
    fp = fingerprint_id(fingerprint)
    record_evaluation(name, version, fingerprint, metrics, run_id)
    client = mlflow.MlflowClient()
    current = champion_version(name)
    if current is None or current == version:
        client.set_registered_model_alias(name, DEFAULT_ALIAS, version)
        others = sorted(k for k in version_figures(name, version) if k != fp)
        why = (f"{name} v{version} is the champion; its figures under fingerprint {fp} recorded beside those "
               f"under {', '.join(others)}" if others else f"{name} v{version} is the first evaluated version: champion")
        return Promotion(True, why, None, None, fp)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if champion_metrics is not None:
        record_evaluation(name, current, fingerprint, champion_metrics, run_id)
    held = version_figures(name, current)
    theirs = held[fp].metrics if fp in held else None
    d = decide(f"{name} v{version}", f"champion v{current}", metrics, theirs, rules, fp,
               other_fingerprints=sorted(held))
    if d.promote:
        client.set_registered_model_alias(name, DEFAULT_ALIAS, version)
    return Promotion(d.promote, d.reason, current, theirs, fp)


def comparison_markdown(challenger: str, promotion: Promotion, ours: dict[str, float], rules: dict[str, str],
                        fingerprint: dict[str, str], names: list[str] | None = None) -> str:
    """Both versions' figures side by side (markdown), under the fingerprint they share."""
    from dalle_core.eval.fairness import comparison_table

    champion = f"champion v{promotion.champion}" if promotion.champion else "champion (none before)"
    rows = comparison_table(challenger, champion, ours, promotion.champion_metrics, rules, names)
    lines = [f"| metric | {challenger} | {champion} | rule |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", f"fingerprint `{promotion.fingerprint_id}`: "
              + ", ".join(f"{k}={v[:16]}" for k, v in sorted(fingerprint.items())), "", promotion.reason]
    return "\n".join(lines)


def log_comparison(challenger: str, promotion: Promotion, ours: dict[str, float], rules: dict[str, str],
                   fingerprint: dict[str, str], names: list[str] | None = None) -> str:
    """In the active MLflow run: challenger_<metric> and champion_<metric> (under the same
    fingerprint), the fingerprint as a tag and JSON artifact, and comparison.md. Returns the markdown."""
    keys = names if names is not None else list(ours)
    mlflow.log_metrics({f"challenger_{k}": float(ours[k]) for k in keys if k in ours})
    if promotion.champion_metrics:
        mlflow.log_metrics({f"champion_{k}": float(v) for k, v in promotion.champion_metrics.items() if k in keys})
    mlflow.set_tags({"fingerprint": promotion.fingerprint_id, "promotion": promotion.reason[:5000],
                     "champion_version": promotion.champion or ""})
    mlflow.log_dict(dict(fingerprint), "evaluation/fingerprint.json")
    text = comparison_markdown(challenger, promotion, ours, rules, fingerprint, names)
    mlflow.log_text(text, "evaluation/comparison.md")
    return text


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_files(spec: str, default_name: str) -> list[Path]:
    """The files of a model: a path (just that file), `models:/name@alias`,
    `models:/name/3`, `@alias` or a version number `3` (of `default_name`)."""
    path = Path(spec)
    if path.exists():
        return [path]
    uri = spec
    if spec.startswith("@"):
        uri = f"models:/{default_name}{spec}"
    elif spec.lstrip("v").isdigit():  # a registered version number: "7" or "v7"
        uri = f"models:/{default_name}/{spec.lstrip('v')}"
    if not uri.startswith("models:/"):
        raise ModelNotFoundError(f"model {spec!r}: no such file, and not a models:/ URI or @alias")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # MlflowException: unknown model or alias
        raise ModelNotFoundError(f"model {uri!r} not found in the MLflow registry ({mlflow.get_tracking_uri()}): {e}") from None
    found = sorted(p for p in (local / "artifacts").glob("*") if p.is_file())
    if not found:
        raise ModelNotFoundError(f"model {uri!r} has no weights file in its artifacts")
    return found


def resolve_weights(spec: str, default_name: str) -> Path:
    """The weights file (.pt) of a model spec (see `resolve_model_files`)."""
    files = resolve_model_files(spec, default_name)
    return next((p for p in files if p.suffix == ".pt"), files[0])


def resolve_companion(spec: str, default_name: str, suffix: str) -> Path | None:
    """A file registered next to a model's weights (the prior's tokenizer: `.json`)."""
    return next((p for p in resolve_model_files(spec, default_name) if p.suffix == suffix), None)


class PriorModel(_PythonModel):
    """pyfunc face of the prior: {"text": ids [B, L], "image": codes [B, N]} -> loss per sample (nats)."""

    def load_context(self, context):
        from dalle_core.prior.model import load_prior

        self.model = load_prior(context.artifacts[WEIGHTS]).eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch
        import torch.nn.functional as F

        text = torch.as_tensor(np.asarray(model_input["text"]), dtype=torch.long)
        image = torch.as_tensor(np.asarray(model_input["image"]), dtype=torch.long)
        with torch.no_grad():
            _, image_logits = self.model(text, image)
            nll = F.cross_entropy(image_logits.transpose(1, 2), image, reduction="none").mean(dim=1)
        return nll.numpy()


class RerankerModel(_PythonModel):
    """pyfunc face of the reranker: {"images": uint8 [B, H, W, 3], "text": ids [B, L]} -> cosine similarity [B]."""

    def load_context(self, context):
        from dalle_core.rerank import load_reranker

        self.model = load_reranker(context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        images = torch.from_numpy(np.asarray(model_input["images"], dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
        text = torch.as_tensor(np.asarray(model_input["text"]), dtype=torch.long)
        return self.model.score(images, text).numpy()
