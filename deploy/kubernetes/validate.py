#!/usr/bin/env python3
"""Checks that the manifests of this directory are valid Kubernetes objects, and consistent.

Every object is read into the official `kubernetes` Python client's model of its kind, strictly:
an unknown field, a value of the wrong type or a missing required field is an error (the
client's own deserializer ignores unknown fields, so this walks the models' field tables
itself). The ServiceMonitor (a monitoring.coreos.com/v1 CRD the client has no model of) is
checked against the fields the Prometheus Operator's CRD defines. Then the objects are checked
against each other and against the image: selectors match the pod labels, probes and the
Service name the admin port, every volume, ConfigMap and Secret key referenced exists, the
runtime.toml of the ConfigMap parses, its state_dir is a writable volume and its
shutdown_grace_ms is shorter than terminationGracePeriodSeconds.

Run it through deploy/kubernetes/validate.sh, which installs the client in a venv.
`--fixture` prints, as JSON, what a test needs to run `lockgate check` on the ConfigMap's
runtime.toml as the pod would see it: the config, the container's args, the environment
variables it gets from Secrets and the secret files it mounts.
"""

import glob
import json
import os
import re
import sys
import tomllib

import yaml
from kubernetes import client

HERE = os.path.dirname(os.path.abspath(__file__))
# The image's user (scripts/build-image.sh writes it into /etc/passwd).
IMAGE_UID = 10001
ADMIN_PORT = 9464
# At least this much between shutdown_grace_ms and the kubelet's SIGKILL: committing done
# offsets and leaving the consumer group happen after the grace.
GRACE_MARGIN_MS = 5000

errors = []


def error(where, what):
    errors.append(f"{where}: {what}")


# Kubernetes kinds of these manifests and their models: `<version><Kind>` in the client.
def model_name(api_version, kind):
    version = api_version.split("/")[-1]
    return version[0].upper() + version[1:] + kind


SCALARS = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "bytearray": (str,),
}


def check_value(value, type_name, path):
    """Checks `value` against the client's type string (`V1PodSpec`, `List[V1Container]`,
    `Dict[str, str]`, `str`, `object` for int-or-string)."""
    m = re.fullmatch(r"(?:List|list)\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            return error(path, f"expected a list, got {value!r}")
        for i, item in enumerate(value):
            check_value(item, m.group(1), f"{path}[{i}]")
        return
    m = re.fullmatch(r"(?:Dict|dict)\((?:str), (.+)\)|(?:Dict|dict)\[str, (.+)\]", type_name)
    if m:
        if not isinstance(value, dict):
            return error(path, f"expected a map, got {value!r}")
        for k, v in value.items():
            check_value(v, m.group(1) or m.group(2), f"{path}.{k}")
        return
    if type_name == "object":
        # int-or-string (ports, maxUnavailable) or free-form: any scalar or map.
        return
    if type_name in SCALARS:
        # YAML's booleans are not ints here, though Python's are.
        if isinstance(value, bool) and type_name != "bool":
            return error(path, f"expected {type_name}, got {value!r}")
        if not isinstance(value, SCALARS[type_name]):
            return error(path, f"expected {type_name}, got {value!r}")
        return
    model = getattr(client, type_name, None)
    if model is None:
        return error(path, f"no model {type_name} in the kubernetes client")
    if not isinstance(value, dict):
        return error(path, f"expected a {type_name} object, got {value!r}")
    by_json = {j: p for p, j in model.attribute_map.items()}
    for key, v in value.items():
        if key not in by_json:
            error(path, f"unknown field {key!r} of {type_name}")
            continue
        check_value(v, model.openapi_types[by_json[key]], f"{path}.{key}")


def check_required(obj, model_type, where):
    """Builds the client's model of `obj`, whose setters refuse a missing required field."""
    api = client.ApiClient()
    try:
        api.deserialize(json.dumps(obj), model_type, None)
    except (ValueError, TypeError) as e:
        error(where, f"not a valid {model_type}: {e}")


QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
DURATION = re.compile(r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def check_service_monitor(obj, where):
    """monitoring.coreos.com/v1 ServiceMonitor: the fields of the CRD this directory uses
    (spec.selector is required; endpoints name a Service port by name)."""
    allowed_top = {"apiVersion", "kind", "metadata", "spec"}
    for k in obj:
        if k not in allowed_top:
            error(where, f"unknown field {k!r}")
    check_value(obj.get("metadata"), "V1ObjectMeta", f"{where}.metadata")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return error(where, "spec is required")
    spec_fields = {
        "selector": "V1LabelSelector",
        "endpoints": None,
        "namespaceSelector": None,
        "jobLabel": "str",
        "targetLabels": "List[str]",
        "podTargetLabels": "List[str]",
        "sampleLimit": "int",
    }
    for k, v in spec.items():
        if k not in spec_fields:
            error(f"{where}.spec", f"unknown field {k!r}")
        elif spec_fields[k]:
            check_value(v, spec_fields[k], f"{where}.spec.{k}")
    if "selector" not in spec:
        error(f"{where}.spec", "selector is required")
    endpoint_fields = {
        "port": "str",
        "targetPort": "object",
        "path": "str",
        "scheme": "str",
        "interval": "str",
        "scrapeTimeout": "str",
        "honorLabels": "bool",
        "bearerTokenSecret": "V1SecretKeySelector",
    }
    endpoints = spec.get("endpoints", [])
    if not isinstance(endpoints, list) or not endpoints:
        error(f"{where}.spec.endpoints", "a non-empty list is expected")
        endpoints = []
    for i, ep in enumerate(endpoints):
        p = f"{where}.spec.endpoints[{i}]"
        if not isinstance(ep, dict):
            error(p, "expected a map")
            continue
        for k, v in ep.items():
            if k not in endpoint_fields:
                error(p, f"unknown field {k!r}")
            else:
                check_value(v, endpoint_fields[k], f"{p}.{k}")
        if ep.get("scheme", "http") not in ("http", "https"):
            error(p, f"scheme must be http or https, not {ep.get('scheme')!r}")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                error(p, f"{k} {ep[k]!r} is not a Prometheus duration")
        if "port" not in ep and "targetPort" not in ep:
            error(p, "names no port")


def load():
    """Every object of every manifest here: (file, object)."""
    objects = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.yaml"))):
        name = os.path.basename(path)
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    objects.append((name, doc))
    return objects


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def main():
    objects = load()
    by_kind = {}
    for name, obj in objects:
        where = f"{name}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        kind, api_version = obj.get("kind"), obj.get("apiVersion", "")
        if kind == "Kustomization":
            listed = set(obj.get("resources", []))
            for r in listed:
                if not os.path.isfile(os.path.join(HERE, r)):
                    error(where, f"resource {r} does not exist")
            for other, _ in objects:
                if other not in listed and other != name and not other.endswith(".example.yaml"):
                    error(where, f"{other} is not listed in resources")
            continue
        if kind == "ServiceMonitor":
            if api_version != "monitoring.coreos.com/v1":
                error(where, f"apiVersion {api_version}, expected monitoring.coreos.com/v1")
            check_service_monitor(obj, where)
        else:
            model = model_name(api_version, kind)
            check_value(obj, model, where)
            check_required(obj, model, where)
        by_kind.setdefault(kind, []).append((where, obj))

    def one(kind):
        found = by_kind.get(kind, [])
        if len(found) != 1:
            error("manifests", f"expected one {kind}, found {len(found)}")
            return ("?", {})
        return found[0]

    dep_where, dep = one("Deployment")
    cm_where, cm = one("ConfigMap")
    svc_where, svc = one("Service")
    pdb_where, pdb = one("PodDisruptionBudget")
    sm_where, sm = one("ServiceMonitor")
    secret_where, secret = one("Secret")
    if errors:
        return finish(None)

    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    pod_spec = pod["spec"]
    if not subset(dep["spec"]["selector"].get("matchLabels"), pod_labels):
        error(dep_where, "spec.selector does not match the pod template's labels")
    if not subset(svc["spec"].get("selector"), pod_labels) or not svc["spec"].get("selector"):
        error(svc_where, "spec.selector does not select the Deployment's pods")
    if not subset(pdb["spec"]["selector"].get("matchLabels"), pod_labels):
        error(pdb_where, "spec.selector does not select the Deployment's pods")
    if not subset(sm["spec"]["selector"].get("matchLabels"), svc["metadata"].get("labels", {})):
        error(sm_where, "spec.selector does not select the Service")
    svc_ports = {p.get("name") for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        if ep.get("port") not in svc_ports:
            error(sm_where, f"endpoint port {ep.get('port')!r} is not a port of the Service")

    containers = {c["name"]: c for c in pod_spec["containers"]}
    main_c = containers.get("lockgate")
    if main_c is None:
        error(dep_where, "no container named lockgate")
        return finish(None)
    ports = {p.get("name"): p["containerPort"] for p in main_c.get("ports", [])}
    if ports.get("admin") != ADMIN_PORT:
        error(dep_where, f"container port `admin` must be {ADMIN_PORT}")
    for p in svc["spec"]["ports"]:
        if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
            error(svc_where, f"targetPort {p.get('targetPort')!r} is not a container port")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        get = main_c.get(probe, {}).get("httpGet")
        if not get:
            error(dep_where, f"{probe} must be an httpGet on the admin port")
            continue
        if get.get("path") != path or get.get("port") not in ("admin", ADMIN_PORT):
            error(dep_where, f"{probe} must GET {path} on the admin port, not {get}")

    # The pod runs as the image's non-root user on a read-only root file system.
    pod_sc = pod_spec.get("securityContext", {})
    if not pod_sc.get("runAsNonRoot") or pod_sc.get("runAsUser") != IMAGE_UID:
        error(dep_where, f"the pod must run as non-root uid {IMAGE_UID}")
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
            error(dep_where, f"container {c['name']}: readOnlyRootFilesystem and no privilege escalation")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for k in ("cpu", "memory"):
                q = res.get(part, {}).get(k)
                if q is None or not QUANTITY.match(str(q)):
                    error(dep_where, f"container {c['name']}: resources.{part}.{k} {q!r}")

    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    mounts = {}
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                error(dep_where, f"container {c['name']} mounts unknown volume {m['name']}")
            if c is main_c:
                mounts[m["mountPath"]] = m
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] != cm["metadata"]["name"]:
            error(dep_where, f"volume {v['name']} names ConfigMap {v['configMap']['name']}, not in this directory")
        if "secret" in v:
            if v["secret"]["secretName"] != secret["metadata"]["name"]:
                error(dep_where, f"volume {v['name']} names an unknown Secret")
            for item in v["secret"].get("items", []):
                if item["key"] not in secret.get("stringData", {}):
                    error(dep_where, f"volume {v['name']} needs key {item['key']} the Secret lacks")
    env = {}
    for e in main_c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            if ref["name"] != secret["metadata"]["name"] or ref["key"] not in secret.get("stringData", {}):
                error(dep_where, f"env {e['name']} names a Secret key that does not exist")
            env[e["name"]] = "from-secret"
        elif "value" in e:
            env[e["name"]] = e["value"]

    # The config as lockgate reads it.
    text = cm["data"].get("runtime.toml")
    config_path = None
    args = main_c.get("args") or []
    if len(args) >= 2 and args[0] == "run":
        config_path = args[1]
    if text is None or config_path is None:
        error(cm_where, "needs data.runtime.toml, and the container `args: [run, <config>, ...]`")
        return finish(None)
    cm_mount = next((p for p, m in mounts.items() if volumes[m["name"]].get("configMap")), None)
    if cm_mount is None or os.path.join(cm_mount, "runtime.toml") != config_path:
        error(dep_where, f"the ConfigMap is not mounted where args read the config ({config_path})")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        error(cm_where, f"runtime.toml does not parse: {e}")
        return finish(None)
    runtime = config.get("runtime", {})
    grace_ms = runtime.get("shutdown_grace_ms", 10000)
    tgps = pod_spec.get("terminationGracePeriodSeconds", 30)
    if tgps * 1000 < grace_ms + GRACE_MARGIN_MS:
        error(dep_where, f"terminationGracePeriodSeconds {tgps} s is not above shutdown_grace_ms "
                         f"{grace_ms} ms + {GRACE_MARGIN_MS} ms")
    state_dir = args[args.index("--state-dir") + 1] if "--state-dir" in args else runtime.get("state_dir")
    state_mount = mounts.get(state_dir)
    if state_mount is None or state_mount.get("readOnly") or "emptyDir" not in volumes[state_mount["name"]] \
            and "persistentVolumeClaim" not in volumes[state_mount["name"]]:
        error(dep_where, f"state dir {state_dir} must be a writable volume")
    if runtime.get("state_dir") != state_dir:
        error(cm_where, f"[runtime] state_dir must be {state_dir} (so `lockgate check` uses the volume too)")
    if "/tmp" not in mounts:
        error(dep_where, "/tmp must be a volume (the root file system is read-only)")

    # Secret files the pod sees: every key of every secret volume.
    files = []
    for path, m in mounts.items():
        v = volumes[m["name"]]
        if "secret" in v:
            items = v["secret"].get("items") or [{"key": k, "path": k} for k in secret.get("stringData", {})]
            files += [os.path.join(path, i["path"]) for i in items]
    return finish({"runtime_toml": text, "config_path": config_path, "args": args,
                   "env": env, "secret_files": files,
                   "modules_mount": "/modules" if "/modules" in mounts else None})


def finish(fixture):
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        print(f"{len(errors)} problem(s) in {HERE}", file=sys.stderr)
        return 1
    if "--fixture" in sys.argv:
        print(json.dumps(fixture))
    else:
        print(f"{HERE}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
