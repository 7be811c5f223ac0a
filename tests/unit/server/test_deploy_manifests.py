"""The Kubernetes manifests in `deploy/`: every `aligner serve` argument list is one the CLI
accepts (vLLM's engine flags through vLLM's parser), and the probes, the API key, the reward
URL, the Services and the scrape point where the server and the other manifests say."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from server.cli import parse_args
from server.middleware import UNAUTHENTICATED_PATHS

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
REMOTE_REWARD = re.compile(r"^(?P<name>[^=]+)=(?P<path>[^@]+)@(?P<url>https?://.+)$")


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(DEPLOY.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc["kind"] in kinds]


def containers() -> list[tuple[str, dict, dict]]:
    """(where, container, pod template) of every workload."""
    return [(f"{name}: {doc['metadata']['name']}/{c['name']}", c, doc["spec"]["template"])
            for name, doc in of_kind(*WORKLOADS) for c in doc["spec"]["template"]["spec"]["containers"]]


def argv(container: dict) -> list[str]:
    return [str(a) for a in (*container.get("command", ()), *container.get("args", ()))]


def serve_argv(container: dict) -> list[str] | None:
    """The arguments after `aligner serve`, or None when the container runs something else."""
    words = argv(container)
    for i, word in enumerate(words[:-1]):
        if Path(word).name == "aligner" and words[i + 1] == "serve":
            return words[i + 2:]
    return None


ALIGNERS = [(where, c, pod) for where, c, pod in containers() if serve_argv(c) is not None]
POOLERS = [(where, c, pod) for where, c, pod in containers() if any("vllm" in w for w in argv(c)[:3])]


def parsed(where: str, args: list[str]):
    try:
        return parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"{where}: `aligner serve` refuses {args} (its error is printed above)")


def container_port(container: dict, port) -> int:
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", ())}
    return named[port] if isinstance(port, str) else port


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def mounted_volume(container: dict, pod: dict, path: str) -> tuple[dict, dict]:
    """The volumeMount holding `path`, and its volume in `pod` (a template)."""
    mount = max((m for m in container.get("volumeMounts", ()) if Path(path).is_relative_to(m["mountPath"])),
                key=lambda m: len(m["mountPath"]), default=None)
    assert mount is not None, f"nothing is mounted at {path}"
    return mount, next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])


def remote_rewards(args) -> list[re.Match]:
    return [m for spec in args.reward_model if (m := REMOTE_REWARD.match(spec))]


def selects(service: dict, pod: dict) -> bool:
    return service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_there_are_aligner_replicas_and_a_pooling_server():
    assert ALIGNERS and POOLERS
    for _, doc in of_kind(*WORKLOADS):
        if any(serve_argv(c) is not None for c in doc["spec"]["template"]["spec"]["containers"]):
            assert doc["spec"]["replicas"] >= 2, f"{doc['metadata']['name']}: one replica does not scale out"


def test_every_manifest_is_kubernetes_shaped():
    for name, doc in documents():
        assert doc.get("apiVersion") and doc.get("kind"), name
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("metadata", {}).get("name"), name
        assert "spec" in doc or "stringData" in doc or "data" in doc, f"{name}: {doc['kind']} has no body"


def test_kustomization_applies_the_manifests_but_never_the_example_secret():
    (_, kustomization), = of_kind("Kustomization")
    resources = kustomization["resources"]
    assert all((DEPLOY / r).is_file() for r in resources)
    assert {"aligner.yaml", "reward-pooling.yaml"} <= set(resources)
    # The example would overwrite real keys on every `kubectl apply -k`.
    assert "secret.example.yaml" not in resources


@pytest.mark.parametrize("where, container, pod", ALIGNERS, ids=[w for w, _, _ in ALIGNERS])
def test_every_aligner_serve_argument_is_accepted(where, container, pod):
    args = parsed(where, serve_argv(container))
    assert args.host == "0.0.0.0", f"{where}: listens on {args.host} only"
    assert args.port in {p["containerPort"] for p in container["ports"]}
    assert "--api-key" not in serve_argv(container), f"{where}: a key written into the manifest"
    # vLLM's parallelism flags came through, and ask for the GPUs the pod gets.
    overrides = args.engine_overrides
    assert overrides, f"{where}: no vLLM engine flag to check"
    wanted = (overrides.get("tensor_parallel_size", 1) * overrides.get("pipeline_parallel_size", 1)
              * overrides.get("data_parallel_size", 1))
    assert wanted == gpus(container), f"{where}: vLLM wants {wanted} GPUs, the pod gets {gpus(container)}"


def test_a_flag_the_cli_refuses_fails_the_check(capsys):
    with pytest.raises(pytest.fail.Exception, match="--max-runing-requests"):
        parsed("typo", ["--max-runing-requests", "16"])
    assert "--max-runing-requests" in capsys.readouterr().err  # vLLM's parser named it


@pytest.mark.parametrize("where, container, pod", ALIGNERS, ids=[w for w, _, _ in ALIGNERS])
def test_liveness_is_health_and_readiness_is_ready_on_the_served_port(where, container, pod):
    port = parsed(where, serve_argv(container)).port
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], container_port(container, live["port"])) == ("/health", port)
    assert "/health" in UNAUTHENTICATED_PATHS  # so the kubelet needs no key for it
    ready = container["readinessProbe"]
    if "httpGet" in ready:
        assert (ready["httpGet"]["path"], container_port(container, ready["httpGet"]["port"])) == ("/ready", port)
        assert "/ready" in UNAUTHENTICATED_PATHS, f"{where}: /ready needs the key, which an httpGet probe cannot send"
    else:
        script = ready["exec"]["command"][-1]
        assert f"http://127.0.0.1:{port}/ready" in script
        env = {e["name"]: e for e in container.get("env", ())}
        assert "secretKeyRef" in env["ALIGNER_METRICS_KEY"]["valueFrom"] and "ALIGNER_METRICS_KEY" in script


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        ok = self.path == "/ready" and self.headers.get("Authorization") == "Bearer k1"
        self.send_response(self.status if ok else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (401, False)])
def test_the_exec_readiness_probe_passes_only_on_200_with_the_key(status, healthy):
    exec_probes = [(w, c) for w, c, _ in ALIGNERS if "exec" in c["readinessProbe"]]
    if not exec_probes:
        pytest.skip("readiness is an httpGet probe")
    server = http.server.HTTPServer(("127.0.0.1", 0), type("Handler", (_Ready,), {"status": status}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for where, container in exec_probes:
            command = container["readinessProbe"]["exec"]["command"]
            assert Path(command[0]).name.startswith("python")
            script = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{server.server_port}", command[-1])
            key = "k1" if status != 401 else "wrong"
            ran = subprocess.run([sys.executable, *command[1:-1], script], env={"ALIGNER_METRICS_KEY": key},
                                 capture_output=True, timeout=30)
            assert (ran.returncode == 0) == healthy, f"{where}: exit {ran.returncode} on {status}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("where, container, pod", ALIGNERS, ids=[w for w, _, _ in ALIGNERS])
def test_the_api_keys_come_from_a_secret(where, container, pod):
    args = parsed(where, serve_argv(container))
    env = {e["name"]: e for e in container.get("env", ())}
    from_env = "secretKeyRef" in env.get("ALIGNER_API_KEY", {}).get("valueFrom", {})
    assert "ALIGNER_API_KEY" not in env, f"{where}: the probe's stable key is an admin key; give it the metrics role"
    from_file = False
    if args.api_key_file:
        mount, volume = mounted_volume(container, pod, args.api_key_file)
        # A subPath mount never sees the Secret's updates, so SIGHUP would re-read the old keys.
        assert "secret" in volume and "subPath" not in mount, f"{where}: {args.api_key_file} is not a live Secret file"
        items = {i["path"] for i in volume["secret"].get("items", ())}
        assert not items or str(Path(args.api_key_file).relative_to(mount["mountPath"])) in items
        from_file = True
    assert from_env or from_file, f"{where}: no key from a Secret"


def test_the_metrics_scrape_sends_a_key_the_server_accepts():
    assert "/metrics" not in UNAUTHENTICATED_PATHS  # else this scrape would need no key
    keys = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for _, c, _ in ALIGNERS for e in c.get("env", ()) if e["name"] == "ALIGNER_METRICS_KEY"}
    services = [doc for _, doc in of_kind("Service") if any(selects(doc, pod) for _, _, pod in ALIGNERS)]
    monitors = [doc for _, doc in of_kind("ServiceMonitor") for service in services
                if doc["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()]
    assert monitors, "nothing scrapes the aligner replicas"
    for endpoint in (e for doc in monitors for e in doc["spec"]["endpoints"]):
        assert endpoint["path"] == "/metrics"
        assert any(endpoint["port"] == p.get("name") for s in services for p in s["spec"]["ports"])
        credentials = endpoint["authorization"]["credentials"]
        assert (credentials["name"], credentials["key"]) in keys


def test_every_service_selects_pods_on_a_port_they_open():
    templates = [doc["spec"]["template"] for _, doc in of_kind(*WORKLOADS)]
    for name, service in of_kind("Service"):
        pods = [t for t in templates if selects(service, t)]
        assert pods, f"{name}: Service {service['metadata']['name']} selects no pod template"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(p.get("name") == target or p["containerPort"] == target
                       for t in pods for c in t["spec"]["containers"] for p in c.get("ports", ())), (name, target)


@pytest.mark.parametrize("where, container, pod", ALIGNERS, ids=[w for w, _, _ in ALIGNERS])
def test_the_remote_reward_is_a_service_here_serving_the_same_checkpoint(where, container, pod):
    remote = remote_rewards(parsed(where, serve_argv(container)))
    assert remote, f"{where}: no NAME=PATH@URL reward model"
    services = {doc["metadata"]["name"]: doc for _, doc in of_kind("Service")}
    for match in remote:
        url = urlparse(match["url"])
        service = services.get(url.hostname)
        assert service, f"{where}: {url.hostname} is not a Service in deploy/"
        assert url.port in {p["port"] for p in service["spec"]["ports"]}, f"{where}: {match['url']}"
        # The Service leads to the pooling server, which serves the checkpoint whose tokenizer,
        # layout and stats the aligner reads, from the same claim.
        poolers = [(c, p) for _, c, p in POOLERS if selects(service, p)]
        assert poolers, f"{where}: {url.hostname} leads to no pooling server"
        for pooler, pooler_pod in poolers:
            assert match["path"] in argv(pooler)
            claims = [mounted_volume(c, p, match["path"])[1]["persistentVolumeClaim"]["claimName"]
                      for c, p in ((container, pod), (pooler, pooler_pod))]
            assert claims[0] == claims[1], f"{where}: the aligner and the pooling server read different volumes"


def vllm_serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("where, container, pod", POOLERS, ids=[w for w, _, _ in POOLERS])
def test_the_reward_server_is_vllm_serve_in_pooling_mode(where, container, pod):
    words = argv(container)
    assert words[:2] == ["vllm", "serve"], f"{where}: runs {words[:2]}"
    try:
        args = vllm_serve_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"{where}: `vllm serve` refuses {words[2:]}")
    assert args.runner == "pooling"
    assert args.port in {p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def test_the_example_keys_parse_and_the_probe_key_reads_probes_only(tmp_path, monkeypatch):
    from server.api_keys import APIKeys, read_key_file
    from server.middleware import role_allows

    secret = next(doc for _, doc in of_kind("Secret") if doc["metadata"]["name"] == "aligner-api-keys")["stringData"]
    (tmp_path / "keys").write_text(secret["keys"])
    assert {who.role for who in read_key_file(tmp_path / "keys").values()} == {"admin", "client"}
    monkeypatch.setenv("ALIGNER_METRICS_KEY", secret["internal"])  # as the pods get it
    args = parse_args(["serve", "--api-key-file", str(tmp_path / "keys")])
    probe = APIKeys(args.api_key, args.api_key_file, args.metrics_key).principal(
        f"Bearer {secret['internal']}".encode())
    assert probe is not None and probe.role == "metrics"
    assert role_allows(probe.role, "GET", "/ready") and role_allows(probe.role, "GET", "/metrics")
    assert not role_allows(probe.role, "POST", "/v1/chat/completions")
    assert not role_allows(probe.role, "GET", "/v1/alignment/traces/chatcmpl-1")
