"""Every role installs alone, with only its own dependencies, and the images follow suit.

The workspace members (shared/, services/<role>/) are separate distributions in one import
namespace, so an undeclared cross-member import still works in the full dev venv and only
breaks in a role's own image. These tests catch that from the sources (declared dependencies,
static imports, Dockerfile/compose targets) and, once, for real: a fresh venv with the api
role alone.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

# The members that run environments or models: torch and its relatives are theirs alone.
HEAVY = {"torch", "transformers", "trl"}
TORCH_ROLES = {"runner", "implementer", "rl-trainer", "cli"}
SHARED = REPO_ROOT / "shared"
SERVICES = sorted(p.parent for p in (REPO_ROOT / "services").glob("*/pyproject.toml"))
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def declared(member: Path) -> set[str]:
    """Names of a member's dependencies, its extras' included."""
    project = tomllib.loads((member / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {requirement_name(r) for r in requirements}


def module_of(role: str) -> str:
    return role.replace("-", "_")


def test_workspace_members_are_found():
    # Guards the tests below against passing vacuously on a moved layout.
    roles = {p.name for p in SERVICES}
    assert {"api", "cli", "evolver", "ideator", "implementer", "runner", "rl-trainer"} <= roles
    assert (SHARED / "pyproject.toml").is_file()


@pytest.mark.parametrize("member", [SHARED, *SERVICES], ids=lambda p: p.name)
def test_member_declares_only_what_its_role_needs(member: Path):
    deps = declared(member)
    if member.name not in TORCH_ROLES:
        assert not deps & HEAVY, f"{member.name} must not depend on {sorted(deps & HEAVY)}"
    services = {f"groundloop-{p.name}" for p in SERVICES}
    if member.name != "cli":
        # A service depending on another ships that one's code (and dependencies) in its image.
        assert not deps & services, f"{member.name} depends on services {sorted(deps & services)}"
    if member != SHARED:
        assert "groundloop-shared" in deps, f"{member.name} uses groundloop.* but omits shared"


def groundloop_imports(path: Path, package: list[str]) -> list[tuple[int, str]]:
    """(line, top-level groundloop subpackage) for every groundloop import in a file, relative
    ones resolved against `package` (the file's package, e.g. ["groundloop", "api"])."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.stmt | ast.expr):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from groundloop import events` names the subpackage in the alias.
            names = (
                [f"{module}.{a.name}" for a in node.names] if module == "groundloop" else [module]
            )
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            parts = name.split(".")
            if parts[0] == "groundloop" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_services_never_import_each_other():
    root = SHARED / "src" / "groundloop"
    shared_modules = {p.stem for p in root.iterdir() if p.suffix == ".py" or p.is_dir()}
    shared_modules.discard("__pycache__")
    service_modules = {module_of(p.name) for p in SERVICES}
    assert shared_modules and not shared_modules & service_modules
    everything = shared_modules | service_modules
    violations = []
    for member in [SHARED, *SERVICES]:
        src = member / "src"
        own = set() if member == SHARED else {module_of(member.name)}
        allowed = everything if member.name == "cli" else shared_modules | own
        for path in sorted(src.glob("groundloop/**/*.py")):
            package = list(path.relative_to(src).parent.parts)
            for line, module in groundloop_imports(path, package):
                if module not in allowed:
                    where = path.relative_to(REPO_ROOT)
                    violations.append(f"{where}:{line} imports groundloop.{module}")
    assert not violations, "cross-member imports (declare or move the code):\n" + "\n".join(
        violations
    )


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> what it is built FROM."""
    stages = {}
    for match in re.finditer(
        r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M | re.I
    ):
        stages[match.group(2)] = match.group(1)
    return stages


def stage_text(name: str) -> str:
    text = DOCKERFILE.read_text()
    start = re.search(rf"^FROM\s+\S+\s+AS\s+{re.escape(name)}\s*$", text, re.M | re.I)
    assert start, f"no stage {name}"
    end = re.search(r"^FROM\s", text[start.end() :], re.M)
    return text[start.end() : start.end() + end.start()] if end else text[start.end() :]


def test_dockerfile_has_one_target_per_role_with_torch_only_where_declared():
    stages = dockerfile_stages()
    roles = [p.name for p in SERVICES]
    assert set(roles) | {"runner-gpu"} <= set(stages), f"missing targets: {sorted(stages)}"

    def ancestry(name: str) -> list[str]:
        chain = [name]
        while chain[-1] in stages:
            chain.append(stages[chain[-1]])
        return chain

    for role in roles:
        text = stage_text(role)
        assert "USER groundloop" in text, f"{role} image must not run as root"
        if role != "cli":
            assert f'"groundloop.{module_of(role)}"' in text, f"{role} image must run its role"
        with_torch = "torch-cpu" in ancestry(role)
        assert with_torch == (role in TORCH_ROLES), f"{role}: torch in image = {with_torch}"
        # The image installs its own member, and no other service's.
        installed = set(re.findall(r"\./services/([a-z-]+)", text))
        others = installed - {role}
        assert role in installed and (role == "cli" or not others), f"{role} installs {installed}"
    assert "USER groundloop" in stage_text("runner-gpu")


def test_compose_and_k8s_use_the_dockerfile_targets():
    import yaml  # test-only: comes with the dev tools (huggingface_hub needs it as well)

    stages = dockerfile_stages()
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yml").read_text())
    services = compose["services"]
    assert {"nats", "postgres", "otel-collector"} <= set(services)
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"api", "evolver", "ideator", "implementer", "runner", "runner-gpu"} <= set(built)
    for name, build in built.items():
        assert build.get("target") in stages, f"compose {name}: target {build.get('target')!r}"
        context = (REPO_ROOT / "deploy" / build["context"]).resolve()
        assert context == REPO_ROOT and (context / build["dockerfile"]) == DOCKERFILE, name
    manifests = list((REPO_ROOT / "deploy" / "k8s").glob("*.yaml"))
    images = [
        c["image"]
        for path in manifests
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    assert images, "no Deployments found in deploy/k8s"
    for image in images:
        target = image.split(":")[0].removeprefix("groundloop-")
        assert target in stages, f"k8s image {image} names no Dockerfile target"


PROBE = """
import importlib, importlib.metadata as md, json
import groundloop.api.app  # the role's own code imports with only its dependencies
missing = {}
for name in ("torch", "transformers", "trl", "groundloop.runner", "groundloop.cli"):
    try:
        importlib.import_module(name)
        missing[name] = None
    except ModuleNotFoundError as e:
        missing[name] = e.name
print(json.dumps({"missing": missing, "requires": md.requires("groundloop-api")}))
"""


@pytest.mark.slow
def test_api_role_installs_alone_without_torch(tmp_path: Path):
    # Copies, so building wheels leaves no build/ in the checkout.
    junk = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(SHARED, tmp_path / "shared", ignore=junk)
    shutil.copytree(REPO_ROOT / "services" / "api", tmp_path / "api", ignore=junk)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=env)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "-q", "-c", REPO_ROOT / "constraints.txt", "./shared", "./api"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"

    listed = subprocess.run(
        [*pip, "list", "--format=json"], env=env, capture_output=True, text=True, check=True
    )
    dists = {requirement_name(d["name"]) for d in json.loads(listed.stdout)}
    assert {"groundloop-api", "groundloop-shared", "fastapi", "sqlmodel"} <= dists
    assert not dists & (HEAVY | {"groundloop-runner", "groundloop-cli"}), sorted(dists)

    probe = subprocess.run(
        [python, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert probe.returncode == 0, f"the api role does not import on its own:\n{probe.stderr}"
    result = json.loads(probe.stdout)
    # Each import fails for the module itself being absent, not for something it imports.
    assert result["missing"] == {name: name for name in result["missing"]}, result["missing"]
    assert not {requirement_name(r) for r in result["requires"]} & HEAVY, result["requires"]
