"""The SLURM backend of `TorchrunLauncher` (and the `prior` asset on it), end to end against a
real one-machine cluster (scripts/slurm-test-cluster.sh: munged + slurmctld + slurmd on
127.0.0.1, stopped after).

The prior's torchrun entry (orchestration.prior_entry) runs as a 2-machine job: sbatch, one
srun task per logical machine, each a `torchrun --nnodes 2` meeting at a c10d rendezvous on
127.0.0.1. Rank 0's Pipes messages come back over files in the run folder into the Dagster
run (metrics as log lines, the final step as materialization metadata) and into MLflow; the
weights equal one process trained on the same global batch."""


import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest
import torch

from assets.launchers import TorchrunLauncher
from dalle_core.prior.data import code_batches, code_shards, write_synthetic_code_shards
from dalle_core.prior.model import read_prior_file
from dalle_core.prior.train import train_prior
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage
from services import free_port, require_service

pytestmark = [pytest.mark.slow, pytest.mark.service]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-test-cluster.sh"
TINY = get_profile("tiny").prior
TRAINING = get_profile("tiny").prior_training
STEPS = 8
BATCH = 4  # global: 2 samples on each of the 2 ranks


@pytest.fixture(scope="module")
def slurm_cluster():
    """The cluster's slurm.conf, exported as SLURM_CONF while the module's tests run."""
    d = tempfile.mkdtemp(prefix="dalle-slurm-")
    started = subprocess.run(["sh", str(SCRIPT), "start", d, str(free_port()), str(free_port())],
                             capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        subprocess.run(["sh", str(SCRIPT), "stop", d], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
        require_service(f"could not start the SLURM test cluster: {started.stderr.strip()[-1500:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = started.stdout.strip().splitlines()[-1]
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run(["sh", str(SCRIPT), "stop", d], capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codes")
    write_synthetic_code_shards(LocalStorage(root), "image_codes", TINY, n_shards=2, per_shard=20, seed=3)
    return root / "image_codes"


def launcher(**kw) -> TorchrunLauncher:
    # two torchruns on this one machine: one SLURM node, two tasks, the rendezvous on loopback
    return TorchrunLauncher(backend="slurm", slurm_nodes=1, slurm_rdzv_host="127.0.0.1", rdzv_port=free_port(),
                            workdir=str(ROOT), poll_seconds=0.5, **kw)


def train_args(codes: Path, out: Path) -> list[str]:
    return ["--profile", "tiny", "--codes", str(codes), "--out", str(out), "--nodes", "2", "--gpus-per-node", "1",
            "--batch-size", str(BATCH), "--data-split", "sample", "--steps", str(STEPS), "--log-every", "1",
            "--checkpoint-every", "100", "--quiet"]


@pytest.mark.timeout(600)
def test_prior_entry_as_a_two_machine_slurm_job(slurm_cluster, codes, tmp_path):
    import mlflow

    out = tmp_path / "run"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("slurm")).info.run_id

    @dg.asset
    def trained(context: dg.AssetExecutionContext, torchrun: TorchrunLauncher) -> dg.MaterializeResult:
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
               "MLFLOW_RUN_ID": run_id}
        done = torchrun.launch(context, module="orchestration.prior_entry", args=train_args(codes, out),
                               run_dir=out, nnodes=2, nproc_per_node=1, env=env, name="dalle-prior-test")
        return done.get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([trained], resources={"torchrun": launcher()}, instance=instance)
    assert result.success
    # the job ran through sbatch: its script and log are in the run folder
    script = (out / "dalle-prior-test.sbatch").read_text()
    assert "--ntasks-per-node=2" in script and "--rdzv-endpoint=$RDZV_HOST:" in script
    log = next(out.glob("slurm-*.out")).read_text()
    assert "2 torchruns x 1, rendezvous 127.0.0.1" in log
    # rank 0's Pipes report: the final step as metadata, every metrics record in the run's logs
    meta = result.asset_materializations_for_node("trained")[0].metadata
    assert meta["train_step"].value == STEPS
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert sum('"loss"' in (m or "") for m in logs) >= STEPS
    # ... and into MLflow
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "loss")) == STEPS

    # the same weights as one process on the whole global batch
    paths, counts = code_shards(LocalStorage(codes.parent), codes.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_prior(TINY, TRAINING.replace(batch_size=BATCH),
                             lambda s: code_batches(paths, BATCH, TRAINING.seed, start_step=s, counts=counts),
                             tmp_path / "single", total_steps=STEPS, log_every=1, checkpoint_every=100)
    finally:
        torch.set_num_threads(threads)
    mine = read_prior_file(out / "prior.pt")["state_dict"]
    theirs = single.model.state_dict()
    assert mine.keys() == theirs.keys()
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert worst < 1e-5, worst


@pytest.mark.timeout(300)
def test_a_failed_job_names_its_id_and_log(slurm_cluster, tmp_path):
    @dg.asset
    def broken(context: dg.AssetExecutionContext, torchrun: TorchrunLauncher) -> None:
        torchrun.launch(context, module="orchestration.no_such_entry", args=[], run_dir=tmp_path, nnodes=2,
                        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, name="dalle-broken")

    result = dg.materialize([broken], resources={"torchrun": launcher()}, raise_on_error=False)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    message = error.message + "".join(c.error.message for c in (error.cause,) if c) if hasattr(error, "cause") \
        else error.message
    assert re.search(r"SLURM job \d+ ended FAILED .*slurm-\d+\.out", str(error), re.S) or \
        re.search(r"SLURM job \d+ ended FAILED", message), message
    assert "orchestration.no_such_entry" in str(error)  # the log's tail comes with it


@pytest.mark.timeout(600)
def test_prior_asset_with_the_slurm_backend(slurm_cluster, tmp_path):
    """The `prior` asset itself, its torchrun resource set to slurm: 2 machines x 1 process as one
    SLURM job, rank 0's report in the materialization, the model registered in MLflow."""
    from assets.dvae import CODES
    from assets.prior import prior
    from assets.resources import MlflowResource, ProfileResource, StorageResource
    from assets.text import TOKENIZER_KEY
    from dalle_core.text.bpe import train_bpe_tokenizer

    root = tmp_path / "store"
    write_synthetic_code_shards(LocalStorage(root), CODES, TINY, n_shards=2, per_shard=20, seed=4)
    captions = [f"a {c} {s} {w} a {c2} {s2}" for c in ("red", "blue", "green") for s in ("cube", "ball", "cone")
                for w in ("left of", "above", "below") for c2 in ("red", "blue") for s2 in ("cube", "ball")]
    (root / TOKENIZER_KEY).parent.mkdir(parents=True, exist_ok=True)
    train_bpe_tokenizer(captions * 4, get_profile("tiny").text).save(root / TOKENIZER_KEY)
    resources = {
        "storage": StorageResource(root=str(root), scratch_dir=str(tmp_path / "scratch")),
        "profile": ProfileResource(name="tiny"),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 artifact_root=str(tmp_path / "artifacts")),
        "torchrun": launcher(),
    }
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)  # the job's tasks import orchestration.prior_entry from the checkout
    try:
        result = dg.materialize([prior], resources=resources, instance=dg.DagsterInstance.ephemeral(),
                                run_config={"ops": {"prior": {"config": {"nodes": 2, "nproc_per_node": 1,
                                                                         "steps": 4}}}})
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert result.success
    meta = result.asset_materializations_for_node("prior")[0].metadata
    assert meta["train_step"].value == 4 and meta["world_size"].value == 2
    assert meta["model_version"].value.startswith("prior v1")
    run_dir, = (tmp_path / "scratch" / "prior-runs").iterdir()
    assert "2 torchruns x 1, rendezvous 127.0.0.1" in next(run_dir.glob("slurm-*.out")).read_text()
