"""Dagster resources: storage, MLflow tracking, run profile, crawl source.

Each is a typed `ConfigurableResource` with a local default (a directory, SQLite
MLflow, the built-in demo world) and a cluster form (S3 with any endpoint, an
MLflow server URL, URL lists landing in a folder or S3 prefix).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import dagster as dg

from dalle_core.profiles import Profile, get_profile
from dalle_core.storage import Storage, open_storage


class StorageResource(dg.ConfigurableResource):
    """Where every asset writes its files: a local directory or `s3://bucket/prefix`."""

    root: str
    endpoint_url: Optional[str] = None  # e.g. a MinIO or moto server; credentials from env
    scratch_dir: str = ""  # local working space (shard caches, training checkpoints)

    def get(self) -> Storage:
        return open_storage(self.root, endpoint_url=self.endpoint_url)

    def scratch(self, name: str) -> Path:
        base = Path(self.scratch_dir) if self.scratch_dir else Path(tempfile.gettempdir()) / "dalle-scratch"
        path = base / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class ProfileResource(dg.ConfigurableResource):
    """Which size of everything to run: tiny / small / paper-1.3B / paper-12B."""

    name: str = "small"

    def get(self) -> Profile:
        return get_profile(self.name)


class MlflowResource(dg.ConfigurableResource):
    """The one owner of the MLflow client for assets (dagster-mlflow targets op-style jobs):
    runs tagged with what made them, logging into the active run, the model registry
    (`assets.model_registry`) against this tracking server, and run queries.

    Default: a SQLite backend and a local artifact root under the run directory.
    """

    tracking_uri: str
    artifact_root: Optional[str] = None
    experiment: str = "dalle"
    ui_url: Optional[str] = None  # where `make ui` serves MLflow, for links in metadata

    @classmethod
    def from_settings(cls, settings) -> "MlflowResource":
        """The resource `orchestration.definitions` builds, for the CLI (an `orchestration.settings.Settings`)."""
        return cls(tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
                   ui_url=settings.mlflow_ui_url)

    def _mlflow(self):
        """The `mlflow` module pointed at this tracking server (MLflow's fluent API is process-global)."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow

    def _client_setup(self):
        mlflow = self._mlflow()
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is None:
            location = None
            if self.artifact_root and "://" in self.artifact_root:  # s3://..., as given
                location = self.artifact_root
            elif self.artifact_root:
                Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
                location = Path(self.artifact_root).resolve().as_uri()
            exp_id = mlflow.create_experiment(self.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        return mlflow, exp_id

    def client(self):
        """An `MlflowClient` of this tracking server."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    @contextlib.contextmanager
    def start_run(self, run_name: str, tags: dict | None = None, data_version: str | None = None,
                  profile: str | None = None) -> Iterator[object]:
        """An MLflow run tagged with what made it: `dalle.code_version`, `dalle.profile`
        (default: the `profile` tag the assets pass) and `dalle.data_version` (the shards
        manifest's sha256, see `data_version`), so `dalle compare` can tell why runs differ."""
        mlflow, exp_id = self._client_setup()
        tags = dict(tags or {})
        run_tags = {"dalle.code_version": code_version(), **tags}
        profile = profile or tags.get("profile")
        if profile:
            run_tags["dalle.profile"] = profile
        if data_version:
            run_tags["dalle.data_version"] = data_version
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as run:
            yield run

    def run_url(self, run) -> str:
        base = self.ui_url or self.tracking_uri
        return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"

    # --- logging into the active run (the one `start_run` opened) ---

    def log_params(self, params: dict) -> None:
        self._mlflow().log_params(params)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._mlflow().log_metrics(metrics, step=step)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self._mlflow().log_metric(key, value, step=step)

    def set_tag(self, key: str, value) -> None:
        self._mlflow().set_tag(key, value)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self._mlflow().log_dict(obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow().log_text(text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        self._mlflow().log_image(image, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow().log_artifact(str(local_path), artifact_path)

    def search_runs(self, filter_string: str, order_by: list[str] | None = None, max_results: int = 100) -> list:
        """Runs of this resource's experiment (newest first by default); [] before the experiment exists."""
        mlflow = self._mlflow()
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        return mlflow.search_runs([exp.experiment_id], filter_string=filter_string,
                                  order_by=order_by or ["attributes.start_time DESC"], max_results=max_results,
                                  output_format="list")

    # --- the model registry (assets.model_registry) of this tracking server ---

    def _registry(self):
        self._mlflow()
        from assets import model_registry

        return model_registry

    def log_and_register(self, model_file: Path, name: str, python_model, alias: str,
                         extra_artifacts: dict[str, Path] | None = None) -> str:
        """In the active run: the weights as a pyfunc model, registered as `name` with `alias`."""
        return self._registry().log_and_register(model_file, name, python_model, alias, extra_artifacts)

    def promote_if_better(self, name: str, version: str, metrics: dict[str, float], rules: dict[str, str],
                          fingerprint: dict[str, str] | None = None,
                          champion_metrics: dict[str, float] | None = None, run_id: str = ""):
        return self._registry().promote_if_better(name, version, metrics, rules, fingerprint, champion_metrics, run_id)

    def log_comparison(self, challenger: str, promotion, ours: dict[str, float], rules: dict[str, str],
                       fingerprint: dict[str, str], names: list[str] | None = None) -> str:
        return self._registry().log_comparison(challenger, promotion, ours, rules, fingerprint, names)

    def champion_version(self, name: str, alias: str = "champion") -> str | None:
        return self._registry().champion_version(name, alias)

    def champion_figures(self, name: str, version: str, fingerprint: dict[str, str]) -> dict[str, float] | None:
        return self._registry().champion_figures(name, version, fingerprint)

    def champion_to_rescore(self, name: str, version: str, fingerprint: dict[str, str],
                            rules: dict[str, str]) -> str | None:
        return self._registry().champion_to_rescore(name, version, fingerprint, rules)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(name, alias, version)

    def resolve_version(self, name: str, ref: str) -> str:
        return self._registry().resolve_version(name, ref)

    def resolve_model_files(self, spec: str, default_name: str) -> list[Path]:
        return self._registry().resolve_model_files(spec, default_name)

    def resolve_weights(self, spec: str, default_name: str) -> Path:
        return self._registry().resolve_weights(spec, default_name)

    def resolve_companion(self, spec: str, default_name: str, suffix: str) -> Path | None:
        return self._registry().resolve_companion(spec, default_name, suffix)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class CrawlSourceResource(dg.ConfigurableResource):
    """Where crawl batches come from: a folder of URL lists (each file a partition).

    With `demo_world=True` the built-in demo world is served on host:port for the
    duration of a crawl (unless something already serves it), so its URL lists
    can be recrawled from the UI at any time.
    """

    url_list_dir: str
    demo_world: bool = True
    demo_host: str = "127.0.0.1"
    demo_port: int = 8765

    def demo_base_url(self) -> str:
        return f"http://{self.demo_host}:{self.demo_port}"

    def _is_url_list(self, name: str) -> bool:
        return name.endswith((".parquet", ".csv", ".tsv", ".csv.gz", ".tsv.gz"))

    def url_lists(self) -> list[str]:
        """URL-list file names in the inbox: a local folder or an `s3://bucket/prefix`."""
        if self.url_list_dir.startswith("s3://"):
            from dalle_core.storage import open_storage

            keys = open_storage(self.url_list_dir).list("")
            return sorted(k for k in keys if "/" not in k and self._is_url_list(k))
        d = Path(self.url_list_dir)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if self._is_url_list(p.name))

    def url_list_path(self, name: str) -> Path:
        if self.url_list_dir.startswith("s3://"):  # fetched once into a local cache
            import tempfile

            from dalle_core.storage import open_storage

            local = Path(tempfile.gettempdir()) / "dalle-url-lists" / name
            if not local.exists():
                try:
                    open_storage(self.url_list_dir).get_file(name, local)
                except FileNotFoundError:
                    raise FileNotFoundError(f"URL list {name!r} not found in url_list_dir={self.url_list_dir!r}") from None
            return local
        p = Path(self.url_list_dir) / name
        if not p.is_file():
            raise FileNotFoundError(
                f"URL list {name!r} not found in url_list_dir={self.url_list_dir!r}"
            )
        return p

    @contextlib.contextmanager
    def serving(self, profile: Profile) -> Iterator[None]:
        if not self.demo_world or _port_open(self.demo_host, self.demo_port):
            yield
            return
        from dalle_core.demo.server import serve_demo_world

        with serve_demo_world(demo_world_for(profile), host=self.demo_host, port=self.demo_port):
            yield


def demo_world_for(profile: Profile):
    from dalle_core.demo.world import DemoWorld

    d = profile.data
    return DemoWorld(
        seed=d.demo_seed,
        items_per_batch=d.demo_items_per_batch,
        n_batches=d.demo_batches,
        n_eval=d.demo_eval_items,
    )


def default_run_dir() -> Path:
    return Path(os.environ.get("DALLE_RUN_DIR", "runs/demo")).resolve()


SHARDS_MANIFEST = "shards/manifest.json"
_CODE_VERSION: list[str] = []  # computed once per process: the code does not change under it


def code_version() -> str:
    """The git commit of this checkout (`+dirty` with uncommitted changes to tracked files);
    in an image without .git, $DALLE_CODE_VERSION (set at build) or the package version."""
    if os.environ.get("DALLE_CODE_VERSION"):
        return os.environ["DALLE_CODE_VERSION"]
    if not _CODE_VERSION:
        _CODE_VERSION.append(_git_commit() or _package_version())
    return _CODE_VERSION[0]


def _git_commit() -> str | None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("dalle-platform")
    except Exception:  # not installed (a bare source tree)
        return "unknown"


def data_version(store: Storage, key: str = SHARDS_MANIFEST) -> str | None:
    """sha256 of the shards manifest (it lists every shard's sha256, so it names the data);
    None when the store has no manifest yet."""
    import hashlib

    if not store.exists(key):
        return None
    return hashlib.sha256(store.get_text(key).encode()).hexdigest()
