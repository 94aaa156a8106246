"""deploy/kubernetes/ read as Kubernetes would, checked against atelier itself.

No cluster runs here: these are the facts that would break a deployment silently. The ports the
probes, the container and the Service name agree; the container's command and the RayJob's
entrypoint parse with atelier's own parser (a renamed or abbreviated flag fails); the probes ask
for health service names the server reports; the volumes are the one ReadWriteMany claim, read-only
where atelier only reads.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from atelier.cli import build_parser
from atelier.server.app import SERVICE_NAME

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"


def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind in deploy/kubernetes/*.yaml (each file parsed whole)."""
    objects: dict[str, dict] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict) and {"apiVersion", "kind"} <= document.keys(), path
            assert document["kind"] not in objects, f"a second {document['kind']} in {path.name}"
            objects[document["kind"]] = document
    return objects


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    return manifests()


def parse_verb(argv: list[str]) -> argparse.Namespace:
    """`atelier ARGV` as the CLI parses it; every --flag must be the verb's exact name, not a prefix."""
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verb = verbs.choices[argv[0]]
    known = {name for action in verb._actions for name in action.option_strings}
    flags = [token.split("=", 1)[0] for token in argv[1:] if token.startswith("--")]
    assert set(flags) <= known, f"not `atelier {argv[0]}` flags: {sorted(set(flags) - known)}"
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`atelier {shlex.join(argv)}` does not parse (argparse's message is above)")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def under(path: Path, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


def pod_volume_mounts(pod: dict, container: dict) -> dict[str, tuple[str, bool]]:
    """claim name -> (mount path, read-only) of a container, through its pod's volumes."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    return {claims[m["name"]]: (m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]
            if m["name"] in claims}


def serving_container(objects) -> tuple[dict, dict, argparse.Namespace]:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["atelier"]
    return pod, container, parse_verb(container["args"])


def test_every_file_is_kubernetes_yaml_and_kustomize_lists_the_long_lived_ones(objects):
    assert {"Deployment", "Service", "PersistentVolumeClaim", "RayJob", "Kustomization"} <= objects.keys()
    listed = objects["Kustomization"]["resources"]
    assert all((KUBERNETES / name).is_file() for name in listed)
    assert "rayjob.yaml" not in listed  # a new RayJob per reindex: `kubectl create`, with generateName
    assert "generateName" in objects["RayJob"]["metadata"]


def test_the_deployment_serves_the_shared_index_read_only_and_watches_it(objects):
    pod, container, args = serving_container(objects)
    assert args.verb == "serve" and args.watch_index and args.watch_index > 0
    assert args.address.rsplit(":", 1)[0] in ("0.0.0.0", "[::]")  # the pod's address, not loopback
    claim = objects["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    mounts = pod_volume_mounts(pod, container)
    mount, read_only = mounts[claim["metadata"]["name"]]
    assert read_only
    assert under(args.index, mount)
    assert all(under(Path(spec.split("=", 1)[-1]), mount) for spec in args.model)
    # SIGKILL only after the drain and the in-flight calls' grace
    assert pod["terminationGracePeriodSeconds"] > args.drain + args.grace


def test_probes_container_and_service_agree_on_the_serving_port(objects):
    pod, container, args = serving_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_of(args.address) == ports["grpc"]
    if args.metrics:
        assert port_of(args.metrics) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]  # Kubernetes' own gRPC health probe
        assert grpc_probe["port"] == ports["grpc"], probe
        assert grpc_probe.get("service", "") in ("", SERVICE_NAME), probe  # the names app.py reports
    service = objects["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS names every ready pod
    (port,) = service["ports"]
    target = port["targetPort"]
    assert ports.get(target, target) == ports["grpc"]
    assert port["port"] == ports["grpc"]  # headless: clients dial the pods' own port
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_readme_points_the_client_at_the_headless_service(objects):
    readme = (KUBERNETES / "README.md").read_text()
    targets = re.findall(r"dns:///([a-z0-9-]+)\.<namespace>\.svc\.cluster\.local:(\d+)", readme)
    assert targets
    _, container, _ = serving_container(objects)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert set(targets) == {(objects["Service"]["metadata"]["name"], str(grpc_port))}
    parse_verb(["query", "--target", f"dns:///{targets[0][0]}.shop.svc.cluster.local:{targets[0][1]}", "--schema"])


def test_the_rayjob_reindexes_on_ray_into_the_index_the_replicas_serve(objects):
    job = objects["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "atelier"
    args = parse_verb(argv[1:])
    assert (args.verb, args.distributor, args.ray_address) == ("index", "ray", "auto")
    _, _, serve = serving_container(objects)
    assert args.out == serve.index
    claim = objects["PersistentVolumeClaim"]["metadata"]["name"]
    cluster = job["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    mount, read_only = pod_volume_mounts(head, head["containers"][0])[claim]
    assert not read_only and under(args.out, mount) and under(args.catalogue, mount)  # the driver publishes
    for group in cluster["workerGroupSpecs"]:  # workers read the catalogue at the driver's path
        pod = group["template"]["spec"]
        assert pod_volume_mounts(pod, pod["containers"][0])[claim][0] == mount, group["groupName"]
    # one Ray release on every pod and in the driver: the image's
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f'"ray[default]=={cluster["rayVersion"]}"' in dockerfile
    images = {c["image"] for spec in [head, *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
              for c in spec["containers"]}
    _, container, _ = serving_container(objects)
    assert images == {container["image"]}
