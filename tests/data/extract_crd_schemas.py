"""Extract the v1 openAPIV3Schema of KubeRay CRDs into compact JSON (descriptions dropped)."""

import json
import os
import sys

import yaml


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k != "description"}
    if isinstance(o, list):
        return [strip(x) for x in o]
    return o


def main(src: str) -> None:
    for kind in ("rayjobs", "rayclusters"):
        crd = yaml.safe_load(open(os.path.join(src, f"ray.io_{kind}.yaml")))
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
        out = os.path.join(os.path.dirname(__file__), f"kuberay-v1.7.0-{kind}-v1.json")
        with open(out, "w") as f:
            json.dump(strip(schema), f, separators=(",", ":"))


if __name__ == "__main__":
    main(sys.argv[1])
