"""The Dockerfile: hadolint-clean, multi-stage, non-root, entrypoint actex, an accelerator
build argument; its versions come from constraints.txt, which agrees with pyproject.toml."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE_EXTRAS = ("gcs", "s3", "ray", "cpu")  # what constraints.txt was resolved for


def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))  # read only


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier  # exactly one, and it must be ==
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--format", "json", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_multi_stage_non_root_entrypoint_actex():
    parser = dockerfile()
    stages = [i for i in parser.structure if i["instruction"] == "FROM"]
    assert len(stages) >= 2
    final = [i for i in parser.structure if i["startline"] > stages[-1]["startline"]]
    (user,) = [i["value"] for i in final if i["instruction"] == "USER"]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()  # numeric: runAsNonRoot can check it
    (entrypoint,) = [json.loads(i["value"]) for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entrypoint == ["actex"]
    assert any(i["instruction"] == "COPY" and "--from=build" in i["value"] for i in final)


def test_accelerator_argument_names_the_projects_extras():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG ACCELERATOR=cpu$", text, re.M)
    (choices,) = re.findall(r'case "\$\{ACCELERATOR\}" in ([\w|]+)\)', text)
    assert choices.split("|") == ["cpu", "tpu", "cuda"]
    extras = PROJECT["optional-dependencies"]
    assert [Requirement(r).extras for r in extras["tpu"]] == [{"tpu"}] and Requirement(extras["cuda"][0]).name == "jax"
    (default_extras,) = re.findall(r"^ARG EXTRAS=([\w,]+)$", text, re.M)
    assert set(default_extras.split(",")) <= set(extras)


def test_versions_come_from_constraints_that_agree_with_pyproject():
    parser = dockerfile()
    installs = [i["value"] for i in parser.structure if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert installs
    for command in installs:
        words = shlex.split(command.split("&&")[0])
        assert words[words.index("--constraint") + 1] == "constraints.txt", command
        assert "==" not in command  # no second place that pins a version
    (python,) = re.findall(r"^ARG PYTHON_VERSION=([\d.]+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert Version(python) in SpecifierSet(PROJECT["requires-python"])

    pins = constraints()
    direct = [*PROJECT["dependencies"], *(r for extra in IMAGE_EXTRAS for r in PROJECT["optional-dependencies"][extra])]
    for line in direct:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {name}"
        assert pins[name] in requirement.specifier, f"constraints.txt pins {name}=={pins[name]}, pyproject wants {requirement.specifier}"
    assert pins["jax"] == pins["jaxlib"]


def test_build_context_holds_what_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    parser = dockerfile()
    copied = set()
    for instruction in parser.structure:
        if instruction["instruction"] == "COPY" and "--from=" not in instruction["value"]:
            copied.update(shlex.split(instruction["value"])[:-1])
    assert copied == allowed and all((ROOT / path).exists() for path in copied)


def _lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """A hash lock's requirements: name -> (pinned version, its sha256s)."""
    out = {}
    for requirement in path.read_text().replace("\\\n", " ").splitlines():
        if requirement.strip() and not requirement.lstrip().startswith("#"):
            words = requirement.split()
            name, version = words[0].split("==")
            out[canonicalize_name(name)] = (Version(version), [w.split("sha256:")[1] for w in words[1:] if w.startswith("--hash=sha256:")])
    return out


def test_the_image_and_the_tpu_vms_install_from_hash_locks_that_agree_with_constraints():
    """The Dockerfile's install line and the TPU VM bootstrap both use pip --require-hashes
    with a lock `make lock` wrote; every locked package has a sha256 and, where
    constraints.txt pins it too, the same version."""
    from actex.fleet.bootstrap import VM_LOCK, Payload, startup_script

    (install,) = [i["value"] for i in dockerfile().structure if i["instruction"] == "RUN" and "--require-hashes" in i["value"]]
    assert "-r requirements/build.lock" in install and '-r "$lock"' in install and "--no-build-isolation" in install
    (default_extras,) = re.findall(r"^ARG EXTRAS=([\w,]+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert "make lock LOCKS=${name}" in install and re.search(r"^lock: ", (ROOT / "Makefile").read_text(), re.M)
    pins = constraints()
    for accelerator in ("cpu", "tpu", "cuda"):  # requirements/<accelerator>-<extras>.lock for the default EXTRAS
        lock = _lock(ROOT / "requirements" / f"{accelerator}-{default_extras.replace(',', '-')}.lock")
        assert lock["jax"][0] == pins["jax"] and "actex" not in lock
        for name, (version, hashes) in lock.items():
            assert hashes and all(len(h) == 64 for h in hashes), name
            assert name not in pins or pins[name] == version, f"{name}: locked {version}, constraints.txt pins {pins[name]}"
    assert _lock(ROOT / "requirements" / "build.lock")["setuptools"][1]
    vm_lock = _lock(ROOT / VM_LOCK)
    assert {"jax", "libtpu", "gcsfs"} <= set(vm_lock) and all(hashes for _, hashes in vm_lock.values())
    script = startup_script("u", "0" * 64, Payload(wheel_url="gs://b/w/actex-0.1.0-py3-none-any.whl", wheel_sha256="0" * 64,
                                                    lock_url=f"gs://b/l/{VM_LOCK.name}", lock_sha256="1" * 64))
    assert f"install -q --require-hashes --only-binary=:all: -r {VM_LOCK.name} -r actex.req" in script
