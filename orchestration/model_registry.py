"""Models in the MLflow registry: logged as pyfunc models whose artifact is our own
weights file (config pinned inside), registered under a name with an alias that
downstream assets and the CLI resolve (`models:/dvae@champion`)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc

WEIGHTS = "weights"
DEFAULT_ALIAS = "champion"


class DVAEModel(mlflow.pyfunc.PythonModel):
    """pyfunc face of the dVAE: RGB uint8 images [B, H, W, 3] -> token grids [B, h, w]."""

    def load_context(self, context):
        from dalle_core.dvae.train import load_dvae

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
METRIC_TAG = "eval."  # a version's evaluation figures, as tags: eval.<metric> = value


def record_evaluation(name: str, version: str, metrics: dict[str, float]) -> None:
    """Store a version's evaluation figures on the version itself (tags), so a
    later challenger is compared with what its champion scored."""
    client = mlflow.MlflowClient()
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, f"{METRIC_TAG}{k}", repr(float(v)))


def _version_metrics(name: str, version: str) -> dict[str, float]:
    mv = mlflow.MlflowClient().get_model_version(name, version)
    return {k[len(METRIC_TAG):]: float(v) for k, v in (mv.tags or {}).items() if k.startswith(METRIC_TAG)}


def champion_version(name: str, alias: str = DEFAULT_ALIAS) -> str | None:
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except Exception:  # MlflowException: no such model or alias
        return None


def promote_if_better(name: str, version: str, metrics: dict[str, float],
                      rules: dict[str, str]) -> tuple[bool, str]:
    """Champion / challenger: `version` is (already) the challenger; it becomes the
    champion if there is none, or if it beats the champion on every metric that
    `rules` names ({"contrastive_fd": "lower", "retrieval": "higher"}). Returns
    (promoted, reason). The figures are recorded on the version either way."""
    for metric, direction in rules.items():
        if direction not in ("lower", "higher"):
            raise ValueError(f"promotion rule for {metric!r} must be 'lower' or 'higher', got {direction!r}")
        if metric not in metrics:
            raise ValueError(f"promotion metric {metric!r} was not computed (have: {sorted(metrics)})")
    record_evaluation(name, version, metrics)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    current = champion_version(name)
    if current is None or current == version:
        client.set_registered_model_alias(name, DEFAULT_ALIAS, version)
        return True, f"{name} v{version} is the first evaluated version: champion"
    theirs = _version_metrics(name, current)
    worse = []
    for metric, direction in rules.items():
        if metric not in theirs:
            continue  # the champion was never scored on it: no evidence against the challenger
        ours, best = metrics[metric], theirs[metric]
        better = ours < best if direction == "lower" else ours > best
        if not better:
            worse.append(f"{metric} {ours:.4g} vs champion's {best:.4g} ({direction} is better)")
    if worse:
        return False, f"{name} v{version} stays challenger, champion v{current} kept: " + "; ".join(worse)
    client.set_registered_model_alias(name, DEFAULT_ALIAS, version)
    return True, f"{name} v{version} beat champion v{current} on {', '.join(rules)}: promoted to champion"


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_files(spec: str, default_name: str) -> list[Path]:
    """The files of a model: a path (just that file), `models:/name@alias`,
    `models:/name/3`, or `@alias` (of `default_name`)."""
    path = Path(spec)
    if path.exists():
        return [path]
    uri = spec
    if spec.startswith("@"):
        uri = f"models:/{default_name}{spec}"
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


class PriorModel(mlflow.pyfunc.PythonModel):
    """pyfunc face of the prior: {"text": ids [B, L], "image": codes [B, N]} -> loss per sample (nats)."""

    def load_context(self, context):
        from dalle_core.prior.train import load_prior

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


class RerankerModel(mlflow.pyfunc.PythonModel):
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
