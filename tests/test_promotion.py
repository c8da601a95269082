"""Champion / challenger in the MLflow registry: the first evaluated version is
champion; a later one is promoted only if it beats the champion on every metric
the rules name, and stays challenger (with the reason) otherwise."""

import pytest


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    yield mlflow, exp
    mlflow.set_tracking_uri("")


def _register(mlflow, exp, tmp_path, n):
    from orchestration.model_registry import CHALLENGER, DVAEModel, log_and_register

    f = tmp_path / f"w{n}.pt"
    f.write_bytes(b"weights %d" % n)
    with mlflow.start_run(experiment_id=exp):
        return log_and_register(f, "m", DVAEModel(), alias=CHALLENGER)


def test_champion_challenger_both_ways(registry, tmp_path):
    from orchestration.model_registry import champion_version, promote_if_better

    mlflow, exp = registry
    rules = {"fd": "lower", "match": "higher"}
    v1 = _register(mlflow, exp, tmp_path, 1)
    ok, why = promote_if_better("m", v1, {"fd": 10.0, "match": 0.5}, rules)
    assert ok and champion_version("m") == v1 and "first" in why

    v2 = _register(mlflow, exp, tmp_path, 2)  # better fd, worse match: not promoted
    ok, why = promote_if_better("m", v2, {"fd": 8.0, "match": 0.4}, rules)
    assert not ok and champion_version("m") == v1
    assert "match 0.4 vs champion's 0.5" in why and "fd" not in why.split("kept:")[1]
    assert champion_version("m", "challenger") == v2

    v3 = _register(mlflow, exp, tmp_path, 3)  # better on both: promoted
    ok, why = promote_if_better("m", v3, {"fd": 9.0, "match": 0.6}, rules)
    assert ok and champion_version("m") == v3 and f"beat champion v{v1}" in why

    # the figures stay on each version for the next comparison
    tags = mlflow.MlflowClient().get_model_version("m", v2).tags
    assert float(tags["eval.fd"]) == 8.0


def test_promotion_rules_are_checked(registry, tmp_path):
    from orchestration.model_registry import promote_if_better

    mlflow, exp = registry
    v1 = _register(mlflow, exp, tmp_path, 1)
    with pytest.raises(ValueError, match="must be 'lower' or 'higher'"):
        promote_if_better("m", v1, {"fd": 1.0}, {"fd": "smaller"})
    with pytest.raises(ValueError, match="promotion metric 'fid' was not computed"):
        promote_if_better("m", v1, {"fd": 1.0}, {"fid": "lower"})
