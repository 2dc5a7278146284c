"""Validate rendered Kubernetes manifests (the output of `kustomize build`).

Built-in kinds are checked against the Kubernetes OpenAPI schemas that kubernetes-validate
ships, strictly (an unknown field fails), for each Kubernetes version given. A PyTorchJob is
checked against schemas/pytorchjob-kubeflow-v1.schema.json (the fields fraudflow uses), and
each of its pod templates as a core PodTemplate. A kind with no schema fails: nothing passes
unchecked.

    python deploy/k8s/validate.py [--kubernetes-version 1.30 ...] RENDERED.yaml ...

Prints one line per resource and version; exits 1 if any resource fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

PYTORCHJOB_SCHEMA = Path(__file__).parent / "schemas" / "pytorchjob-kubeflow-v1.schema.json"
# The oldest Kubernetes the manifests claim, and the newest that kubernetes-validate knows.
DEFAULT_VERSIONS = ("1.30", latest_version())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--kubernetes-version", action="append", dest="versions")
    args = parser.parse_args(argv)
    versions = args.versions or list(DEFAULT_VERSIONS)
    failures = 0
    for path in args.files:
        for resource in _resources(path):
            for version in versions:
                errors = list(_errors(resource, version))
                name = f"{path.name}: {resource['kind']}/{resource['metadata']['name']}"
                status = "FAIL" if errors else "ok"
                print(f"{status} {name} (Kubernetes {version})")
                for error in errors:
                    print(f"    {error}")
                failures += bool(errors)
    return 1 if failures else 0


def _resources(path: Path) -> Iterator[dict[str, Any]]:
    for document in yaml.safe_load_all(path.read_text()):
        if document:  # a kustomization renders no empty documents, but a hand-written file may
            yield document


def _errors(resource: dict[str, Any], version: str) -> Iterator[str]:
    if resource.get("kind") == "PyTorchJob":
        yield from _pytorchjob_errors(resource, version)
        return
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(top level)"
        yield f"{where}: {exc.message}"
    except SchemaNotFoundError as exc:
        yield f"no schema: {exc.message}"


def _pytorchjob_errors(resource: dict[str, Any], version: str) -> Iterator[str]:
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(resource), key=lambda e: list(e.path)):
        where = ".".join(str(part) for part in error.path) or "(top level)"
        yield f"{where}: {error.message}"
    replicas = resource.get("spec", {}).get("pytorchReplicaSpecs", {})
    for replica_type, spec in replicas.items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{resource['metadata']['name']}-{replica_type.lower()}"},
            "template": spec.get("template", {}),
        }
        for error in _errors(pod_template, version):
            yield f"spec.pytorchReplicaSpecs.{replica_type}.{error}"


if __name__ == "__main__":
    sys.exit(main())
