"""deploy/: every YAML parses and holds what an Ascend cluster needs (NPU resources, token auth, the encode CLI's
real flags), the launcher config passes Ray's own schema, and the environment files match docs/ascend.md.
The scripts are tested in test_deploy_scripts.py."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.encode.driver import parse_args as parse_encode_args

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
NPUS_PER_NODE = 8
ASCEND_RESOURCE = "huawei.com/Ascend910"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def the(kind: str) -> dict:
    (doc,) = [d for (k, _), d in kuberay_objects().items() if k == kind]
    return doc


def ray_start_args(command: str) -> list[str]:
    """The arguments after `ray start` in a shell command line."""
    words = shlex.split(command)
    index = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["ray", "start"])
    return words[index + 2:]


def parse_ray_start(args: list[str]) -> dict:
    """Ray's own `ray start` option parser: an unknown or malformed flag fails here as it would on the node."""
    from ray.scripts.scripts import start

    return start.make_context("ray start", list(args)).params


def kuberay_start_args(params: dict) -> list[str]:
    """rayStartParams as the operator renders them: `--key=value` inside a bash command line."""
    return shlex.split(" ".join(f"--{key}={value}" for key, value in params.items()))


def containers_of(cluster: dict):
    spec = cluster["spec"]
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    docs = documents(path)
    assert docs, f"{path} holds no document"
    if path.is_relative_to(KUBERAY):
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does before touching a node
    assert config["provider"]["type"] == "local"
    assert config["max_workers"] == len(config["provider"]["worker_ips"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_starts_every_node_with_npus_and_token_auth():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    for commands in (head, worker):
        (command,) = [c for c in commands if "ray start" in c]
        assert command.startswith("source ~/qwen3tts/deploy/node_env.sh &&"), "token auth and Ascend env first"
        params = parse_ray_start(ray_start_args(command.replace("$RAY_HEAD_IP", "10.0.0.1")))
        # Ray counts each node's NPUs itself: a hard-coded count hands out card ids a smaller node lacks.
        assert params["resources"] in (None, "{}") and params["num_gpus"] is None
    assert parse_ray_start(ray_start_args(head[-1]))["head"]
    assert not any(re.search(r"\bray stop\b", c) for c in head + worker), "ray stop kills other users' Ray"


def node_env(tmp_path, **extra) -> dict[str, str]:
    """The environment a node has after `source deploy/node_env.sh` (under `set -u`, as scripts use it)."""
    script = f"set -euo pipefail; source {DEPLOY / 'node_env.sh'}; env -0"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **extra})
    return dict(item.split("=", 1) for item in result.stdout.split("\0") if item)


def test_node_env_on_an_ascend_node(tmp_path):
    cann = tmp_path / "set_env.sh"  # stands in for CANN's set_env.sh, which leaves unset variables to `set -u`
    cann.write_text('export ASCEND_HOME_PATH=/usr/local/Ascend/ascend-toolkit/latest\n: "$LD_LIBRARY_PATH"\n')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = node_env(tmp_path, ASCEND_SET_ENV=str(cann), TASK_QUEUE_ENABLE="1", QWEN3TTS_VENV=str(venv))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["ASCEND_HOME_PATH"].startswith("/usr/local/Ascend")
    assert env["TASK_QUEUE_ENABLE"] == "1"  # what the operator exported wins, as in deploy/train.sh
    assert {k: env[k] for k in ascend_env() if k != "TASK_QUEUE_ENABLE"} == \
        {k: v for k, v in ascend_env().items() if k != "TASK_QUEUE_ENABLE"}
    assert "ASCEND_RT_VISIBLE_DEVICES" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(venv / "bin")  # the project's python and ray come first


def test_node_env_without_cann_sets_only_token_auth(tmp_path):
    env = node_env(tmp_path, QWEN3TTS_SYSROOT=str(tmp_path))  # a host without CANN or Ascend devices
    assert env["RAY_AUTH_MODE"] == "token"
    assert not set(ascend_env()) & set(env)


def ascend_env() -> dict[str, str]:
    lines = (DEPLOY / "ascend.env").read_text().splitlines()
    values, commented = {}, False
    for line in lines:
        if line.startswith("#"):
            commented = True
        elif line.strip():
            key, value = line.split("=", 1)
            assert commented, f"{key} has no comment saying what it does and why this value"
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and value and " " not in value, line
            values[key] = value
            commented = False
        else:
            commented = False  # a comment belongs to the assignment right below it
    return values


def test_ascend_env_names_the_variables_the_runtime_reads():
    env = ascend_env()
    assert {"HCCL_CONNECT_TIMEOUT", "PYTORCH_NPU_ALLOC_CONF", "TASK_QUEUE_ENABLE"} <= set(env)
    assert "CPU_AFFINITY_CONF" not in env  # processes bind by their physical card (shared/cpu_affinity.py)
    # Ray assigns cards per actor, torchrun per rank: a node-wide value here would hide cards from both.
    assert not {"ASCEND_RT_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"} & set(env)


def test_raycluster_has_a_head_and_npu_workers():
    cluster = the("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"]
    parse_ray_start(kuberay_start_args(head["rayStartParams"]))
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        params = parse_ray_start(kuberay_start_args(group["rayStartParams"]))
        assert params["resources"] in (None, "{}")  # Ray counts the /dev/davinci* the device plugin gives the pod
        (container,) = group["template"]["spec"]["containers"]
        for kind in ("requests", "limits"):
            assert container["resources"][kind][ASCEND_RESOURCE] == NPUS_PER_NODE
        assert container["envFrom"] == [{"configMapRef": {"name": "qwen3tts-ascend-env"}}]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for driver_path in ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi"):
            assert mounts[driver_path]["readOnly"] is True
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes[mounts["/usr/local/Ascend/driver"]["name"]]["hostPath"]["path"] == "/usr/local/Ascend/driver"


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity ("64Gi", "512Mi") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def test_object_store_fits_in_dev_shm_of_every_pod():
    """Ray falls back to /tmp (disk) when /dev/shm is smaller than its object store: every group sets a store
    that fits its memory-backed /dev/shm volume, with a quarter of it left for other shared-memory users."""
    spec = the("RayCluster")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        store = int(parse_ray_start(kuberay_start_args(group["rayStartParams"]))["object_store_memory"])
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        assert 0 < store <= 0.75 * quantity_bytes(volume["emptyDir"]["sizeLimit"])
        assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) < quantity_bytes(container["resources"]["limits"]["memory"])


def test_every_pod_shares_the_data_volume():
    cluster = the("RayCluster")
    claims = {name for (kind, name) in kuberay_objects() if kind == "PersistentVolumeClaim"}
    pod_specs = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + \
                [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pod_specs:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims
            assert "ReadWriteMany" in kuberay_objects()[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]


def test_every_ray_container_authenticates_with_the_token_secret():
    objects = kuberay_objects()
    cluster, job = the("RayCluster"), the("RayJob")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    submitters = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for container in [*containers_of(cluster), *submitters]:
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secret = objects[("Secret", ref["name"])]
        assert ref["key"] in secret["stringData"]
        assert ref["name"] == cluster["spec"]["authOptions"]["secretName"]
        assert "ASCEND_RT_VISIBLE_DEVICES" not in env  # Ray sets it per encoder actor


def test_committed_secrets_hold_no_token():
    for (kind, name), doc in kuberay_objects().items():
        if kind == "Secret":
            assert set(doc["stringData"].values()) == {""}, f"{name}: a token is committed"
            assert "data" not in doc


def test_auth_is_never_switched_off_in_deploy():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        for value in re.findall(r"RAY_AUTH_MODE(?::-|\s*[=:]\s*)[\"']?(\w+)", text):
            assert value == "token", f"{path.relative_to(REPO)} sets RAY_AUTH_MODE={value}"
        for doc in documents(path) if path.suffix == ".yaml" else []:
            for name, value in yaml_env_values(doc):
                assert name != "RAY_AUTH_MODE" or value == "token", path


def yaml_env_values(node):
    """Every (name, value) env entry anywhere in a Kubernetes object."""
    if isinstance(node, dict):
        if "name" in node and "value" in node and len(node) == 2:
            yield node["name"], node["value"]
        for child in node.values():
            yield from yaml_env_values(child)
    elif isinstance(node, list):
        for child in node:
            yield from yaml_env_values(child)


def test_rayjob_runs_the_encode_cli_with_flags_it_accepts():
    job, cluster = the("RayJob"), the("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "services.encode"]
    args = parse_encode_args(words[3:])  # argparse exits on any flag the CLI does not have
    assert (str(args.manifest), str(args.codec), str(args.output)) == \
        ("/data/train_raw.jsonl", "/models/Qwen3-TTS-Tokenizer-12Hz", "/data/shards")
    assert args.status_host == "0.0.0.0" and args.status_token_file == "/etc/status-token/token"

    # The token file is the status Secret's key, mounted on the head, where Ray runs the job's driver.
    head_pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (head,) = head_pod["containers"]
    mount = next(m for m in head["volumeMounts"] if args.status_token_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head_pod["volumes"] if v["name"] == mount["name"])
    secret = kuberay_objects()[("Secret", volume["secret"]["secretName"])]
    assert Path(args.status_token_file).name in secret["stringData"]

    # The Service reaches the head pod on the port the driver serves.
    service = the("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    (port,) = service["spec"]["ports"]
    (served,) = [p for p in head["ports"] if p["name"] == port["targetPort"]]
    assert served["containerPort"] == args.status_port


def test_podmonitor_scrapes_the_drivers_metrics_with_the_status_token():
    monitor, cluster, job = the("PodMonitor"), the("RayCluster"), the("RayJob")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                                          "ray.io/node-type": "head"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (served,) = [p for p in head["ports"] if p["name"] == endpoint["port"]]
    assert served["containerPort"] == parse_encode_args(shlex.split(job["spec"]["entrypoint"])[3:]).status_port
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["key"] in kuberay_objects()[("Secret", credentials["name"])]["stringData"]
    # the Secret the driver reads its token from (mounted at --status-token-file)
    volumes = cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert credentials["name"] in {v["secret"]["secretName"] for v in volumes if "secret" in v}


# ------------------------------------------------------------------------------------------------- scripts


def test_training_doc_states_the_ascend_values_deploy_sets():
    """docs/ascend.md documents the Ascend variables; those that deploy/ascend.env sets must match it."""
    documented = {}
    for line in (REPO / "docs" / "ascend.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
            values = [v.strip().strip("`") for v in cells[1].split(",")] if len(names) > 1 else [cells[1].strip("`")]
            documented.update(zip(names, values))
    env = ascend_env()
    shared = set(env) & set(documented)
    assert shared == set(env), f"not documented in docs/ascend.md: {sorted(set(env) - shared)}"
    assert {k: documented[k] for k in shared} == env
