"""The deployment files in infra/, checked offline: no cluster, no Docker daemon."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from k8s_schema import roundtrip_equal

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
JOB = K8S / "prior-torchrun-job.yaml"
SBATCH = INFRA / "slurm" / "train-prior.sbatch"
KUBECTL = "/usr/bin/kubectl"

EXPECTED_KINDS = {
    "dalle-settings.yaml": {("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim")},
    "mlflow.yaml": {("apps/v1", "Deployment"), ("v1", "Service")},
    "prior-torchrun-job.yaml": {("batch/v1", "Job"), ("v1", "Service")},
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|STORE_URI", re.I)
CREDENTIAL_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")  # scheme://user:password@host


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(path)}


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def pod_specs(doc: dict) -> list[dict]:
    return [doc["spec"]["template"]["spec"]] if doc["kind"] in ("Deployment", "Job") else []


def torchrun_flags(job: dict) -> dict[str, str]:
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


# --- every YAML ----------------------------------------------------------------------------


def test_every_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {
        "dagster.yaml", "helm/dagster-values.yaml", *(f"k8s/{n}" for n in EXPECTED_KINDS)}
    for f in files:
        assert docs(f), f"{f} is empty"


# --- Kubernetes manifests ------------------------------------------------------------------


def test_manifest_kinds_and_api_versions():
    assert {f.name for f in K8S.glob("*.yaml")} == set(EXPECTED_KINDS)
    for name, kinds in EXPECTED_KINDS.items():
        found = docs(K8S / name)
        assert {(d["apiVersion"], d["kind"]) for d in found} == kinds, name
        for d in found:
            assert d["metadata"]["name"], name


def test_manifests_match_the_kubernetes_object_schemas():
    pytest.importorskip("kubernetes", reason="the kubernetes client comes with dagster-k8s")
    for f in K8S.glob("*.yaml"):
        for d in docs(f):
            assert roundtrip_equal(d), f"{f.name}: {d['kind']} has a field the Kubernetes schema does not know"
    job = by_kind(JOB)["Job"]
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")  # the check catches a typo
    assert not roundtrip_equal(job)


def test_containers_have_image_and_command():
    for f in K8S.glob("*.yaml"):
        for d in docs(f):
            for spec in pod_specs(d):
                for c in spec["containers"] + spec.get("initContainers", []):
                    assert c.get("image") and ":" in c["image"], f"{f.name}/{c['name']}: image with a tag"
                    assert c.get("command"), f"{f.name}/{c['name']}: explicit command"


def test_no_secret_inline():
    for f in list(K8S.glob("*.yaml")) + [INFRA / "helm" / "dagster-values.yaml", INFRA / "dagster.yaml"]:
        for d in docs(f):
            for node in walk(d):
                if isinstance(node, str):
                    assert not CREDENTIAL_URL.search(node), f"{f.name}: credentials in a URL"
                if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
                    if SECRET_NAME.search(node["name"]):  # an env var holding a secret
                        assert "secretKeyRef" in node.get("valueFrom", {}), f"{f.name}: {node['name']} inline"
            if d.get("kind") == "ConfigMap":
                assert not [k for k in d["data"] if SECRET_NAME.search(k)], "secrets belong in a Secret"
            assert d.get("kind") != "Secret", f"{f.name}: Secrets are created out of band, not committed"


def test_mlflow_server_uses_postgres_and_s3_from_the_environment():
    dep = by_kind(K8S / "mlflow.yaml")
    c = dep["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert c["command"][:2] == ["mlflow", "server"]
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "dalle-secrets"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    svc = dep["Service"]
    assert svc["spec"]["selector"].items() <= dep["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    settings = by_kind(K8S / "dalle-settings.yaml")["ConfigMap"]["data"]
    assert settings["MLFLOW_TRACKING_URI"] == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def test_prior_job_is_an_indexed_torchrun_with_a_headless_rendezvous():
    objs = by_kind(JOB)
    job, svc = objs["Job"], objs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    flags = torchrun_flags(job)
    nodes = int(flags["nnodes"])
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == nodes == int(flags["nodes"]) > 1
    # headless, selects this Job's pods, and is the pods' subdomain (stable DNS names)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == svc["metadata"]["name"]
    host, port = flags["rdzv-endpoint"].split(":")
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"  # the pod of index 0
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert flags["rdzv-backend"] == "c10d" and pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["command"] == ["torchrun"] and "orchestration.prior_entry" in c["args"]
    gpus = int(flags["nproc-per-node"])
    assert gpus == int(flags["gpus-per-node"]) == int(c["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert int(flags["powersgd-rank"]) == 112
    env = {e["name"] for e in c["env"]}
    assert {"NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= env
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/data", "/dev/shm"} <= mounts and flags["codes"].startswith("/data/") and flags["out"].startswith("/data/")


def test_prior_job_flags_are_accepted_by_the_training_parser():
    from dalle_core.prior.train import build_arg_parser

    args = by_kind(JOB)["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    train_args = args[args.index("orchestration.prior_entry") + 1:]
    ns = build_arg_parser().parse_args(train_args)
    assert (ns.profile, ns.nodes, ns.gpus_per_node, ns.powersgd_rank) == (None, 16, 8, 112)
    assert ns.profile_json == "/data/prior-runs/paper-12B/profile.json"


def test_prior_job_resolves_the_profile_against_the_codes_before_training():
    """One launch path: an init container writes the resolved profile (`dalle resolve-profile`,
    dalle_core.profiles.write_resolved_profile) that the trainer reads as --profile-json."""
    from orchestration.cli import build_parser

    pod = by_kind(JOB)["Job"]["spec"]["template"]["spec"]
    init = {c["name"]: c for c in pod["initContainers"]}["resolve-profile"]
    assert init["command"][:3] == ["python", "-m", "orchestration.cli"]
    assert init["image"] == pod["containers"][0]["image"]
    ns = build_parser().parse_args(init["command"][3:] + init["args"])
    flags = torchrun_flags(by_kind(JOB)["Job"])
    assert ns.func.__name__ == "cmd_resolve_profile" and ns.profile == "paper-12B"
    assert ns.out == flags["profile-json"] and ns.codes == flags["codes"]
    assert ns.out.startswith(flags["out"] + "/") and "/data" in {m["mountPath"] for m in init["volumeMounts"]}


@pytest.fixture(scope="module")
def kubectl():
    if not os.access(KUBECTL, os.X_OK):
        pytest.skip(f"{KUBECTL} not installed")
    return KUBECTL


def test_kubectl_reads_the_manifests_offline(kubectl):
    # `label --local` decodes every object the way `apply` would, without an API server
    out = subprocess.run([kubectl, "label", "--local", "-f", str(K8S), "checked=yes", "-o", "json"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    items, pos, decoder = [], 0, json.JSONDecoder()
    while out[pos:].strip():  # one JSON object after another
        obj, pos = decoder.raw_decode(out, out.index("{", pos))
        items.append(obj)
    assert {(i["apiVersion"], i["kind"]) for i in items} == set().union(*EXPECTED_KINDS.values())


def test_kubectl_create_dry_run(kubectl):
    r = subprocess.run([kubectl, "create", "--dry-run=client", "--validate=false", "-f", str(JOB), "-o", "yaml"],
                       capture_output=True, text=True, timeout=20,
                       env={**os.environ, "KUBECONFIG": "/dev/null"})
    if r.returncode != 0 and re.search(r"unable to recognize|connection refused|server", r.stderr):
        pytest.skip("kubectl create --dry-run=client needs an API server for its resource discovery")
    assert r.returncode == 0, r.stderr
    assert "kind: Job" in r.stdout


# --- Dagster instance and Helm values ------------------------------------------------------

PG_ENV = {"DAGSTER_PG_HOST": "pg", "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_USER": "dagster",
          "DAGSTER_PG_PASSWORD": "not-a-real-password", "DAGSTER_K8S_NAMESPACE": "dalle", "DALLE_LOG_BUCKET": "logs"}


@pytest.fixture
def instance_dir(tmp_path, monkeypatch):
    for k, v in PG_ENV.items():
        monkeypatch.setenv(k, v)
    shutil.copy(INFRA / "dagster.yaml", tmp_path / "dagster.yaml")
    return tmp_path


def test_dagster_yaml_matches_the_instance_schema(instance_dir):
    from dagster._core.instance.config import dagster_instance_config

    config, custom_class = dagster_instance_config(str(instance_dir))  # raises on a schema error
    assert custom_class is None
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}


def test_dagster_yaml_names_postgres_storage_and_the_k8s_launcher(instance_dir, monkeypatch):
    from dagster._config import process_config, resolve_to_config_type
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes.config_class import class_from_code_pointer

    for lib in ("dagster_postgres", "dagster_k8s", "dagster_aws"):
        pytest.importorskip(lib, reason="pip install dagster-postgres dagster-k8s dagster-aws (extra 'deploy')")
    ref = InstanceRef.from_dir(str(instance_dir))
    names = {k: (getattr(ref, k).module_name, getattr(ref, k).class_name) for k in (
        "run_storage_data", "event_storage_data", "schedule_storage_data", "run_launcher_data",
        "run_coordinator_data", "compute_logs_data")}
    assert names == {
        "run_storage_data": ("dagster_postgres", "PostgresRunStorage"),
        "event_storage_data": ("dagster_postgres", "PostgresEventLogStorage"),
        "schedule_storage_data": ("dagster_postgres", "PostgresScheduleStorage"),
        "run_launcher_data": ("dagster_k8s", "K8sRunLauncher"),
        "run_coordinator_data": ("dagster._core.run_coordinator", "QueuedRunCoordinator"),
        "compute_logs_data": ("dagster_aws.s3.compute_log_manager", "S3ComputeLogManager"),
    }

    def process(data):
        cls = class_from_code_pointer(data.module_name, data.class_name)
        return process_config(resolve_to_config_type(cls.config_type()), yaml.safe_load(data.config_yaml))

    # each class accepts its part of the file (the launcher's required fields included)
    for k in ("run_storage_data", "run_launcher_data", "run_coordinator_data", "compute_logs_data"):
        result = process(getattr(ref, k))
        assert result.success, (k, [e.message for e in result.errors])
    assert process(ref.run_storage_data).value["postgres_db"]["password"] == PG_ENV["DAGSTER_PG_PASSWORD"]
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")  # the password exists only in the environment
    result = process(ref.run_storage_data)
    assert not result.success and "DAGSTER_PG_PASSWORD" in str([e.message for e in result.errors])


def test_helm_values_match_the_instance():
    values = yaml.safe_load((INFRA / "helm" / "dagster-values.yaml").read_text())
    instance = yaml.safe_load((INFRA / "dagster.yaml").read_text())
    assert values["postgresql"]["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert values["postgresql"]["postgresqlPassword"] == ""
    assert values["runLauncher"]["type"] == instance["run_launcher"]["class"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    inst_launcher = instance["run_launcher"]["config"]
    assert [c["name"] for c in launcher["envConfigMaps"]] == inst_launcher["env_config_maps"]
    assert [s["name"] for s in launcher["envSecrets"]] == inst_launcher["env_secrets"]
    assert values["global"]["postgresqlSecretName"] == inst_launcher["postgres_password_secret"]
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    coord = instance["run_coordinator"]["config"]
    assert queued["maxConcurrentRuns"] == coord["max_concurrent_runs"]
    assert queued["tagConcurrencyLimits"] == coord["tag_concurrency_limits"]
    assert values["computeLogManager"]["type"] == instance["compute_logs"]["class"]
    # webserver, daemon and user code run the same image; the gRPC server loads our Definitions
    user = values["dagster-user-deployments"]["deployments"][0]
    images = {(v["image"]["repository"], v["image"]["tag"])
              for v in (user, values["dagsterWebserver"], values["dagsterDaemon"])}
    assert len(images) == 1 and values["dagster-user-deployments"]["enabled"] is True
    assert user["dagsterApiGrpcArgs"] == ["-m", "orchestration.definitions"]
    assert (ROOT / "orchestration" / "definitions.py").is_file()
    assert "module_name: orchestration.definitions" in (ROOT / "workspace.yaml").read_text()


# --- SLURM ---------------------------------------------------------------------------------


def test_sbatch_syntax_and_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=10)
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash\n")
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["ntasks-per-node"] == "1"
    assert directives["gpus-per-node"] == "8" and int(directives["nodes"]) == 16
    assert "job-name" in directives and "requeue" in directives
    # directives count only before the first command
    first_command = next(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
    assert all(i < first_command for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH"))


def _run_sbatch(tmp_path: Path, *args: str) -> list[str]:
    """Run the batch script with stand-ins for srun, scontrol and python; returns srun's argv
    (python's, the profile resolution, is left in tmp_path / "python.argv")."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir(exist_ok=True)
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text("")
    argv_file = tmp_path / "srun.argv"
    (bin_dir / "srun").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {argv_file}\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path / "python.argv"}\n')
    for stub in ("srun", "scontrol", "python"):
        (bin_dir / stub).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DALLE_VENV": str(venv), "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "8"}
    subprocess.run(["bash", str(SBATCH), *args], env=env, check=True, timeout=20, capture_output=True)
    return argv_file.read_text().splitlines()


def test_sbatch_launches_one_torchrun_per_node(tmp_path):
    argv = _run_sbatch(tmp_path)
    assert argv[:3] == ["--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    run = argv[argv.index("torchrun"):]
    assert {"--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
            "--rdzv-endpoint=gpu-a01:29500", "--rdzv-id=dalle-prior-42"} <= set(run)
    train = run[run.index("orchestration.prior_entry") + 1:]
    # one launch path: the profile resolved against the codes (`dalle resolve-profile`) before srun
    resolve = (tmp_path / "python.argv").read_text().splitlines()
    assert resolve[:3] == ["-m", "orchestration.cli", "resolve-profile"]
    opts = dict(zip(resolve[3::2], resolve[4::2]))
    assert opts["--profile"] == "paper-12B" and opts["--codes"] == train[train.index("--codes") + 1]
    assert shlex.join(train).startswith("--profile-json ") and train[1] == opts["--out"]
    assert opts["--out"] == train[train.index("--out") + 1] + "/profile.json"
    assert train[train.index("--powersgd-rank") + 1] == "112"
    assert train[train.index("--nodes") + 1] == "2" and train[train.index("--gpus-per-node") + 1] == "8"

    train = _run_sbatch(tmp_path, "--powersgd-rank", "4", "--profile", "paper-1.3B", "--", "--steps", "10")
    assert train[train.index("--powersgd-rank") + 1] == "4" and train[-2:] == ["--steps", "10"]
    resolve = (tmp_path / "python.argv").read_text().splitlines()
    assert resolve[resolve.index("--profile") + 1] == "paper-1.3B" and "--profile" not in train
    assert "--powersgd-rank" not in _run_sbatch(tmp_path, "--powersgd-rank", "0")


# --- Docker --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def test_dockerfile_order_user_and_entrypoint():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert set(words) <= {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD"}
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = [(i, a) for i, (w, a) in enumerate(ins) if w == "RUN"]
    torch_i = next(i for i, a in runs if "pip install" in a and "TORCH_INDEX" in a and "TORCH_SPEC" in a)
    project_i = next(i for i, a in runs if re.search(r"pip install .*\"\.(\[[\w,]+\])?\"", a))
    assert torch_i < project_i  # torch first: the project's loose torch pin then keeps that build
    assert "TORCH_SPEC" in ins[project_i][1]
    assert {"TORCH_SPEC", "TORCH_INDEX"} <= {a.split("=")[0] for w, a in ins if w == "ARG"}
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0") and words.index("USER") > project_i
    entry = json.loads(dict(ins)["ENTRYPOINT"])  # exec form
    assert entry[-1] == "dalle-entrypoint" and words[-2:] == ["ENTRYPOINT", "CMD"]
    for w, a in ins:  # every COPY source exists in the build context (the repository)
        if w == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_image_extras_exist():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    deploy = " ".join(extras.get("deploy", []))
    for lib in ("dagster-postgres", "dagster-k8s", "dagster-aws"):  # what infra/dagster.yaml loads
        assert lib in deploy, f"pyproject.toml: extra 'deploy' needs {lib} (the image installs .[deploy])"


def test_entrypoint_runs_dalle_or_a_given_program(tmp_path):
    script = INFRA / "docker-entrypoint.sh"
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)
    for prog in ("dalle", "dagster"):
        (tmp_path / prog).write_text(f'#!/bin/sh\necho {prog} "$@"\n')
        (tmp_path / prog).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}

    def run(*args):
        return subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    assert run("plan", "--nodes", "16") == "dalle plan --nodes 16"
    assert run("dalle", "profiles") == "dalle profiles"
    assert run("dagster", "api", "grpc", "-p", "3030") == "dagster api grpc -p 3030"
    assert run() == "dalle"


# --- README --------------------------------------------------------------------------------


def test_readme_numbers_are_the_plan():
    from dalle_core.distributed.plan import plan
    from dalle_core.profiles import get_profile

    table = plan(get_profile("paper-12B").prior, 16, 8, 8, powersgd_rank=112).to_table()
    readme = (INFRA / "README.md").read_text()
    for number in ("12,293,828,224", "1,536,728,528", "17.17 GiB", "39.53 GiB", "5.37 GiB", "916.61 MiB", "83.3%"):
        assert number in table and number in readme, number
