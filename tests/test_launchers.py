"""`TorchrunLauncher` offline: the local command (the demo's, unchanged), the sbatch script
(run under stand-in srun/scontrol to see the torchrun each task starts), and the Kubernetes
Service + indexed Job (checked against the Kubernetes object schemas and the hand-written
infra/k8s manifest, then "created" through stand-in API objects whose Job runs rank 0's Pipes
calls with the pod's environment). The real SLURM run is tests/test_slurm.py; there is no
Kubernetes cluster here, so the k8s backend is validated offline only."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml

from assets.launchers import K8sJob, SlurmJob, TorchrunLauncher, local_command
from k8s_schema import roundtrip_equal

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--profile-json", "/shared/run/profile.json", "--codes", "/shared/codes", "--out", "/shared/run",
        "--nodes", "4", "--gpus-per-node", "8"]
ENV = {"MLFLOW_RUN_ID": "abc123", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "DAGSTER_PIPES_CONTEXT": "e30="}


def test_local_backend_is_the_demos_standalone_torchrun():
    assert local_command("orchestration.prior_entry", ["--out", "x"], 4, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
        "-m", "orchestration.prior_entry", "--out", "x"]


def test_from_env_picks_the_backend_and_settings():
    assert TorchrunLauncher.from_env({}).backend == "local"
    lr = TorchrunLauncher.from_env({"DALLE_TORCHRUN_BACKEND": "slurm", "DALLE_SLURM_PARTITION": "gpu",
                                    "DALLE_SLURM_GPUS_PER_NODE": "8", "DALLE_K8S_NAMESPACE": "ml"})
    assert (lr.backend, lr.slurm_partition, lr.slurm_gpus_per_node, lr.k8s_namespace) == ("slurm", "gpu", 8, "ml")
    with pytest.raises(Exception):
        TorchrunLauncher(backend="mpi")


def sbatch(tmp_path, **kw) -> str:
    lr = TorchrunLauncher(backend="slurm", python="/venv/bin/python", workdir="/shared/dalle", **kw)
    return SlurmJob(lr, tmp_path, "dalle-prior").script("orchestration.prior_entry", ARGS, 4, 8, ENV)


def test_sbatch_script_one_torchrun_per_machine(tmp_path):
    s = sbatch(tmp_path, slurm_partition="gpu", slurm_gpus_per_node=8, slurm_cpus_per_task=64,
               slurm_time="7-00:00:00", slurm_extra_args=["--exclusive"], max_restarts=3,
               slurm_setup=["export NCCL_DEBUG=WARN"])
    head = [l for l in s.splitlines() if l.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=dalle-prior", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                    f"#SBATCH --output={tmp_path}/slurm-%j.out", "#SBATCH --partition=gpu",
                    "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --time=7-00:00:00",
                    "#SBATCH --exclusive"]
    assert "cd /shared/dalle" in s and "export MLFLOW_RUN_ID=abc123" in s and "export NCCL_DEBUG=WARN" in s
    assert "export DAGSTER_PIPES_CONTEXT=e30=" in s
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)  # valid bash
    with pytest.raises(ValueError, match="does not divide"):
        sbatch(tmp_path, slurm_nodes=3)


def test_sbatch_script_under_stand_in_srun(tmp_path):
    """Run the script with srun/scontrol replaced by scripts that print what they got: each task's
    torchrun has --nnodes = the task count and meets at the allocation's first node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'printf "%s\\n" "$@" > "$SRUN_ARGS"'),
                       ("scontrol", 'printf "node-a\\nnode-b\\n"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch(tmp_path, rdzv_port=29555, max_restarts=3).replace("cd /shared/dalle", f"cd {tmp_path}"))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NTASKS="4", SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="node-[a-d]", SRUN_ARGS=str(tmp_path / "srun.args"))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "4 torchruns x 8, rendezvous node-a:29555" in done.stdout
    argv = (tmp_path / "srun.args").read_text().splitlines()
    assert argv[:3] == ["--ntasks=4", "--kill-on-bad-exit=1", "/venv/bin/python"]
    assert argv[3:] == ["-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=node-a:29555", "--rdzv-id=77", "--max-restarts=3",
                        "-m", "orchestration.prior_entry", *ARGS]
    # several torchruns on one machine (the one-machine test cluster): the rendezvous as configured
    one = sbatch(tmp_path, slurm_nodes=2, slurm_rdzv_host="127.0.0.1")
    assert "#SBATCH --nodes=2" in one and "#SBATCH --ntasks-per-node=2" in one and "RDZV_HOST=127.0.0.1" in one


def k8s(**kw) -> tuple[dict, dict]:
    lr = TorchrunLauncher(backend="k8s", k8s_gpus_per_pod=8, k8s_namespace="ml", **kw)
    return K8sJob(lr, "dalle-prior").manifests("orchestration.prior_entry", ARGS, 4, 8, ENV)


def test_k8s_manifests_indexed_job_and_headless_service():
    pytest.importorskip("kubernetes", reason="the kubernetes client comes with dagster-k8s")
    service, job = k8s()
    assert roundtrip_equal(service) and roundtrip_equal(job)
    name = service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {
        "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    argv = c["command"] + c["args"]
    assert "--nnodes=4" in argv and "--nproc-per-node=8" in argv
    assert f"--rdzv-endpoint={name}-0.{name}:29500" in argv and argv[-len(ARGS):] == ARGS
    assert {e["name"]: e["value"] for e in c["env"]} == ENV
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dalle-data"
    # the same shape as the hand-written manifest in infra/k8s
    ref = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "infra/k8s/prior-torchrun-job.yaml").read_text())}
    assert ref["Service"]["spec"].keys() == service["spec"].keys()
    rc = ref["Job"]["spec"]["template"]["spec"]["containers"][0]
    # torchrun == python -m torch.distributed.run; the same flags in the same order, the same entry
    assert rc["command"] == ["torchrun"] and argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert [a.split("=")[0] for a in rc["args"][:8]] == [a.split("=")[0] for a in argv[3:11]]
    assert ref["Job"]["spec"]["template"]["spec"]["subdomain"] == ref["Service"]["metadata"]["name"]

class FakeBatch:
    """Stands in for BatchV1Api: 'creating' the Job runs rank 0's Pipes calls with the pod's env."""

    def __init__(self, fail: bool = False):
        self.fail, self.created, self.deleted = fail, [], []

    def create_namespaced_job(self, ns, job):
        self.created.append((ns, job))
        c = job["spec"]["template"]["spec"]["containers"][0]
        env = dict(os.environ, **{e["name"]: e["value"] for e in c["env"]})
        code = ("from dagster_pipes import open_dagster_pipes\n"
                "with open_dagster_pipes() as p:\n"
                "    p.log.info('{\"step\": 1, \"loss\": 2.5}')\n"
                "    p.report_asset_materialization(metadata={'train_step': 1})\n")
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)

    def read_namespaced_job_status(self, name, ns):
        cond = [SimpleNamespace(type="Failed", status="True", reason="BackoffLimitExceeded", message="pod 0")]
        return SimpleNamespace(status=SimpleNamespace(succeeded=None if self.fail else 2,
                                                      conditions=cond if self.fail else []))

    def delete_namespaced_job(self, name, ns, body=None):
        self.deleted.append(name)


class FakeCore:
    def __init__(self):
        self.services, self.deleted = [], []

    def create_namespaced_service(self, ns, svc):
        self.services.append((ns, svc))

    def delete_namespaced_service(self, name, ns):
        self.deleted.append(name)


@pytest.mark.parametrize("fail", [False, True])
def test_k8s_backend_through_stand_in_api(tmp_path, monkeypatch, fail):
    batch, core = FakeBatch(fail), FakeCore()
    monkeypatch.setattr(K8sJob, "_apis", lambda self: (batch, core))

    @dg.asset
    def trained(context: dg.AssetExecutionContext, torchrun: TorchrunLauncher) -> dg.MaterializeResult:
        return torchrun.launch(context, module="orchestration.prior_entry", args=["--out", str(tmp_path)],
                               run_dir=tmp_path, nnodes=2, nproc_per_node=1, env={"OMP_NUM_THREADS": "1"},
                               name="dalle-prior").get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    lr = TorchrunLauncher(backend="k8s", poll_seconds=0.01, k8s_mount_path=str(tmp_path.parent))
    result = dg.materialize([trained], resources={"torchrun": lr}, instance=instance, raise_on_error=False)
    (ns, svc), = core.services
    assert ns == "default" and svc["kind"] == "Service" and core.deleted == ["dalle-prior"]
    assert batch.created[0][1]["spec"]["completions"] == 2
    if fail:
        assert not result.success and batch.deleted == ["dalle-prior"]
        assert "BackoffLimitExceeded" in str(result.get_step_failure_events()[0].step_failure_data.error)
        return
    assert result.success and batch.deleted == []
    assert result.asset_materializations_for_node("trained")[0].metadata["train_step"].value == 1
    assert any('"loss": 2.5' in (r.user_message or "") for r in instance.all_logs(result.run_id))


def test_k8s_backend_wants_the_run_folder_on_the_shared_volume(tmp_path):
    @dg.asset
    def trained(context: dg.AssetExecutionContext, torchrun: TorchrunLauncher) -> None:
        torchrun.launch(context, module="orchestration.prior_entry", args=[], run_dir=tmp_path, nnodes=2)

    result = dg.materialize([trained], resources={"torchrun": TorchrunLauncher(backend="k8s")},
                            raise_on_error=False)
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert "not on the shared volume mounted at /data" in str(error)
