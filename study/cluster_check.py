"""`python -m study.cluster_check [cluster.yaml]`: is a Ray cluster config one this project can run on?

Offline, before `ray up` spends money: Ray's own schema (`prepare_config` + `validate_config`,
which make no cloud call), then what the schema cannot see and each of which stops a study or
loses its results (STACK_NOTES.md, "The AWS cluster launcher"): every node installs through
study/setup.sh (Python >= 3.11, the same recipe as `make install`) with the extras that give
the autoscaler boto3 and the dashboard ray[default]; no ingress rule Ray adds itself (SSH) and
no other port; token auth and a loopback-only dashboard; an instance profile on every worker
type (trials upload checkpoints to the bucket from their node) and one of the head's own, whose role
may pass it (Ray's default head role cannot: EC2 would refuse every worker launch); CPU-only capacity outside the
GPU node types (memory estimates); the hub token mounted from outside the repository.
Exit status 2 and one line per problem when anything fails.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from study.launch import CPU_ONLY

ROOT = Path(__file__).resolve().parent.parent
SETUP = "study/setup.sh"
AUTOSCALER_NEEDS = ("boto3", "ray[default]")


def _commands(cfg: dict[str, Any], *keys: str) -> list[str]:
    return [str(c) for k in keys for c in (cfg.get(k) or [])]


def _extras(command: str) -> set[str]:
    m = re.search(r"--extras[= ]+(\S+)", command)
    return set(m.group(1).split(",")) if m else {"dev"}


def problems(cfg: dict[str, Any], pyproject: dict[str, Any]) -> list[str]:
    """Everything in `cfg` (the raw YAML) that would stop a study on the cluster or lose its results."""
    out: list[str] = []
    setup = _commands(cfg, "setup_commands")
    every = _commands(cfg, "initialization_commands", "setup_commands", "head_setup_commands",
                      "worker_setup_commands")
    installs = [c for c in setup if SETUP in c]
    if not installs:
        out.append(f"setup_commands never run {SETUP}: nodes would not get the project's install (Python >= 3.11)")
    elif not any("--install-python" in c for c in installs):
        out.append(f"{SETUP} runs without --install-python: the AMI's python3 is 3.10 and the project needs >= 3.11")
    for c in every:
        if re.search(r"python[\d.]*\s+-m\s+venv|virtualenv\s", c) or re.search(r"pip3?\s+install", c):
            out.append(f"a setup command installs outside {SETUP} (Python version and pins unchecked): {c.strip()}")
    extras = pyproject["project"].get("optional-dependencies", {})
    chosen = set().union(*(_extras(c) for c in installs)) if installs else set()
    have = " ".join(d for e in chosen for d in extras.get(e, []))
    for need in AUTOSCALER_NEEDS:
        if need not in have:
            out.append(f"no {need} in the installed extras {sorted(chosen)}: the head's autoscaler and dashboard "
                       "run from this venv (boto3 launches workers, ray[default] serves the dashboard)")

    rules = ((cfg.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or []
    for rule in rules:
        ports = range(int(rule.get("FromPort", -1)), int(rule.get("ToPort", rule.get("FromPort", -1))) + 1)
        if 22 in ports:
            out.append("provider.security_group.IpPermissions repeats the SSH rule Ray adds itself "
                       "(a duplicate ingress rule can fail `ray up`)")
        if any(p != 22 for p in ports) or len(ports) == 0:
            out.append(f"provider.security_group.IpPermissions opens port(s) {rule.get('FromPort')}-"
                       f"{rule.get('ToPort')}: only SSH may be reachable (use `ray dashboard` for the dashboard)")

    starts = {k: " ".join(_commands(cfg, k)) for k in ("head_start_ray_commands", "worker_start_ray_commands")}
    for key, text in starts.items():
        if "RAY_AUTH_MODE=token" not in text:
            out.append(f"{key} do not set RAY_AUTH_MODE=token: the cluster would accept unauthenticated clients")
    if "--dashboard-host=127.0.0.1" not in starts["head_start_ray_commands"]:
        out.append("the head's dashboard must listen on 127.0.0.1 only (--dashboard-host=127.0.0.1)")
    mounts = cfg.get("file_mounts") or {}
    if not any(str(dst).endswith(".ray/auth_token") for dst in mounts):
        out.append("file_mounts do not carry ~/.ray/auth_token: nodes cannot join a token-auth cluster")

    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    for name, spec in types.items():
        if name != head and not (spec.get("node_config") or {}).get("IamInstanceProfile"):
            out.append(f"worker type {name!r} has no IamInstanceProfile: its trials cannot write to the bucket")
    passed = sorted({str(p.get("Name") or p.get("Arn")) for n, s in types.items() if n != head
                     for p in [(s.get("node_config") or {}).get("IamInstanceProfile") or {}] if p})
    if passed and not ((types.get(head) or {}).get("node_config") or {}).get("IamInstanceProfile"):
        out.append(f"the head type {head!r} has no IamInstanceProfile of its own: Ray's default head role cannot "
                   f"iam:PassRole the workers' {', '.join(passed)}, so EC2 refuses every worker launch "
                   "(give the head a profile whose role may pass it: README, petl-study-head)")
    if not any((spec.get("resources") or {}).get(CPU_ONLY) and not (spec.get("resources") or {}).get("GPU")
               and not re.match(r"(g|p)\d", str((spec.get("node_config") or {}).get("InstanceType", "")))
               for spec in types.values()):
        out.append(f"no CPU-only node type carries the {CPU_ONLY!r} resource: CPU-only work (memory estimates) "
                   "would start GPU machines")
    text = yaml.safe_dump(cfg)
    if re.search(r"hf_[A-Za-z0-9]{20,}|HF_TOKEN=\S", text):
        out.append("a hub token is written into the cluster config: mount ~/.cache/huggingface/token instead")
    for src in mounts.values():
        if "huggingface/token" in str(src) and not str(src).startswith(("~", "/")):
            out.append(f"the hub token is mounted from {src!r}, inside the repository")
    return out


def check(path: Path) -> list[str]:
    """Ray's schema first (one problem: what it says), then `problems`."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    try:
        validate_config(prepare_config(cfg))
    except Exception as e:  # jsonschema.ValidationError, ValueError: Ray's own message
        return [f"Ray's validator: {str(e).splitlines()[0]}"]
    return problems(cfg, tomllib.loads((ROOT / "pyproject.toml").read_text()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else ROOT / "cluster.yaml")
    if not path.is_file():
        print(f"error: no cluster config at {path}", file=sys.stderr)
        return 2
    found = check(path)
    for p in found:
        print(f"error: {p}", file=sys.stderr)
    if not found:
        print(f"{path}: valid for Ray's schema and this project's cluster checks")
    return 2 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
