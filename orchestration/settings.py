"""Where a deployment keeps things, read once from the environment.

Everything defaults to one run directory (`runs/demo`): storage, the MLflow
SQLite database and artifacts, the Dagster instance and the URL-list inbox.
At scale the same variables point at S3, an MLflow server and Postgres.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dalle_core.profiles import get_profile


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting."""


def check_s3_credentials(root: str) -> None:
    """Stop at start-up, not at the first write an hour later, when S3 storage
    is configured but boto3 finds no credentials (env, profile, instance role)."""
    import boto3

    if boto3.session.Session().get_credentials() is None:
        raise ConfigError(f"DALLE_STORAGE={root} needs AWS credentials: set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role)")


@dataclass(frozen=True)
class Settings:
    run_dir: Path
    profile: str = "small"
    storage_root: str = ""  # local dir or s3://bucket/prefix; default <run_dir>/storage
    s3_endpoint_url: str | None = None
    mlflow_tracking_uri: str = ""  # default sqlite:///<run_dir>/mlflow.db
    mlflow_artifact_root: str = ""
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    url_list_dir: str = ""  # default <run_dir>/url_lists
    demo_world: bool = True
    demo_port: int = 8765

    def __post_init__(self):
        try:  # unknown profile: stop at start-up, naming the setting
            get_profile(self.profile)
        except ValueError as e:
            raise ConfigError(f"{e} (set by --profile or DALLE_PROFILE)") from None
        rd = Path(self.run_dir).resolve()
        object.__setattr__(self, "run_dir", rd)
        if not self.storage_root:
            object.__setattr__(self, "storage_root", str(rd / "storage"))
        if not self.mlflow_tracking_uri:
            object.__setattr__(self, "mlflow_tracking_uri", f"sqlite:///{rd / 'mlflow.db'}")
        if not self.mlflow_artifact_root and not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            # a tracking server decides its own artifact store; locally: under the run dir
            object.__setattr__(self, "mlflow_artifact_root", str(rd / "mlartifacts"))
        if not self.url_list_dir:
            object.__setattr__(self, "url_list_dir", str(rd / "url_lists"))
        if self.storage_root.startswith("s3://"):
            check_s3_credentials(self.storage_root)

    @property
    def dagster_home(self) -> Path:
        return self.run_dir / "dagster_home"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        values = dict(
            run_dir=Path(env.get("DALLE_RUN_DIR", "runs/demo")),
            profile=env.get("DALLE_PROFILE", "small"),
            storage_root=env.get("DALLE_STORAGE", ""),
            s3_endpoint_url=env.get("DALLE_S3_ENDPOINT_URL") or None,
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI", ""),
            mlflow_artifact_root=env.get("DALLE_MLFLOW_ARTIFACT_ROOT", ""),
            mlflow_ui_url=env.get("DALLE_MLFLOW_UI_URL", "http://127.0.0.1:5000"),
            url_list_dir=env.get("DALLE_URL_LIST_DIR", ""),
            demo_world=env.get("DALLE_DEMO_WORLD", "1") not in ("0", "false", "no"),
            demo_port=int(env.get("DALLE_DEMO_PORT", "8765")),
        )
        values.update(overrides)
        return cls(**values)

    def export(self) -> dict[str, str]:
        """The same settings as environment variables, for `dagster dev` and subprocesses."""
        out = {
            "DALLE_RUN_DIR": str(self.run_dir),
            "DALLE_PROFILE": self.profile,
            "DALLE_STORAGE": self.storage_root,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "DALLE_MLFLOW_ARTIFACT_ROOT": self.mlflow_artifact_root,
            "DALLE_MLFLOW_UI_URL": self.mlflow_ui_url,
            "DALLE_URL_LIST_DIR": self.url_list_dir,
            "DALLE_DEMO_WORLD": "1" if self.demo_world else "0",
            "DALLE_DEMO_PORT": str(self.demo_port),
            "DAGSTER_HOME": str(self.dagster_home),
        }
        if self.s3_endpoint_url:
            out["DALLE_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        return out
