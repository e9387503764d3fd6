"""deploy/: KubeRay manifests validate against the CRDs, RayJobs name loadable recipes, the
Grafana dashboard covers every r1lab metric, and every GPU recipe loads."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.tools.plan import GiB, make_plan, parse_cluster


pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT.parent / "shared" / "kuberay"
DEPLOY = ROOT / "deploy"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
METRICS = ("ray_r1lab_rollout_tokens_per_second", "ray_r1lab_rollout_groups_total",
           "ray_r1lab_reward_seconds", "ray_r1lab_reward_timeouts_total",
           "ray_r1lab_learner_tokens_per_second", "ray_r1lab_weight_push_seconds",
           "ray_r1lab_buffer_groups", "ray_r1lab_staleness_steps")


def manifests() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc]


def ray_docs(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in manifests() if d.get("kind") == kind]


def structural(schema):
    """The CRD schema as the API server applies it: unknown fields are pruned there, so
    here they are errors (typos would otherwise pass silently), except under
    x-kubernetes-preserve-unknown-fields. Other x-kubernetes-* keys (int-or-string, list
    and map types, CEL validations) need the API server and are dropped."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: structural(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


def crd_schema(kind: str, version: str) -> dict:
    path = KUBERAY / CRDS[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (../shared/kuberay); cannot validate {kind}")
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return structural(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{path} has no version {version}")


def test_deploy_has_a_cluster_and_a_job_per_gpu_recipe() -> None:
    assert len(ray_docs("RayCluster")) == 1
    recipes = sorted(p.stem for p in (ROOT / "configs" / "gpu").glob("*.yaml"))
    assert sorted(p.stem.removeprefix("rayjob-") for p, _ in ray_docs("RayJob")) == recipes


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_manifests_validate_against_kuberay_crds(kind: str) -> None:
    import jsonschema

    for path, doc in ray_docs(kind):
        group, _, version = doc["apiVersion"].partition("/")
        assert group == "ray.io", path
        validator = jsonschema.Draft7Validator(crd_schema(kind, version))
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_schema_check_catches_a_typo() -> None:
    import jsonschema

    _, doc = ray_docs("RayJob")[0]
    bad = json.loads(json.dumps(doc))
    bad["spec"]["entrypiont"] = bad["spec"].pop("entrypoint")
    assert list(jsonschema.Draft7Validator(crd_schema("RayJob", "v1")).iter_errors(bad))


def cluster_specs() -> list[tuple[Path, dict]]:
    """Every RayCluster spec: the shared cluster's and those RayJobs bring along."""
    return [(p, d["spec"]) for p, d in ray_docs("RayCluster")] + [
        (p, d["spec"]["rayClusterSpec"]) for p, d in ray_docs("RayJob") if "rayClusterSpec" in d["spec"]]


@pytest.mark.parametrize("path, spec", cluster_specs(), ids=lambda x: getattr(x, "name", ""))
def test_gpu_workers_have_gpus_shm_and_auth(path: Path, spec: dict) -> None:
    cluster = {"spec": spec}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {8265, 8080}
    for group in cluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        c = pod["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and any(m["mountPath"] == "/dev/shm" and m["name"] == shm[0]["name"] for m in c["volumeMounts"])
    for c in [head] + [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # never a literal token


def test_rayjob_entrypoints_name_configs_that_load() -> None:
    for path, job in ray_docs("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:3] == ["r1lab", "run", "grpo"], path
        config = Path(argv[argv.index("-c") + 1])
        assert (ROOT / config).is_file(), f"{path.name}: {config} is not in the repo"
        assert path.stem == f"rayjob-{config.stem}"
        cfg = load_config(ROOT / config, argv[argv.index("-c") + 2:])
        assert cfg.learner.backend == "nccl" and cfg.cluster.gpus_per_learner > 0
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert "working_dir" in runtime_env or "image_uri" in runtime_env
        submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
        assert any(e["name"] == "RAY_AUTH_TOKEN" for e in submitter["env"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "gpu").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_recipes_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.learner.dtype == "bf16" and cfg.learner.backend == "nccl"
    assert cfg.grpo.samples_per_prompt == 16 and cfg.rollout.temperature == 1.0
    assert cfg.cluster.gpus_per_rollout_engine > 0 and cfg.cluster.gpus_per_learner > 0
    assert cfg.rewards.accuracy_reward == "math_accuracy"
    assert cfg.model.path.startswith("Qwen/")  # a hub id: nothing in the repo to go stale


def test_grafana_dashboard_covers_every_metric() -> None:
    dash = json.loads((DEPLOY / "grafana" / "r1lab-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    text = "\n".join(exprs)
    for name in METRICS:
        assert re.search(rf"\b{name}(_bucket|_sum|_count)?\{{", text), f"no panel queries {name}"
    for suffix in ("_bucket", "_sum", "_count"):  # the reward histogram, used as one
        assert f"ray_r1lab_reward_seconds{suffix}" in text
    assert "ray_r1lab_reward_seconds{" not in text  # a histogram has no bare series
    assert all('run=~"$run"' in e for e in exprs)
    assert any(v["name"] == "run" for v in dash["templating"]["list"])


def test_multi_node_rayjobs_bring_the_cluster_their_recipe_plans_for() -> None:
    """A RayJob with a cluster of its own: its GPU workers are the nodes its recipe is
    written for (the recipe's ``--cluster NxG``), the plan fits them, every pod mounts the
    PVC of deploy/pvc.yaml at /data, and the run writes there (``run.storage``)."""
    (pvc,) = [d for p, d in manifests() if d.get("kind") == "PersistentVolumeClaim"]
    jobs = [(p, d) for p, d in ray_docs("RayJob") if "rayClusterSpec" in d["spec"]]
    assert jobs, "no RayJob brings a multi-node cluster"
    for path, job in jobs:
        spec = job["spec"]
        argv = shlex.split(spec["entrypoint"])
        recipe = ROOT / argv[argv.index("-c") + 1]
        written_for = re.search(r"--cluster (\d+x\d+)", recipe.read_text())
        assert written_for, f"{recipe.name} names no --cluster NxG"
        nodes, gpus = parse_cluster(written_for.group(1))
        (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == nodes >= 2, path.name
        worker = group["template"]["spec"]["containers"][0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == gpus
        assert spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec
        assert "run.storage=/data/runs" in argv  # the PVC's mount, the same path on every node
        plan = make_plan(load_config(recipe, argv[argv.index("-c") + 2:]), nodes, gpus, 80 * GiB)
        assert plan.ok, "\n".join(plan.lines())
        assert {a.node for a in plan.actors if a.gpus} == set(range(nodes))
        pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
        for pod in pods:
            claims = {v["name"] for v in pod["volumes"]
                      if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert any(mounts.get(c) == "/data" for c in claims), f"{path.name}: a pod without the PVC at /data"
            assert pod["containers"][0]["image"] == spec["submitterPodTemplate"]["spec"]["containers"][0]["image"]
