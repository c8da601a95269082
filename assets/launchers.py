"""Where a torchrun training runs: the `TorchrunLauncher` resource.

One resource, three backends, the same Dagster Pipes protocol in each: rank 0 of the
torchrun entry module (e.g. `orchestration.prior_entry`) opens the Pipes session, streams
metrics as log lines and reports the final figures as the materialization's metadata; the
asset then reads the model the ranks wrote to the run folder.

- ``local``: ``torchrun --standalone`` as a subprocess of the Dagster run
  (`dg.PipesSubprocessClient`, as the demo has always run: the logical machines of
  ``nnodes`` are processes on this box).
- ``slurm``: an sbatch script (written into the run folder) with one ``srun`` task per
  logical machine, each task one ``torchrun --nnodes N`` meeting at a c10d rendezvous on the
  allocation's first node; submitted with ``sbatch``, followed with ``scontrol``/``sacct``
  until it ends, cancelled with ``scancel`` when the Dagster run is. Pipes over files on the
  shared filesystem (the run folder every node sees).
- ``k8s``: an indexed Job (one pod per machine, a torchrun in each) and the headless Service
  that gives pod 0 the DNS name the rendezvous uses, created through the Kubernetes API and
  followed until the Job completes or fails; Pipes over files on the shared volume. The
  manifests follow infra/k8s/prior-torchrun-job.yaml. Validated offline only (no cluster here).

Layout: this module imports no orchestration (assets -> dalle_core only); the entry module is
named by string.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import dagster as dg

DEFAULT_IMAGE = "registry.example.org/dalle-platform:0.1.0-cuda"


class TorchrunLauncher(dg.ConfigurableResource):
    """Launches a torchrun entry module for an asset, locally, under SLURM or on Kubernetes."""

    backend: Literal["local", "slurm", "k8s"] = "local"
    max_restarts: int = 0  # torchrun's --max-restarts on a cluster (a failed worker group re-rendezvouses)
    rdzv_port: int = 29500
    # where the nodes find the project: the interpreter (a venv on the shared filesystem) and its root
    python: str = ""  # default: this interpreter
    workdir: str = ""  # default: the current directory
    poll_seconds: float = 5.0  # how often a cluster job's state is read
    # ---- slurm
    slurm_partition: Optional[str] = None
    slurm_nodes: Optional[int] = None  # machines to allocate (default: nnodes, one torchrun each)
    slurm_gpus_per_node: Optional[int] = None  # --gpus-per-node (None: no GPUs requested)
    slurm_cpus_per_task: Optional[int] = None
    slurm_time: Optional[str] = None  # --time, e.g. 7-00:00:00
    slurm_extra_args: list[str] = []  # more sbatch options, e.g. ["--exclusive", "--account=ml"]
    slurm_rdzv_host: Optional[str] = None  # default: the allocation's first node
    slurm_setup: list[str] = []  # shell lines run before srun (module load ..., NCCL variables)
    # ---- k8s
    k8s_namespace: str = "default"
    k8s_image: str = DEFAULT_IMAGE
    k8s_gpus_per_pod: int = 0  # nvidia.com/gpu limit per pod (0: CPU pods)
    k8s_volume_claim: str = "dalle-data"  # a ReadWriteMany volume every pod and the Dagster run see
    k8s_mount_path: str = "/data"  # mounted here; the run folder and data must lie under it
    k8s_service_account: Optional[str] = None
    k8s_config_map: Optional[str] = "dalle-settings"  # envFrom (MLFLOW_TRACKING_URI, ...)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "TorchrunLauncher":
        """The platform's launcher (`orchestration.definitions`): local unless DALLE_TORCHRUN_BACKEND
        says slurm or k8s; DALLE_SLURM_PARTITION, DALLE_SLURM_GPUS_PER_NODE, DALLE_SLURM_TIME,
        DALLE_K8S_NAMESPACE, DALLE_K8S_IMAGE, DALLE_K8S_GPUS_PER_POD, DALLE_K8S_VOLUME_CLAIM,
        DALLE_K8S_MOUNT_PATH, DALLE_VENV_PYTHON (the nodes' interpreter) fill in the rest. A run's
        resource config (resources: torchrun: config: ...) overrides any of them."""
        e = os.environ if environ is None else environ
        kw: dict[str, Any] = {"backend": e.get("DALLE_TORCHRUN_BACKEND", "local") or "local"}
        for var, field, kind in (("DALLE_SLURM_PARTITION", "slurm_partition", str),
                                 ("DALLE_SLURM_GPUS_PER_NODE", "slurm_gpus_per_node", int),
                                 ("DALLE_SLURM_TIME", "slurm_time", str),
                                 ("DALLE_K8S_NAMESPACE", "k8s_namespace", str),
                                 ("DALLE_K8S_IMAGE", "k8s_image", str),
                                 ("DALLE_K8S_GPUS_PER_POD", "k8s_gpus_per_pod", int),
                                 ("DALLE_K8S_VOLUME_CLAIM", "k8s_volume_claim", str),
                                 ("DALLE_K8S_MOUNT_PATH", "k8s_mount_path", str),
                                 ("DALLE_VENV_PYTHON", "python", str)):
            if e.get(var):
                kw[field] = kind(e[var])
        return cls(**kw)

    # ------------------------------------------------------------------ the one entry point
    def launch(self, context, *, module: str, args: Sequence[str], run_dir: Path | str, nnodes: int = 1,
               nproc_per_node: int = 1, env: Optional[Mapping[str, str]] = None, name: str = "dalle-train",
               extras: Optional[Mapping[str, Any]] = None) -> dg.PipesClientCompletedInvocation:
        """Run ``torchrun -m module args`` on ``nnodes`` machines x ``nproc_per_node`` processes
        inside a Pipes session of `context`; returns the completed invocation
        (``.get_materialize_result()`` has rank 0's report). `run_dir` holds the job's files
        (on a cluster: on the filesystem every node sees)."""
        env = dict(env or {})
        if self.backend == "local":
            cmd = local_command(module, args, nnodes * nproc_per_node, python=self.python or sys.executable)
            context.log.info(f"launching: {' '.join(cmd)}")
            return dg.PipesSubprocessClient().run(command=cmd, context=context, env=env, extras=extras,
                                                  cwd=self.workdir or None)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        mount = self.k8s_mount_path.rstrip("/") or "/"
        if self.backend == "k8s" and not run_dir.resolve().is_relative_to(mount):
            # the pods see only the shared volume: the Pipes files and the model must be on it
            raise dg.Failure(f"k8s backend: the run folder {run_dir} is not on the shared volume mounted at "
                             f"{mount} (set the storage's scratch_dir under it, or k8s_mount_path)")
        injector = dg.PipesFileContextInjector(str(run_dir / "pipes-context.json"))
        reader = dg.PipesFileMessageReader(str(run_dir / "pipes-messages.jsonl"))
        with dg.open_pipes_session(context=context, context_injector=injector, message_reader=reader,
                                   extras=extras) as session:
            env.update(session.get_bootstrap_env_vars())
            if self.backend == "slurm":
                SlurmJob(self, run_dir, name).run(context, module, args, nnodes, nproc_per_node, env)
            else:
                K8sJob(self, name).run(context, module, args, nnodes, nproc_per_node, env)
        return dg.PipesClientCompletedInvocation(session)


def local_command(module: str, args: Sequence[str], world: int, python: str = sys.executable) -> list[str]:
    """The demo's launch, unchanged: every process on this machine, a standalone rendezvous."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", module, *map(str, args)]


def torchrun_command(python: str, module: str, args: Sequence[str], nnodes: int | str, nproc_per_node: int,
                     rdzv_endpoint: str, rdzv_id: str, max_restarts: int) -> list[str]:
    """One machine's torchrun in a multi-machine run (c10d rendezvous)."""
    return [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}", "-m", module, *map(str, args)]


# ====================================================================== SLURM
class SlurmJobFailed(dg.Failure):
    pass


class SlurmJob:
    """A thin Pipes client over sbatch / scontrol / sacct / scancel."""

    def __init__(self, launcher: TorchrunLauncher, run_dir: Path, name: str):
        self.launcher, self.run_dir, self.name = launcher, Path(run_dir), name

    def script(self, module: str, args: Sequence[str], nnodes: int, nproc_per_node: int,
               env: Mapping[str, str]) -> str:
        """The sbatch script: one srun task per logical machine, a torchrun in each."""
        lr = self.launcher
        machines = lr.slurm_nodes or nnodes
        if nnodes % machines:
            raise ValueError(f"slurm_nodes={machines} does not divide nnodes={nnodes}")
        lines = ["#!/bin/bash", f"#SBATCH --job-name={self.name}", f"#SBATCH --nodes={machines}",
                 f"#SBATCH --ntasks-per-node={nnodes // machines}",
                 f"#SBATCH --output={self.run_dir / 'slurm-%j.out'}"]
        if lr.slurm_partition:
            lines.append(f"#SBATCH --partition={lr.slurm_partition}")
        if lr.slurm_gpus_per_node:
            lines.append(f"#SBATCH --gpus-per-node={lr.slurm_gpus_per_node}")
        if lr.slurm_cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={lr.slurm_cpus_per_task}")
        if lr.slurm_time:
            lines.append(f"#SBATCH --time={lr.slurm_time}")
        lines += [f"#SBATCH {a}" for a in lr.slurm_extra_args]
        lines += ["set -euo pipefail", f"cd {shlex.quote(lr.workdir or os.getcwd())}"]
        lines += [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(env.items())]
        lines += list(lr.slurm_setup)
        host = shlex.quote(lr.slurm_rdzv_host) if lr.slurm_rdzv_host else \
            '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        lines += [f"RDZV_HOST={host}", f'echo "{self.name}: $SLURM_NTASKS torchruns x {nproc_per_node}, '
                  f'rendezvous $RDZV_HOST:{lr.rdzv_port}"']
        torchrun = torchrun_command(lr.python or sys.executable, module, args, "$SLURM_NTASKS", nproc_per_node,
                                    f"$RDZV_HOST:{lr.rdzv_port}", "$SLURM_JOB_ID", lr.max_restarts)
        quoted = " ".join(a if a.startswith(("--nnodes=$", "--rdzv-endpoint=$", "--rdzv-id=$"))
                          else shlex.quote(a) for a in torchrun)
        lines.append(f'srun --ntasks="$SLURM_NTASKS" --kill-on-bad-exit=1 {quoted}')
        return "\n".join(lines) + "\n"

    def run(self, context, module, args, nnodes, nproc_per_node, env) -> None:
        path = self.run_dir / f"{self.name}.sbatch"
        path.write_text(self.script(module, args, nnodes, nproc_per_node, env))
        sub = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
        if sub.returncode != 0:
            raise SlurmJobFailed(f"sbatch {path} failed: {sub.stderr.strip() or sub.stdout.strip()}")
        job_id = sub.stdout.strip().split(";")[0]
        log = self.run_dir / f"slurm-{job_id}.out"
        context.log.info(f"SLURM job {job_id} submitted ({nnodes} x {nproc_per_node}); log {log}")
        try:
            state, exit_code = self.wait(job_id)
        except BaseException:  # the Dagster run was cancelled (or the wait failed): do not leave the job
            subprocess.run(["scancel", job_id], capture_output=True)
            context.log.warning(f"cancelled SLURM job {job_id}")
            raise
        if state != "COMPLETED" or exit_code != "0:0":
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise SlurmJobFailed(f"SLURM job {job_id} ended {state} (exit {exit_code}); log {log}:\n{tail}")
        context.log.info(f"SLURM job {job_id} completed")

    def wait(self, job_id: str) -> tuple[str, str]:
        while True:
            state, code = job_state(job_id)
            if state == "PENDING":  # a request the partition can never grant waits forever: say so
                reason = dict(re.findall(r"(\w+)=(\S*)", _scontrol(job_id))).get("Reason", "")
                if reason in NEVER_RUNS:
                    raise SlurmJobFailed(f"SLURM job {job_id} cannot run: pending with reason {reason} "
                                         f"(scontrol show job {job_id})")
            if state not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING",
                             "SUSPENDED"):
                return state, code
            time.sleep(self.launcher.poll_seconds)


# pending reasons of a job that no amount of waiting starts
NEVER_RUNS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                        "InvalidAccount", "InvalidQOS", "QOSMaxNodePerJobLimit"})


def _scontrol(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


def job_state(job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) from scontrol while slurmctld remembers the job, else from sacct."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode == 0 and "JobState=" in out.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
        return fields.get("JobState", ""), fields.get("ExitCode", "")
    acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"],
                          capture_output=True, text=True)
    if acct.returncode == 0 and acct.stdout.strip():
        state, code = acct.stdout.strip().splitlines()[0].split("|")
        return state.split()[0], code
    raise SlurmJobFailed(f"SLURM job {job_id}: neither scontrol nor sacct knows it "
                         f"({out.stderr.strip()} {acct.stderr.strip()})")


# ====================================================================== Kubernetes
class K8sJob:
    """An indexed Job + headless Service through the Kubernetes API (offline-validated)."""

    def __init__(self, launcher: TorchrunLauncher, name: str, batch_api=None, core_api=None):
        self.launcher, self.name = launcher, re.sub(r"[^a-z0-9-]", "-", name.lower())[:50].strip("-")
        self.batch_api, self.core_api = batch_api, core_api

    def manifests(self, module: str, args: Sequence[str], nnodes: int, nproc_per_node: int,
                  env: Mapping[str, str]) -> tuple[dict, dict]:
        """(Service, Job) as plain dicts, the shape of infra/k8s/prior-torchrun-job.yaml."""
        lr, name = self.launcher, self.name
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "dalle-platform"}
        service = {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"batch.kubernetes.io/job-name": name},
                     "ports": [{"name": "rdzv", "port": lr.rdzv_port}]},
        }
        rdzv = f"{name}-0.{name}:{lr.rdzv_port}"
        cmd = torchrun_command("python", module, args, nnodes, nproc_per_node, rdzv, name, lr.max_restarts)
        container = {
            "name": "torchrun", "image": lr.k8s_image, "command": cmd[:1], "args": cmd[1:],
            "ports": [{"name": "rdzv", "containerPort": lr.rdzv_port}],
            "env": [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
            "volumeMounts": [{"name": "data", "mountPath": lr.k8s_mount_path},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
        }
        if lr.k8s_config_map:
            container["envFrom"] = [{"configMapRef": {"name": lr.k8s_config_map}}]
        if lr.k8s_gpus_per_pod:
            container["resources"] = {"limits": {"nvidia.com/gpu": lr.k8s_gpus_per_pod}}
        pod = {
            "subdomain": name, "restartPolicy": "Never",
            "initContainers": [{"name": "wait-for-rendezvous", "image": lr.k8s_image,
                                "command": ["sh", "-c", f"until getent hosts {name}-0.{name}; do sleep 2; done"]}],
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": lr.k8s_volume_claim}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        }
        if lr.k8s_service_account:
            pod["serviceAccountName"] = lr.k8s_service_account
        if lr.k8s_gpus_per_pod:
            pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        job = {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"completionMode": "Indexed", "completions": nnodes, "parallelism": nnodes,
                     "backoffLimit": lr.max_restarts, "ttlSecondsAfterFinished": 86400,
                     "template": {"metadata": {"labels": labels}, "spec": pod}},
        }
        return service, job

    def _apis(self):
        if self.batch_api is None or self.core_api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self.batch_api, self.core_api = client.BatchV1Api(), client.CoreV1Api()
        return self.batch_api, self.core_api

    def run(self, context, module, args, nnodes, nproc_per_node, env) -> None:
        service, job = self.manifests(module, args, nnodes, nproc_per_node, env)
        batch, core = self._apis()
        ns = self.launcher.k8s_namespace
        core.create_namespaced_service(ns, service)
        batch.create_namespaced_job(ns, job)
        context.log.info(f"Kubernetes Job {ns}/{self.name} created ({nnodes} pods x {nproc_per_node})")
        try:
            while True:
                status = batch.read_namespaced_job_status(self.name, ns).status
                if (status.succeeded or 0) >= nnodes:
                    break
                failed = [c for c in (status.conditions or []) if c.type == "Failed" and c.status == "True"]
                if failed:
                    raise dg.Failure(f"Kubernetes Job {ns}/{self.name} failed: {failed[0].reason} "
                                     f"{failed[0].message or ''} (kubectl -n {ns} logs job/{self.name})")
                time.sleep(self.launcher.poll_seconds)
        finally:
            body = {"propagationPolicy": "Background"}
            try:
                if (status := batch.read_namespaced_job_status(self.name, ns).status) and not status.succeeded:
                    batch.delete_namespaced_job(self.name, ns, body=body)  # cancelled or failed: stop the pods
            finally:
                core.delete_namespaced_service(self.name, ns)


def manifests_yaml(service: dict, job: dict) -> str:
    """The two manifests as one YAML stream (what `kubectl apply -f -` would take)."""
    import yaml

    return yaml.safe_dump_all([service, job], sort_keys=False)
