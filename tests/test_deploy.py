"""deploy/ and cluster.yaml, checked offline: no Kubernetes, no AWS, no Ray cluster.

- Every manifest in deploy/kuberay/ validates against the openAPIV3Schema of the KubeRay
  release's CRD for its kind, read strictly as `kubectl apply --validate=strict` would (an
  unknown field fails; KubeRay's CEL rules and webhooks are not run).
- cluster.yaml validates against the cluster launcher's schema in Ray's wheel, as `ray up`
  does after filling in defaults.
- The RayJobs' entrypoints name scripts in jobs/ and flags those scripts' own parsers accept.
Each check has cases that must fail, so a check that stops biting shows.
"""

import copy
import os
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

import dap_ray.config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
KUBERAY_RELEASE = "v1.7.0"  # crds/<release>/ and the helm --version in deploy/kuberay/README.md
CRD_FILES = {("ray.io", "RayCluster"): "ray.io_rayclusters.yaml", ("ray.io", "RayJob"): "ray.io_rayjobs.yaml"}
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB: libyaml reads them 7x faster

# The apiserver checks ObjectMeta itself (the CRDs say only `type: object`): the part these manifests use,
# with KubeRay's rule for names (a DNS-1035 label short enough to name the pods after it).
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


def strict(node):
    """A CRD's structural schema as plain JSON Schema, unknown fields failing as the apiserver's strict mode has it."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = strict(out[key])
    if out.get("x-kubernetes-int-or-string"):  # a quantity or a port: 1 or "1Gi"; `pattern` binds strings only
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("type") == "integer" and out.get("format") in INT_RANGES:
        low, high = INT_RANGES[out["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ((out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _unique_list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items share their keys (two volumes named alike, two env vars ...)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for keys {keys}: {key}")
        seen.add(key)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys})


def crd_dir() -> Path:
    """KubeRay's two CRD files at KUBERAY_RELEASE (deploy/kuberay/CRDS_SOURCE names them): under
    ``$DAP_RAY_KUBERAY_CRDS/<release>/`` or ``../shared/kuberay/crds/<release>/``. They are not in this
    repository (third-party files are kept out of it); without them these cases skip, saying so."""
    places = [ROOT.parent / "shared" / "kuberay" / "crds"]
    if os.environ.get("DAP_RAY_KUBERAY_CRDS"):
        places.insert(0, Path(os.environ["DAP_RAY_KUBERAY_CRDS"]))
    for where in (place / KUBERAY_RELEASE for place in places):
        if all((where / name).is_file() for name in CRD_FILES.values()):
            return where
    pytest.skip(f"KubeRay {KUBERAY_RELEASE}'s CRD files are in none of {[str(p) for p in places]} "
                f"(deploy/kuberay/CRDS_SOURCE says where to get them)")


@cache
def _crd(group: str, kind: str) -> dict:
    return yaml.load((crd_dir() / CRD_FILES[(group, kind)]).read_text(), Loader=Loader)


@cache
def _validator(group: str, kind: str, version: str):
    crd = _crd(group, kind)
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in served:
        return None
    schema = copy.deepcopy(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = copy.deepcopy(OBJECT_META)
    schema["properties"]["metadata"]["properties"]["name"]["maxLength"] = MAX_NAME[kind]
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return K8sValidator(strict(schema))


def crd_errors(doc: dict) -> list[str]:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    if (group, doc.get("kind")) not in CRD_FILES:
        return [f"no vendored CRD for {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = _validator(group, doc["kind"], version)
    if validator is None:
        return [f"KubeRay {KUBERAY_RELEASE} does not serve {doc['kind']} as {version}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


class UniqueKeyLoader(yaml.SafeLoader):
    """A key given twice fails, as in the apiserver's strict mode (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {twice}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def documents(path: Path, text: str | None = None) -> list[dict]:
    return [d for d in yaml.load_all(text or path.read_text(), Loader=UniqueKeyLoader) if d is not None]


def ray_documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in documents(p) if d["apiVersion"].startswith("ray.io/")]


def test_the_manifests_are_there():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-mine.yaml", "rayjob-pretrain.yaml", "pvc.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_its_crd(path):
    for doc in documents(path):
        if doc["apiVersion"] == "v1" and doc["kind"] == "PersistentVolumeClaim":
            assert doc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts it, on many nodes"
            continue
        assert crd_errors(doc) == []


def _put(path, value):
    def mutate(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        doc[last] = value
    return mutate


def _drop(path):
    def mutate(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        del doc[last]
    return mutate


def _rename(path, new):
    def mutate(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        doc[new] = doc.pop(last)
    return mutate


HEAD = ("spec", "headGroupSpec")
GPU = ("spec", "workerGroupSpecs", 0)
HEAD_CONTAINER = (*HEAD, "template", "spec", "containers", 0)


@pytest.mark.parametrize("manifest, mutate, expected", [
    pytest.param("raycluster.yaml", _rename((*HEAD, "rayStartParams"), "rayStartParam"), "'rayStartParam' was unexpected",
                 id="misspelled-field"),
    pytest.param("raycluster.yaml", _rename((*HEAD_CONTAINER, "imagePullPolicy"), "imagePullPolicies"),
                 "'imagePullPolicies' was unexpected", id="misspelled-field-in-pod-spec"),
    pytest.param("raycluster.yaml", _rename(("metadata", "name"), "nam"), "'nam' was unexpected",
                 id="misspelled-metadata"),
    pytest.param("rayjob-mine.yaml", _put(("metadata", "name"), "x" * 48), "is too long", id="name-too-long"),
    pytest.param("raycluster.yaml", _put(("metadata", "name"), "1dap"), "does not match", id="name-not-dns-1035"),
    pytest.param("raycluster.yaml", _put((*GPU, "maxReplicas"), "16"), "maxReplicas: '16' is not of type 'integer'",
                 id="string-for-integer"),
    pytest.param("raycluster.yaml", _put((*GPU, "maxReplicas"), 2**31), "greater than the maximum of 2147483647",
                 id="beyond-int32"),
    pytest.param("raycluster.yaml", _put((*HEAD, "rayStartParams", "num-cpus"), 0), "num-cpus: 0 is not of type 'string'",
                 id="integer-for-string"),
    pytest.param("raycluster.yaml", _put((*HEAD_CONTAINER, "resources", "limits", "cpu"), "six"),
                 "limits.cpu: 'six' does not match", id="bad-quantity"),
    pytest.param("raycluster.yaml", _put((*HEAD_CONTAINER, "resources", "limits", "cpu"), True),
                 "limits.cpu: True is not valid", id="boolean-for-int-or-string"),
    pytest.param("raycluster.yaml", _put(("spec", "autoscalerOptions", "version"), "v3"), "'v3' is not one of",
                 id="not-in-enum"),
    pytest.param("raycluster.yaml", _drop((*GPU, "groupName")), "'groupName' is a required property",
                 id="missing-required"),
    pytest.param("raycluster.yaml", _drop(HEAD), "'headGroupSpec' is a required property", id="missing-head"),
    pytest.param("raycluster.yaml", _put((*HEAD, "template", "spec", "volumes", 1, "name"), "data"),
                 "volumes: duplicate entry", id="duplicate-volume-name"),
    pytest.param("raycluster.yaml", _put(("apiVersion",), "ray.io/v2"), "does not serve RayCluster as v2",
                 id="unserved-version"),
    pytest.param("rayjob-mine.yaml", _rename(("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"),
                 "'shutdownAfterJobFinish' was unexpected", id="rayjob-misspelled-field"),
    pytest.param("rayjob-mine.yaml", _put(("spec", "ttlSecondsAfterFinished"), "600"),
                 "ttlSecondsAfterFinished: '600' is not of type 'integer'", id="rayjob-string-for-integer"),
    pytest.param("rayjob-pretrain.yaml", _rename(("spec", "rayClusterSpec", "headGroupSpec"), "headGroup"),
                 "rayClusterSpec: 'headGroupSpec' is a required property", id="rayjob-cluster-missing-head"),
])
def test_a_broken_manifest_fails(manifest, mutate, expected):
    doc = copy.deepcopy(documents(KUBERAY / manifest)[0])
    assert crd_errors(doc) == []
    mutate(doc)
    errors = crd_errors(doc)
    assert any(expected in e for e in errors), f"the schema let a broken manifest through (errors: {errors})"


def test_a_key_given_twice_fails():
    text = (KUBERAY / "raycluster.yaml").read_text()
    twice = text.replace("  enableInTreeAutoscaling: true\n", "  enableInTreeAutoscaling: true\n  enableInTreeAutoscaling: false\n")
    assert twice != text
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        documents(KUBERAY / "raycluster.yaml", twice)


def test_the_rayjobs_run_the_rayclusters_shape():
    cluster = documents(KUBERAY / "raycluster.yaml")[0]["spec"]
    jobs = [d for name, d in ray_documents() if d["kind"] == "RayJob"]
    assert len(jobs) >= 2
    for job in jobs:
        assert job["spec"]["rayClusterSpec"] == cluster, f"{job['metadata']['name']}: not raycluster.yaml's spec"
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def _pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def test_the_cluster_mirrors_cluster_yaml():
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base == launcher["docker"]["image"], "the image's base is cluster.yaml's image"
    spec = documents(KUBERAY / "raycluster.yaml")[0]["spec"]
    assert base.split(":")[1].startswith(spec["rayVersion"] + "-"), "rayVersion is the image's Ray"
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs no work"
    assert spec["enableInTreeAutoscaling"] is True
    gpu = next(g for g in spec["workerGroupSpecs"] if g["template"]["spec"]["containers"][0]["resources"]
               ["limits"].get("nvidia.com/gpu"))
    assert gpu["minReplicas"] == 0
    assert gpu["maxReplicas"] == launcher["available_node_types"]["gpu_worker"]["max_workers"]
    claims = {d["metadata"]["name"] for d in documents(KUBERAY / "pvc.yaml")}
    for group, pod in _pod_templates(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] in claims, f"{group}: /data"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{group}: /dev/shm"


def _launcher_check(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # as `ray up`: the provider's defaults merged in
    for node_type in prepared["available_node_types"].values():
        # `ray up` has the AWS provider fill these in from the instance types (a call to AWS).
        node_type.setdefault("resources", {})
    validate_config(prepared)


def test_cluster_yaml_validates_against_the_launcher_schema():
    _launcher_check(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


@pytest.mark.parametrize("mutate", [
    pytest.param(_put(("idle_timeout_minute",), 10), id="misspelled-top-level"),
    pytest.param(_rename(("available_node_types", "gpu_worker", "max_workers"), "max_worker"), id="misspelled-node-type"),
    pytest.param(_put(("docker", "pull_before_runs"), True), id="misspelled-docker"),
    pytest.param(_put(("max_workers",), "16"), id="string-for-integer"),
    pytest.param(_put(("head_node_type",), "hed"), id="unknown-head-type"),
])
def test_a_broken_cluster_yaml_fails(mutate):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _launcher_check(config)


def image_project_dir() -> str:
    """Where deploy/Dockerfile puts the checkout (its WORKDIR)."""
    return re.search(r"^WORKDIR\s+(\S+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.MULTILINE).group(1)


def job_rejects(entrypoint: str, monkeypatch, capsys) -> str | None:
    """Why the job an entrypoint names would not start (None: it would): its script, then its own parser."""
    argv = shlex.split(entrypoint)
    if argv[:1] != ["python"] or len(argv) < 2:
        return f"not `python SCRIPT ...`: {entrypoint}"
    prefix = image_project_dir() + "/"
    if not argv[1].startswith(prefix + "jobs/"):
        return f"{argv[1]} is not under {prefix}jobs/, where the image has the jobs"
    script = ROOT / argv[1][len(prefix):]
    if not script.is_file():
        return f"{script.relative_to(ROOT)} does not exist"
    configs = []
    parse_only = dap_ray.config.run_config_job  # the job's own flags and checks, with nothing run

    def run_config_job(cls, run, description, defaults=None):
        parse_only(cls, configs.append, description)

    monkeypatch.setattr(dap_ray.config, "run_config_job", run_config_job)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[2:]])
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return f"{script.name} exits {exc.code}: {capsys.readouterr().err.strip()}"
    finally:
        monkeypatch.undo()
    return None if len(configs) == 1 else f"{script.name} does not parse its flags with run_config_job"


@pytest.mark.parametrize("name", sorted({n for n, d in ray_documents() if d["kind"] == "RayJob"}))
def test_rayjob_entrypoint_names_a_job_and_its_flags(name, monkeypatch, capsys):
    for doc in documents(KUBERAY / name):
        assert job_rejects(doc["spec"]["entrypoint"], monkeypatch, capsys) is None


@pytest.mark.parametrize("entrypoint, expected", [
    pytest.param("python /home/ray/dap_ray/jobs/mine.py --num-gpus-per-actr 1",
                 "unrecognized arguments: --num-gpus-per-actr", id="misspelled-flag"),
    pytest.param("python /home/ray/dap_ray/jobs/mine.py --format folders", "invalid choice: 'folders'",
                 id="not-a-choice"),
    pytest.param("python /home/ray/dap_ray/jobs/pretrain.py --num-workers two", "invalid int value: 'two'",
                 id="not-an-integer"),
    pytest.param("python /home/ray/dap_ray/jobs/pretrain.py --use-gpus", "unrecognized arguments: --use-gpus",
                 id="misspelled-switch"),
    pytest.param("python /home/ray/dap_ray/jobs/mine.py --actors 8 1", "actors must be MIN MAX",
                 id="rejected-by-the-config"),
    pytest.param("python /home/ray/dap_ray/jobs/mining.py --input /data", "jobs/mining.py does not exist",
                 id="no-such-script"),
    pytest.param("python jobs/mine.py --input /data", "where the image has the jobs", id="relative-script"),
])
def test_a_broken_entrypoint_fails(entrypoint, expected, monkeypatch, capsys):
    reason = job_rejects(entrypoint, monkeypatch, capsys)
    assert reason is not None and expected in reason, reason
