"""The deploy files agree with the project and with each other.

There is no container engine or cluster here, so nothing is built or applied: these tests
parse every file and check what can be checked without one. Paths the Dockerfile copies
exist; every ``slimrank`` command line (including the one in retrain.sh, with each
deployment's environment filled in) parses with the real CLI parser; ports, image tags,
mounts and label selectors agree across files; and the health probes name services the server
registers. The image's health-check script runs against a real server, and retrain.sh runs
with the real ``slimrank`` on its no-logs and failure paths.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from slimrank.cli import build_parser
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import HEALTH_SERVICES, create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

GRPC_PORT = 50051
METRICS_PORT = 9100
PROMETHEUS_PORT = 9090  # Prometheus's own default listen port
UID = 10001
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"slimrank:{VERSION}"  # the server
RETRAIN_IMAGE = f"slimrank-retrain:{VERSION}"  # the Dockerfile's retrain target
RETRAIN_TARGET = "retrain"
RETRAIN_SCRIPT = "/opt/slimrank/retrain.sh"  # where the image has deploy/retrain.sh
# What deploy/make_secrets.sh writes under deploy/secrets/.
MADE_SECRETS = ("tls", "admin", "grafana-admin-password")


# Parsing helpers


def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's (INSTRUCTION, arguments) with continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Return each named stage's instructions, those of the stage it starts FROM first."""
    out: dict[str, list[tuple[str, str]]] = {}
    name = None
    for keyword, rest in dockerfile():
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            assert name, f"FROM {rest}: every stage is named"
            out[name] = [*out.get(image, []), (keyword, rest)]
        elif name is not None:  # not the global ARGs before the first FROM
            out[name].append((keyword, rest))
    return out


def final_stage() -> list[tuple[str, str]]:
    """The default build target, the server image: the last stage."""
    return list(stages().values())[-1]


def pip_installs(stage: str) -> list[str]:
    """Return what the stage (with the stages it starts from) ``pip install``s, in order."""
    runs = " && ".join(rest for k, rest in stages()[stage] if k == "RUN")
    return [shlex.split(m)[0] for m in re.findall(r"pip install (\S+)", runs)]


def venv_stage(stage: str) -> str:
    """Return the stage whose /opt/slimrank virtualenv ``stage`` copies."""
    (source,) = [
        rest.split()[0].removeprefix("--from=")
        for k, rest in stages()[stage]
        if k == "COPY" and rest.startswith("--from=") and rest.split()[1] == "/opt/slimrank"
    ]
    return source


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    (args,) = [rest for k, rest in instructions if k == keyword]
    return json.loads(args)


def healthcheck_command() -> list[str]:
    (rest,) = [rest for k, rest in final_stage() if k == "HEALTHCHECK"]
    return json.loads(rest.split("CMD", 1)[1])


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def k8s(kind: str, name: str | None = None) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind]
    if name is not None:
        found = [o for o in found if o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


FRONT_COMPONENT = K8S / "front"


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """``doc`` with RFC 6902 ``add`` and ``replace`` operations applied (what the front
    component uses); a path that does not exist in ``doc`` fails, as kustomize would."""
    import copy

    out = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        node = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if last == "-" and op["op"] == "add":
                node.append(op["value"])
            else:
                index = int(last)
                assert index < len(node), op["path"]
                if op["op"] == "add":
                    node.insert(index, op["value"])
                else:
                    node[index] = op["value"]
        else:
            assert op["op"] == "add" or last in node, op["path"]
            node[last] = op["value"]
    return out


def with_front() -> list[dict]:
    """The k8s objects as ``components: [front]`` in kustomization.yaml makes them."""
    component = yaml.safe_load((FRONT_COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    objects = k8s_objects()
    for patch in component["patches"]:
        ops = yaml.safe_load((FRONT_COMPONENT / patch["path"]).read_text())
        target = patch["target"]
        matches = [
            i
            for i, o in enumerate(objects)
            if (o["kind"], o["metadata"]["name"]) == (target["kind"], target["name"])
        ]
        assert len(matches) == 1, target
        objects[matches[0]] = json_patch(objects[matches[0]], ops)
    return objects


def front_container() -> dict:
    """The front component's container in the patched Deployment."""
    (deployment,) = [o for o in with_front() if o["kind"] == "Deployment"]
    (front,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == "front"]
    return front


def retrain_environments() -> dict[str, dict[str, str]]:
    """The environment retrain.sh gets in compose and in Kubernetes."""
    services = compose()["services"]
    return {
        "compose": {k: str(v) for k, v in services["retrain"]["environment"].items()},
        "k8s": dict(k8s("ConfigMap", "slimrank-config")["data"]),
    }


def retrain_script_command(env: dict[str, str]) -> list[str]:
    """The ``slimrank`` argv in retrain.sh, its variables filled in as the script would."""
    text = (DEPLOY / "retrain.sh").read_text()
    (line,) = [ln.strip() for ln in text.splitlines() if re.search(r"\bslimrank retrain\b", ln)]
    command = re.search(r"slimrank (retrain[^;]*)", line).group(1)
    values = {
        "bundles": env["SLIMRANK_BUNDLES"],
        "teacher": "v0001",  # read from CURRENT at run time
        "claimed": f"{env['RETRAIN_DONE']}/20260101T000000Z-{Path(env['RETRAIN_LOGS']).name}",
    }
    argv = shlex.split(command)
    return [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], a) for a in argv]


def slimrank_commands() -> dict[str, list[str]]:
    """Every slimrank command line the deploy files run, as argv after ``slimrank``."""
    docker = final_stage()
    assert exec_form(docker, "ENTRYPOINT") == ["slimrank"]
    commands = {"Dockerfile CMD": exec_form(docker, "CMD")}
    services = compose()["services"]
    commands["compose slimrank"] = [str(a) for a in services["slimrank"]["command"]]
    commands["compose front"] = [str(a) for a in services["front"]["command"]]
    (container,) = pod_spec(k8s("Deployment"))["containers"]
    assert "command" not in container, "the server must keep the image's entrypoint"
    commands["k8s Deployment slimrank"] = container["args"]
    commands["k8s front component"] = [str(a) for a in front_container()["args"]]
    for where, env in retrain_environments().items():
        commands[f"retrain.sh in {where}"] = retrain_script_command(env)
    return commands


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def registered_subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


# Every file parses


def test_every_deploy_file_parses():
    yamls = [p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")]
    jsons = list(DEPLOY.rglob("*.json"))
    assert len(yamls) >= 15 and jsons
    for path in yamls:
        assert list(yaml.safe_load_all(path.read_text())), path
    for path in jsons:
        json.loads(path.read_text())


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["images"] == [
        {"name": image.split(":")[0], "newTag": VERSION} for image in (IMAGE, RETRAIN_IMAGE)
    ]


def test_k8s_objects_have_known_kinds_and_names():
    kinds = {(o["apiVersion"], o["kind"]) for o in k8s_objects()}
    assert kinds == {
        ("v1", "ConfigMap"),
        ("v1", "PersistentVolumeClaim"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
        ("batch/v1", "CronJob"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
    }
    names = [(o["kind"], o["metadata"]["name"]) for o in k8s_objects()]
    assert len(names) == len(set(names))
    for obj in k8s_objects():
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "slimrank"


# Dockerfile


def test_dockerfile_copies_only_paths_that_exist():
    copies = [rest.split() for k, rest in dockerfile() if k == "COPY"]
    sources = [
        p
        for args in copies
        if not any(a.startswith("--from") for a in args)
        for p in args[:-1]
        if not p.startswith("--")
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    # The build needs pyproject.toml's readme to exist in the context too.
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in sources


def test_dockerfile_is_multi_stage_and_runs_as_non_root():
    assert len(stages()) >= 2
    copied_from = [rest for k, rest in final_stage() if k == "COPY" and rest.startswith("--from")]
    assert copied_from, "the runtime stage should copy the build stage's result"
    for stage in (final_stage(), stages()[RETRAIN_TARGET]):
        (user,) = [rest for k, rest in stage if k == "USER"]
        assert user.split(":")[0] == str(UID)
        assert f"--uid {UID}" in " ".join(rest for k, rest in stage if k == "RUN")


def test_the_server_image_has_the_slim_install_and_the_retrain_image_the_train_extra():
    server = venv_stage(list(stages())[-1])
    assert pip_installs(server) == ["."], "the server image installs no extra (no torch)"
    assert not [rest for k, rest in stages()[server] if "download.pytorch.org" in rest]
    retrain = venv_stage(RETRAIN_TARGET)
    assert pip_installs(retrain)[-1] == ".[train]"
    # torch==2.13.0 from PyPI pulls CUDA: the train build takes the CPU wheel index.
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in " ".join(
        rest for k, rest in stages()[retrain] if k == "ENV"
    )
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "train" in extras["optional-dependencies"]


def test_dockerfile_exposes_and_health_checks_the_grpc_port():
    (expose,) = [rest for k, rest in final_stage() if k == "EXPOSE"]
    assert {int(p) for p in expose.split()} == {GRPC_PORT, METRICS_PORT}
    probe = healthcheck_command()
    assert probe[:2] == ["python", "/opt/slimrank/healthcheck.py"]
    assert flag(probe, "--target") == f"127.0.0.1:{GRPC_PORT}"
    assert flag(probe, "--service") in HEALTH_SERVICES
    # The script the HEALTHCHECK runs is the one copied to that path.
    copies = [rest.split() for k, rest in final_stage() if k == "COPY"]
    assert ["deploy/healthcheck.py", "/opt/slimrank/healthcheck.py"] in copies


# The health-check script against a real server


def run_probe(*args: str) -> subprocess.CompletedProcess:
    script = DEPLOY / "healthcheck.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=30
    )


def test_healthcheck_script_follows_the_servers_health():
    holder = SnapshotHolder(random_snapshot("v1", n_items=50, n_users=10, dim=8))
    server, port = create_server(ServerConfig(), holder, CollectorRegistry())
    target = f"127.0.0.1:{port}"
    try:
        before = run_probe("--target", target, "--service", "slimrank.v1.Recommender")
        assert before.returncode == 1 and "NOT_SERVING" in before.stdout
        server.mark_serving()
        for service in HEALTH_SERVICES:
            ok = run_probe("--target", target, "--service", service)
            assert ok.returncode == 0 and "SERVING" in ok.stdout, (service, ok.stdout)
        unknown = run_probe("--target", target, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
    finally:
        server.shutdown(0).wait(5)
    gone = run_probe("--target", target, "--timeout", "0.5")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stdout


# slimrank command lines


@pytest.mark.parametrize("where", sorted(slimrank_commands()))
def test_slimrank_command_lines_parse(where):
    argv = slimrank_commands()[where]
    assert argv[0] in registered_subcommands(), f"{where}: no subcommand {argv[0]!r}"
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `slimrank {shlex.join(argv)}` does not parse ({exit_})")


def test_server_command_lines_agree():
    serve = {w: a for w, a in slimrank_commands().items() if a[0] == "serve"}
    assert set(serve) == {"Dockerfile CMD", "compose slimrank", "k8s Deployment slimrank"}
    for where, argv in serve.items():
        assert flag(argv, "--port") == str(GRPC_PORT), where
        assert flag(argv, "--metrics-port") == str(METRICS_PORT), where
        # Inside a container the server must listen beyond loopback to be reachable.
        assert flag(argv, "--host") == "0.0.0.0", where
        assert flag(argv, "--metrics-host") == "0.0.0.0", where
        assert flag(argv, "--bundles") == "/bundles", where
    assert len({shlex.join(a) for a in serve.values()}) == 1


def test_retrain_runs_the_script_with_one_environment():
    services = compose()["services"]
    (loop,) = services["retrain"]["command"]
    assert RETRAIN_SCRIPT in loop
    (job,) = pod_spec(k8s("CronJob"))["containers"]
    assert job["command"] == [RETRAIN_SCRIPT] and "args" not in job
    copies = [rest.split() for k, rest in stages()[RETRAIN_TARGET] if k == "COPY"]
    assert ["--chmod=0755", "deploy/retrain.sh", RETRAIN_SCRIPT] in copies
    envs = retrain_environments()
    keys = ("SLIMRANK_BUNDLES", "RETRAIN_LOGS", "RETRAIN_DONE")
    assert {k: envs["compose"][k] for k in keys} == {k: envs["k8s"][k] for k in keys}
    # Every variable the script requires is set.
    required = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / "retrain.sh").read_text()))
    assert required == set(keys)


def _run_retrain(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # the real slimrank first
    return subprocess.run(
        ["sh", str(DEPLOY / "retrain.sh")],
        env={"PATH": path, "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_retrain_script_without_new_logs_does_nothing(tmp_path):
    env = {
        "SLIMRANK_BUNDLES": str(tmp_path / "bundles"),
        "RETRAIN_LOGS": str(tmp_path / "logs" / "new.parquet"),
        "RETRAIN_DONE": str(tmp_path / "logs" / "done"),
    }
    result = _run_retrain(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert not (tmp_path / "logs").exists()
    missing = _run_retrain(tmp_path, {k: v for k, v in env.items() if k != "RETRAIN_DONE"})
    assert missing.returncode != 0 and "RETRAIN_DONE" in missing.stderr


def test_retrain_script_keeps_the_logs_of_a_failed_run(tmp_path):
    """The real ``slimrank retrain`` fails (CURRENT names no published version)."""
    bundles, logs = tmp_path / "bundles", tmp_path / "logs"
    bundles.mkdir()
    logs.mkdir()
    (bundles / "CURRENT").write_text("v0001\n")
    (logs / "new.csv").write_text("user_id,item_id\nu1,i1\n")
    env = {
        "SLIMRANK_BUNDLES": str(bundles),
        "RETRAIN_LOGS": str(logs / "new.csv"),
        "RETRAIN_DONE": str(logs / "done"),
    }
    result = _run_retrain(tmp_path, env)
    assert result.returncode == 1
    assert "no published version 'v0001'" in result.stderr  # from slimrank itself
    assert not (logs / "new.csv").exists()
    (kept,) = (logs / "done").iterdir()
    assert kept.name.endswith("-new.csv.failed")
    assert kept.read_text() == "user_id,item_id\nu1,i1\n"
    assert (bundles / "CURRENT").read_text() == "v0001\n"


# compose


def test_compose_services_images_and_mounts():
    services = compose()["services"]
    assert set(services) == {"slimrank", "front", "retrain", "prometheus", "grafana"}
    assert services["slimrank"]["image"] == IMAGE
    assert services["front"]["image"] == IMAGE
    assert services["retrain"]["image"] == RETRAIN_IMAGE
    for name in ("slimrank", "retrain"):
        build = services[name]["build"]
        path = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
        assert path == DEPLOY / "Dockerfile", name
    assert "target" not in services["slimrank"]["build"]  # the default: the server
    assert services["retrain"]["build"]["target"] == RETRAIN_TARGET in stages()
    assert f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}" in services["slimrank"]["ports"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./secrets/"):  # made by deploy/make_secrets.sh, not committed
                assert source.removeprefix("./secrets/") in MADE_SECRETS, (name, source)
            elif source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose()["volumes"], f"{name}: volume {source} not declared"


def test_compose_front_reaches_the_server_over_loopback_with_mutual_tls():
    """The optional front runs in the server's network namespace, forwards to its gRPC port
    with the frontend certificate, serves mutual TLS on a port the server service publishes
    on loopback, and only under its profile."""
    services = compose()["services"]
    front = services["front"]
    argv = slimrank_commands()["compose front"]
    assert front["profiles"] == ["front"]
    assert front["network_mode"] == "service:slimrank"
    assert "ports" not in front  # published by the service whose namespace it shares
    assert flag(argv, "--upstream") == f"127.0.0.1:{GRPC_PORT}"
    port = flag(argv, "--port")
    assert f"127.0.0.1:{port}:{port}" in services["slimrank"]["ports"]
    assert flag(argv, "--metrics-port") in services["slimrank"]["expose"]
    secrets = "/etc/slimrank/tls/"
    for name in ("--tls-cert", "--tls-key", "--tls-client-ca", "--upstream-tls-ca"):
        assert flag(argv, name).startswith(secrets), name
    assert flag(argv, "--upstream-tls-cert") == secrets + "client.crt"
    assert flag(argv, "--upstream-tls-key") == secrets + "client.key"
    assert f"./secrets/tls:{secrets.rstrip('/')}:ro" in front["volumes"]
    # make_secrets.sh's server certificate carries the name the front checks.
    assert "DNS:" + flag(argv, "--upstream-tls-name") in (DEPLOY / "make_secrets.sh").read_text()


def test_the_server_image_has_both_proxies_of_the_front():
    installs = " ".join(rest for k, rest in final_stage() if k == "RUN")
    assert "apt-get install" in installs
    assert "nginx-light" in installs.split() and "haproxy" in installs.split()


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> repository path of the bind mounts of a compose service."""
    out = {}
    for volume in compose()["services"][service]["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_prometheus_loads_the_repository_config_and_rules():
    mounts = _mounts("prometheus")
    command = compose()["services"]["prometheus"]["command"]
    (config_arg,) = [a for a in command if a.startswith("--config.file=")]
    config_path = config_arg.split("=", 1)[1]
    assert mounts[config_path] == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # rule_files are relative to the config file, in the container as in the repository.
    for pattern in config["rule_files"]:
        container_dir = str(Path(config_path).parent / Path(pattern).parent)
        assert mounts[container_dir] == (DEPLOY / "prometheus" / Path(pattern).parent).resolve()
        assert list((DEPLOY / "prometheus").glob(pattern))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "slimrank"]
    assert job["static_configs"][0]["targets"] == [f"slimrank:{METRICS_PORT}"]
    assert str(METRICS_PORT) in [str(p) for p in compose()["services"]["slimrank"]["expose"]]
    # The front's metrics, on the port its command gives, in the server's namespace.
    (front,) = [j for j in config["scrape_configs"] if j["job_name"] == "slimrank-front"]
    front_port = flag(slimrank_commands()["compose front"], "--metrics-port")
    assert front["static_configs"][0]["targets"] == [f"slimrank:{front_port}"]
    assert front_port in [str(p) for p in compose()["services"]["slimrank"]["expose"]]


def test_compose_grafana_provisioning_finds_the_dashboard_and_prometheus():
    mounts = _mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "slimrank.yml").read_text()
    )
    (entry,) = provider["providers"]
    dashboards_dir = mounts[entry["options"]["path"]]
    assert (dashboards_dir / "slimrank.json").exists()
    home = compose()["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert (mounts[str(Path(home).parent)] / Path(home).name).exists()

    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert (
        f"127.0.0.1:{PROMETHEUS_PORT}:{PROMETHEUS_PORT}"
        in compose()["services"]["prometheus"]["ports"]
    )
    board = json.loads((dashboards_dir / "slimrank.json").read_text())
    (ds_var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == source["uid"]


# Grafana dashboard


def test_dashboard_json_is_generated_from_the_spec():
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_dashboard_panels_fit_the_grid_and_use_defined_variables():
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "slimrank.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
    defined = {v["name"] for v in board["templating"]["list"]}
    builtins = {"__rate_interval", "__interval", "__range"}
    used = {
        name
        for panel in board["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\$\{?(\w+)", target["expr"])
    }
    assert used - defined - builtins == set()
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in (
        "calls per second",
        "error ratio",
        "p99",
        "stage",
        "shed",
        "model",
        "candidates",
        "cpu",
        "memory",
    ):
        assert topic in titles, topic


# Kubernetes


def test_k8s_images_match_the_compose_images_and_the_package_version():
    for kind, image in (("Deployment", IMAGE), ("CronJob", RETRAIN_IMAGE)):
        for container in pod_spec(k8s(kind))["containers"]:
            assert container["image"] == image, kind


def test_k8s_probes_use_grpc_health_on_the_grpc_port():
    """Over mutual TLS, so through the image's health check (kubelet's gRPC probe has no TLS)."""
    (container,) = pod_spec(k8s("Deployment"))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"httpGet", "tcpSocket", "grpc"} == set(), probe
        command = spec["exec"]["command"]
        assert command[:2] == healthcheck_command()[:2], probe
        assert flag(command, "--target") == f"127.0.0.1:{GRPC_PORT}", probe
        assert flag(command, "--service") in HEALTH_SERVICES, probe
        assert spec["timeoutSeconds"] >= 2, probe  # a Python start-up fits
    readiness = container["readinessProbe"]["exec"]["command"]
    assert flag(readiness, "--service") == "slimrank.v1.Recommender"


def test_k8s_selectors_match_the_pods():
    deployment = k8s("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    for service in [o for o in k8s_objects() if o["kind"] == "Service"]:
        assert service["spec"]["selector"] == selector
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            (container,) = pod_spec(deployment)["containers"]
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert named[target] == port["port"], port
    assert k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    # The retrain pods must not be selected by the server's Service or PDB.
    job_labels = k8s("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= job_labels.items()


def test_k8s_hpa_and_pdb_target_the_deployment():
    deployment = k8s("Deployment")
    hpa = k8s("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 > k8s("PodDisruptionBudget")["spec"]["minAvailable"]
    (container,) = pod_spec(deployment)["containers"]
    assert "cpu" in container["resources"]["requests"], "HPA CPU utilization needs a request"


def test_k8s_pods_run_as_the_image_user_and_reference_existing_objects():
    claims = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "PersistentVolumeClaim"}
    configmaps = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "ConfigMap"}
    for kind in ("Deployment", "CronJob"):
        spec = pod_spec(k8s(kind))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == UID
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes


def _within(path: str, mounts: dict[str, bool]) -> bool | None:
    """Whether ``path`` lies under a writable mount; None if under no mount at all."""
    for mount, writable in mounts.items():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return writable
    return None


def test_server_and_retrain_paths_lie_in_their_mounts():
    config = k8s("ConfigMap", "slimrank-config")["data"]
    (server,) = pod_spec(k8s("Deployment"))["containers"]
    server_mounts = {m["mountPath"]: not m.get("readOnly", False) for m in server["volumeMounts"]}
    assert _within(config["SLIMRANK_BUNDLES"], server_mounts) is False  # read-only is enough
    (job,) = pod_spec(k8s("CronJob"))["containers"]
    job_mounts = {m["mountPath"]: not m.get("readOnly", False) for m in job["volumeMounts"]}
    retrain = compose()["services"]["retrain"]
    compose_mounts = {v.split(":")[1]: not v.endswith(":ro") for v in retrain["volumes"]}
    # retrain.sh publishes bundles, claims the logs file and files it: all must be writable.
    for where, mounts in (("k8s", job_mounts), ("compose", compose_mounts)):
        env = retrain_environments()[where]
        for key in ("SLIMRANK_BUNDLES", "RETRAIN_LOGS", "RETRAIN_DONE"):
            assert _within(env[key], mounts) is True, (where, key, env[key])
    serve = compose()["services"]["slimrank"]
    assert "bundles:/bundles:ro" in serve["volumes"]


def test_k8s_metrics_annotations_match_the_metrics_port():
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


# The optional front component (deploy/k8s/front)


def test_k8s_front_component_patches_existing_objects_only():
    component = yaml.safe_load((FRONT_COMPONENT / "kustomization.yaml").read_text())
    files = {p.name for p in FRONT_COMPONENT.glob("*.yaml")} - {"kustomization.yaml"}
    assert {patch["path"] for patch in component["patches"]} == files
    base = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    patched = {(o["kind"], o["metadata"]["name"]) for o in with_front()}
    assert patched == base  # it adds no object, only changes these
    kustomization = (K8S / "kustomization.yaml").read_text()
    assert "components" not in yaml.safe_load(kustomization)  # off unless enabled
    assert "#     - front" in kustomization or "#   - front" in kustomization


def test_k8s_front_runs_as_compose_runs_it_beside_the_server():
    """The same command line as compose's front, the server container untouched, and the
    pod-level checks the server passes (image, user, mounts, TLS files, a CPU request)."""
    front = front_container()
    argv = [str(a) for a in front["args"]]
    assert argv == slimrank_commands()["compose front"]
    assert front["image"] == IMAGE and "command" not in front
    (deployment,) = [o for o in with_front() if o["kind"] == "Deployment"]
    spec = pod_spec(deployment)
    server, _ = spec["containers"]
    (base_server,) = pod_spec(k8s("Deployment"))["containers"]
    assert server == base_server
    ports = {p["name"]: p["containerPort"] for p in front["ports"]}
    assert ports == {
        "front": int(flag(argv, "--port")),
        "front-metrics": int(flag(argv, "--metrics-port")),
    }
    assert flag(argv, "--upstream") == f"127.0.0.1:{GRPC_PORT}"
    assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--metrics-host") == "0.0.0.0"
    assert front["securityContext"] == server["securityContext"]
    assert "cpu" in front["resources"]["requests"], "the HPA's utilization needs every request"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in front["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    # HAProxy's config and PEM files go under a temporary directory on a read-only root.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]] and not mounts["/tmp"].get("readOnly")
    tls_mount = "/etc/slimrank/tls"
    assert mounts[tls_mount]["name"] == "tls" and mounts[tls_mount]["readOnly"] is True
    for name in ("--tls-cert", "--tls-key", "--tls-client-ca", "--upstream-tls-ca"):
        assert flag(argv, name).startswith(tls_mount + "/"), name
    probe = front["readinessProbe"]["exec"]["command"]
    assert probe[:2] == healthcheck_command()[:2]
    assert flag(probe, "--target") == f"127.0.0.1:{ports['front']}"
    assert flag(probe, "--service") in HEALTH_SERVICES
    assert front["livenessProbe"]["tcpSocket"]["port"] == "front"


def test_k8s_front_takes_the_services_callers_and_its_policy_admits_them():
    objects = with_front()
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    named = {
        p["name"]: p["containerPort"]
        for c in pod_spec(deployment)["containers"]
        for p in c["ports"]
    }
    services = [o for o in objects if o["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] == "front", service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, port
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    allowed = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert set(allowed) <= set(named)
    callers, monitoring = policy["spec"]["ingress"]
    assert [p["port"] for p in callers["ports"]] == ["front"]
    assert {p["port"] for p in monitoring["ports"]} == {"metrics", "front-metrics"}


def kustomize(tmp_path: Path, front: bool) -> list[dict]:
    """deploy/k8s as ``kubectl kustomize`` renders it, with the front component on or off."""
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    tree = tmp_path / ("front" if front else "base")
    shutil.copytree(K8S, tree)
    if front:
        text = (tree / "kustomization.yaml").read_text()
        enabled = text.replace("# components:", "components:").replace("#   - front", "  - front")
        assert enabled != text
        (tree / "kustomization.yaml").write_text(enabled)
    done = subprocess.run(
        [kubectl, "kustomize", str(tree)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_kustomize_renders_the_front_component_as_the_tests_read_it(tmp_path: Path):
    """The real kustomize (kubectl's) builds the manifests with and without the front, and
    the objects it makes are those the tests above check (their patches applied by
    ``json_patch``), apart from the image tags kustomize sets."""

    def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
        return {(o["kind"], o["metadata"]["name"]): o for o in objects}

    base = by_key(kustomize(tmp_path, front=False))
    rendered = by_key(kustomize(tmp_path, front=True))
    expected = by_key(with_front())
    assert rendered.keys() == expected.keys() == base.keys() == by_key(k8s_objects()).keys()
    for key in [("Service", n) for _, n in expected if _ == "Service"] + [
        ("NetworkPolicy", next(n for k, n in expected if k == "NetworkPolicy"))
    ]:
        assert rendered[key]["spec"] == expected[key]["spec"], key
        assert rendered[key] != base[key], f"{key}: the component did not change it"
    containers = pod_spec(rendered[("Deployment", k8s("Deployment")["metadata"]["name"])])[
        "containers"
    ]
    assert [c["name"] for c in containers][1:] == ["front"]
    front = containers[1]
    assert front["image"] == IMAGE  # kustomize's `images` applies to the sidecar too
    assert {k: v for k, v in front.items() if k != "image"} == {
        k: v for k, v in front_container().items() if k != "image"
    }


def test_json_patch_refuses_a_path_that_does_not_exist():
    doc = {"spec": {"ports": [{"targetPort": "grpc"}]}}
    assert (
        json_patch(doc, [{"op": "replace", "path": "/spec/ports/0/targetPort", "value": "x"}])[
            "spec"
        ]["ports"][0]["targetPort"]
        == "x"
    )
    with pytest.raises((AssertionError, KeyError, IndexError)):
        json_patch(doc, [{"op": "replace", "path": "/spec/ports/1/targetPort", "value": "x"}])
    with pytest.raises((AssertionError, KeyError)):
        json_patch(doc, [{"op": "replace", "path": "/spec/nope", "value": "x"}])
