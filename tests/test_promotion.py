"""Champion / challenger in the MLflow registry: the first evaluated version is
champion; a later one is promoted only if it beats the champion on every metric
the rules name, measured under the same fingerprint (captions, candidates, seed,
scoring weights, radii, code), and stays challenger (with the reason) otherwise.
A metric the champion lacks is never a win; a champion's figures are never
overwritten by a later evaluation."""

import pytest


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    yield mlflow, exp
    mlflow.set_tracking_uri("")


def _register(mlflow, exp, tmp_path, n):
    from assets.model_registry import CHALLENGER, DVAEModel, log_and_register

    f = tmp_path / f"w{n}.pt"
    f.write_bytes(b"weights %d" % n)
    with mlflow.start_run(experiment_id=exp):
        return log_and_register(f, "m", DVAEModel(), alias=CHALLENGER)


FP = {"captions": "abc", "candidates": "8", "seed": "0", "scorer": "r1", "code_version": "c1"}


def test_champion_challenger_both_ways(registry, tmp_path):
    from dalle_core.eval.fairness import fingerprint_id
    from assets.model_registry import champion_version, promote_if_better

    mlflow, exp = registry
    rules = {"fd": "lower", "match": "higher"}
    v1 = _register(mlflow, exp, tmp_path, 1)
    ok, why = promote_if_better("m", v1, {"fd": 10.0, "match": 0.5}, rules, FP)
    assert ok and champion_version("m") == v1 and "first" in why

    v2 = _register(mlflow, exp, tmp_path, 2)  # better fd, worse match: not promoted
    ok, why = promote_if_better("m", v2, {"fd": 8.0, "match": 0.4}, rules, FP)
    assert not ok and champion_version("m") == v1
    assert "match 0.4 vs champion's 0.5" in why and "fd" not in why.split("kept:")[1]
    assert champion_version("m", "challenger") == v2

    v3 = _register(mlflow, exp, tmp_path, 3)  # better on both: promoted
    ok, why = promote_if_better("m", v3, {"fd": 9.0, "match": 0.6}, rules, FP)
    assert ok and champion_version("m") == v3 and f"beat champion v{v1}" in why

    # the figures stay on each version for the next comparison
    tags = mlflow.MlflowClient().get_model_version("m", v2).tags
    fp = fingerprint_id(FP)
    assert float(tags[f"eval.{fp}.fd"]) == 8.0 and "captions" in tags[f"fingerprint.{fp}"]


def test_other_conditions_are_not_compared(registry, tmp_path):
    """A challenger measured on other captions / another scorer is not compared with the
    champion's figures from other conditions: refused unless the champion is re-scored."""
    from dalle_core.eval.fairness import fingerprint_id
    from assets.model_registry import champion_version, promote_if_better, version_figures

    mlflow, exp = registry
    rules = {"fd": "lower"}
    v1 = _register(mlflow, exp, tmp_path, 1)
    promote_if_better("m", v1, {"fd": 10.0}, rules, FP)
    v2 = _register(mlflow, exp, tmp_path, 2)
    other = {**FP, "candidates": "2", "scorer": "r2"}  # far better FD, but measured differently
    result = promote_if_better("m", v2, {"fd": 1.0}, rules, other)
    assert not result.promoted and champion_version("m") == v1
    assert f"no figures under this evaluation's fingerprint {fingerprint_id(other)}" in result.reason
    assert fingerprint_id(FP) in result.reason  # it says which conditions the champion was measured under

    # re-scored under the challenger's conditions in the same run: a fair comparison
    result = promote_if_better("m", v2, {"fd": 1.0}, rules, other, champion_metrics={"fd": 3.0})
    assert result.promoted and champion_version("m") == v2 and result.champion_metrics == {"fd": 3.0}
    figures = version_figures("m", v1)
    assert figures[fingerprint_id(FP)].metrics == {"fd": 10.0}  # the original figures, untouched
    assert figures[fingerprint_id(other)].metrics == {"fd": 3.0}


def test_champion_figures_are_never_overwritten(registry, tmp_path):
    from dalle_core.eval.fairness import fingerprint_id
    from assets.model_registry import promote_if_better, record_evaluation, version_figures

    mlflow, exp = registry
    v1 = _register(mlflow, exp, tmp_path, 1)
    promote_if_better("m", v1, {"fd": 10.0}, {"fd": "lower"}, FP)
    # a later (weaker: e.g. partial, or a flaky) evaluation under the same conditions
    kept = record_evaluation("m", v1, FP, {"fd": 99.0, "extra": 2.0})
    assert kept.metrics == {"fd": 10.0, "extra": 2.0}  # a metric it lacked is added, none replaced
    assert version_figures("m", v1)[fingerprint_id(FP)].metrics["fd"] == 10.0
    # re-scoring the champion through a challenger's run does not replace them either
    v2 = _register(mlflow, exp, tmp_path, 2)
    result = promote_if_better("m", v2, {"fd": 9.0}, {"fd": "lower"}, FP, champion_metrics={"fd": 50.0})
    assert result.promoted and result.champion_metrics["fd"] == 10.0  # compared with the recorded figure


def test_a_metric_the_champion_lacks_is_never_a_win(registry, tmp_path):
    from assets.model_registry import champion_version, promote_if_better

    mlflow, exp = registry
    v1 = _register(mlflow, exp, tmp_path, 1)
    promote_if_better("m", v1, {"fd": 10.0}, {"fd": "lower"}, FP)
    v2 = _register(mlflow, exp, tmp_path, 2)
    result = promote_if_better("m", v2, {"fd": 5.0, "match": 0.9}, {"fd": "lower", "match": "higher"}, FP)
    assert not result.promoted and champion_version("m") == v1
    assert "has no match under fingerprint" in result.reason and "never a win" in result.reason


def test_figures_without_a_fingerprint_are_not_compared(registry, tmp_path):
    """Figures stored before fingerprints (tags eval.<metric>) have unknown conditions."""
    from assets.model_registry import champion_version, promote_if_better

    mlflow, exp = registry
    v1 = _register(mlflow, exp, tmp_path, 1)
    mlflow.MlflowClient().set_registered_model_alias("m", "champion", v1)
    mlflow.MlflowClient().set_model_version_tag("m", v1, "eval.fd", "100.0")
    v2 = _register(mlflow, exp, tmp_path, 2)
    ok, why = promote_if_better("m", v2, {"fd": 5.0}, {"fd": "lower"}, FP)
    assert not ok and champion_version("m") == v1 and "never evaluated" in why


def test_promotion_rules_are_checked(registry, tmp_path):
    from assets.model_registry import promote_if_better

    mlflow, exp = registry
    v1 = _register(mlflow, exp, tmp_path, 1)
    with pytest.raises(ValueError, match="must be 'lower' or 'higher'"):
        promote_if_better("m", v1, {"fd": 1.0}, {"fd": "smaller"})
    with pytest.raises(ValueError, match="promotion metric 'fid' was not computed"):
        promote_if_better("m", v1, {"fd": 1.0}, {"fid": "lower"})


def test_importing_the_registry_and_dalle_help_print_no_type_hint_warning():
    """MLflow's 'Add type hints to the `predict` method' warning (three times per command)
    is not the user's to act on: neither an import nor `dalle --help` prints it."""
    import subprocess
    import sys

    for argv in (["-W", "always", "-c", "import assets.model_registry"],
                 ["-W", "always", "-m", "orchestration.cli", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
        assert "Add type hints" not in out.stderr + out.stdout, argv


def test_other_warnings_of_the_model_hook_still_show(recwarn):
    """Only that one message is dropped: another warning from the hook reaches the user."""
    import warnings

    import mlflow.pyfunc.model as pm

    from assets.model_registry import _PythonModel

    original = pm.PythonModel.__init_subclass__.__func__

    def noisy(cls, **kw):
        warnings.warn("something else", UserWarning)
        return original(cls, **kw)

    pm.PythonModel.__init_subclass__ = classmethod(noisy)
    try:
        class M(_PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input
    finally:
        pm.PythonModel.__init_subclass__ = classmethod(original)
    texts = [str(w.message) for w in recwarn]
    assert "something else" in texts and not any("Add type hints" in t for t in texts)


def test_independent_fd_and_the_labels_of_the_contrastive_fd():
    """The contrastive FD is labelled as measured in the selecting reranker's space; a
    second, independent feature model gives independent_fd beside it."""
    import numpy as np
    import torch
    from PIL import Image

    from dalle_core.eval.report import render_report
    from dalle_core.eval.zero_shot import describe_metric, zero_shot_metrics

    rng = np.random.default_rng(0)
    ims = lambda n, hi: [Image.fromarray(rng.integers(0, hi, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
    feats = lambda x: x.mean(dim=(2, 3))  # [N, 3]
    other = lambda x: torch.cat([x.amax(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # [N, 6]
    m = zero_shot_metrics(ims(8, 128), ims(8, 256), feats, radii=(0, 2), independent_features_fn=other,
                          independent_id="other")
    assert {"contrastive_fd", "contrastive_fd_blur2", "independent_fd", "independent_fd_blur2"} <= set(m)
    assert m["independent_fd"] != m["contrastive_fd"]
    assert "selected the samples" in describe_metric("contrastive_fd")
    assert "did not select" in describe_metric("independent_fd_blur2") and "blur 2" in describe_metric("independent_fd_blur2")
    html = render_report(m, descriptions={k: describe_metric(k) for k in m if isinstance(m[k], float)},
                         comparison={"title": "prior v2 vs champion v1", "header": ["metric", "v2", "v1", "rule"],
                                     "rows": [("contrastive_fd", "1", "2", "lower is better")], "note": "why"}).html
    assert "prior v2 vs champion v1" in html and "selected the samples" in html
