"""The `npu` extra resolves: the pinned torch_npu wheels, as published for every Ascend host platform and every Python
that pyproject.toml allows, declare the torch that the project pins, and a numpy inside both the base and the `npu`
bounds is published for each of them (CANN before 9.0 needs numpy<2).

pip reads the wheels' metadata from the configured package index (PEP 658 metadata files: nothing is downloaded or
installed). An unreachable index fails this test with pip's own message: a skip here would hide an install that
cannot resolve on the cluster."""
import json
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Ascend servers ship with both CPU architectures (Kunpeng aarch64, x86_64); torch_npu publishes manylinux_2_28 wheels.
ARCHES = ("aarch64", "x86_64")
# A glibc >= 2.28 host also takes the older manylinux wheels (numpy 1.26 is manylinux_2_17); pip does not infer them
# from an explicit --platform, so each is named.
MANYLINUX = ("manylinux_2_28", "manylinux_2_17", "manylinux2014")


def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def pinned(requirements: list[str], name: str) -> Requirement:
    (req,) = [r for r in map(Requirement, requirements) if r.name.replace("_", "-") == name]
    return req


def supported_pythons() -> list[str]:
    allowed = SpecifierSet(project()["requires-python"])
    return [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}" in allowed]


def exact_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} must pin one exact version"
    return Version(spec.version)


def resolve_wheels(requirements: list[str], arch: str, python: str, target: Path) -> dict[str, dict]:
    """The wheel pip would pick for each requirement on that Linux arch/Python: {name: pip's report entry}."""
    platforms = [arg for tag in MANYLINUX for arg in ("--platform", f"{tag}_{arch}")]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--no-deps",
           "--ignore-installed", "--only-binary=:all:", *platforms, "--python-version", python,
           "--target", str(target), "--retries", "1", "--timeout", "30", "--disable-pip-version-check",
           *requirements]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if run.returncode != 0:
        pytest.fail(f"pip could not read {requirements} for Linux {arch} / Python {python} from the package index "
                    f"(network or index down, or no such wheel): {run.stderr.strip()[-1500:]}\n"
                    "This check needs the package index that CI installs from; it does not skip.")
    return {entry["metadata"]["name"].replace("_", "-").lower(): entry for entry in json.loads(run.stdout)["install"]}


def test_pyproject_npu_bounds_are_consistent():
    """Offline part: torch_npu is pinned exactly and the numpy bound of the extra fits inside the base bound."""
    proj = project()
    npu = proj["optional-dependencies"]["npu"]
    torch_npu = pinned(npu, "torch-npu")
    torch = pinned(proj["dependencies"], "torch")
    # torch_npu's version is the torch release it was built for (2.9.1 -> torch 2.9.1; post releases keep the prefix).
    assert exact_version(torch_npu).release[:3] == exact_version(torch).release[:3], (torch_npu, torch)
    numpy_npu = pinned(npu, "numpy").specifier
    numpy_base = pinned(proj["dependencies"], "numpy").specifier
    assert "2.0.0" not in numpy_npu, "CANN < 9.0 needs numpy<2 in the npu extra"
    assert "1.26.4" in numpy_npu and "1.26.4" in numpy_base, (numpy_npu, numpy_base)


def test_published_torch_npu_wheels_require_the_pinned_torch(tmp_path):
    proj = project()
    npu = proj["optional-dependencies"]["npu"]
    torch_npu = pinned(npu, "torch-npu")
    torch = pinned(proj["dependencies"], "torch")
    numpy_both = SpecifierSet(str(pinned(proj["dependencies"], "numpy").specifier)) & pinned(npu, "numpy").specifier
    pythons = supported_pythons()
    assert pythons, f"no Python 3.x matches requires-python {proj['requires-python']!r}"
    checked = []
    for arch in ARCHES:
        for python in pythons:
            wheels = resolve_wheels([str(torch_npu), f"numpy{numpy_both}"], arch, python, tmp_path / "t")
            meta = wheels["torch-npu"]["metadata"]
            wheel = wheels["torch-npu"]["download_info"]["url"].rsplit("/", 1)[-1]
            assert wheel.endswith(f"manylinux_2_28_{arch}.whl"), wheel
            where = f"{wheel} (Python {python})"
            assert Version(meta["version"]) == exact_version(torch_npu), where
            torch_reqs = [Requirement(r) for r in meta.get("requires_dist", []) if Requirement(r).name == "torch"]
            assert len(torch_reqs) == 1, f"{where}: Requires-Dist {meta.get('requires_dist')}"
            wanted = exact_version(torch_reqs[0])
            # x86_64 wheels require the +cpu local build (PyTorch's CPU index); the public version must be our pin
            # and our pin (a public version) must accept that build.
            assert wanted.public == str(exact_version(torch)), \
                f"{where} requires {torch_reqs[0]}, pyproject pins {torch}"
            assert wanted in torch.specifier, f"{where}: {torch} does not accept {wanted}"
            for req in meta.get("requires_dist", []):
                if Requirement(req).name == "numpy":
                    assert Version(wheels["numpy"]["metadata"]["version"]) in Requirement(req).specifier, req
            assert Version(wheels["numpy"]["metadata"]["version"]) in numpy_both
            checked.append((arch, python, str(wanted)))
    assert len(checked) == len(ARCHES) * len(pythons)
