"""The package as users meet it: the import-name hazard, the CLI, the README's commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


_IMPORT_NAMES = """
import importlib.util, os, sys
import kernels                      # Hugging Face's hub-kernels package, never ours
assert "site-packages" in kernels.__file__, kernels.__file__
assert hasattr(kernels, "CUDAProperties"), dir(kernels)
import raysvc_kernels.ops, raysvc_kernels.torch_ref
assert os.path.samefile(os.path.dirname(raysvc_kernels.ops.__file__), {kernels_dir!r})
from transformers import AutoConfig, AutoTokenizer
from transformers.integrations import hub_kernels  # the import that found our package
from raysvc.models.builtin import path as builtin_path
cfg = AutoConfig.from_pretrained(builtin_path("tiny"))
tok = AutoTokenizer.from_pretrained(builtin_path("tiny"))
assert cfg.model_type == "llama" and tok("The list type")["input_ids"], cfg
print("ok")
"""


def test_kernels_import_name_is_hugging_faces(tmp_path):
    """`import kernels` is Hugging Face's package (a dependency of transformers >= 5.25, whose
    hub_kernels module imports it on every transformers model import); ours is
    `raysvc_kernels`. From the repo root (where `kernels/` is on sys.path: kernels/ has no
    __init__.py, so HF's regular package wins) and from elsewhere, and transformers loads
    the built-in model's config and tokenizer in both."""
    from importlib.metadata import version

    assert version("kernels")  # HF's distribution is installed: the hazard is live here
    code = _IMPORT_NAMES.format(kernels_dir=str(ROOT / "kernels"))
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (cwd, out.stderr[-3000:])


def test_kernels_import_name_in_ray_workers(tmp_path):
    """Ray workers get the driver's sys.path (the repo root when pytest runs from there):
    an actor sees HF's `kernels` and raysvc's `raysvc_kernels` too."""
    code = (
        "import os, ray\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "@ray.remote\n"
        "def where():\n"
        "    import kernels, raysvc_kernels.ops\n"
        "    import transformers.integrations.hub_kernels\n"
        "    return kernels.__file__, raysvc_kernels.ops.__file__\n"
        "print(ray.get(where.remote(), timeout=120))\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    hf, ours = eval(out.stdout.strip().splitlines()[-1])
    assert "site-packages" in hf and ours.startswith(str(ROOT / "kernels")), (hf, ours)


def test_package_list_matches_the_tree():
    """pyproject lists packages by hand (kernels/ maps to `raysvc_kernels`); a new raysvc
    subpackage missing from that list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = sorted(str(p.parent.relative_to(ROOT)).replace("/", ".")
                     for p in (ROOT / "raysvc").rglob("__init__.py"))
    assert sorted(listed["packages"]) == sorted([*on_disk, "raysvc_kernels"])
    assert listed["package-dir"] == {"raysvc_kernels": "kernels"}
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_wheel_installs_under_its_own_names(tmp_path):
    """The wheel as a user's `pip install` gets it: raysvc_kernels and the built-in model
    inside, no top-level `kernels`."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("raysvc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "raysvc_kernels/triton_attention.py" in names and "raysvc_kernels/ops.py" in names
    assert "raysvc/models/builtin/tiny/model.safetensors" in names
    assert not any(n.startswith("kernels/") for n in names)
    top = {n.split("/")[0] for n in names if not n.startswith("raysvc-")}
    assert top == {"raysvc", "raysvc_kernels"}, top


def test_cli_generate(make_checkpoint):
    path, _ = make_checkpoint("llama")
    env = {**os.environ, "RAY_AUTH_MODE": ""}
    env.pop("RAY_AUTH_MODE")
    out = subprocess.run([sys.executable, "-m", "raysvc.cli", "generate", "The list type",
                          "--model", path, "--max-tokens", "5"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "'The list type' ->" in out.stdout and "[length, 5 tokens]" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "raysvc.cli", "generate", "x", "--model", path,
                          "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_tokens" in bad.stderr


def test_cli_sets_ray_auth_mode():
    from raysvc import cli

    saved = os.environ.pop("RAY_AUTH_MODE", None)
    try:
        cli._set_process_env()
        assert os.environ["RAY_AUTH_MODE"] == "disabled"
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        if saved is not None:
            os.environ["RAY_AUTH_MODE"] = saved


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
    for dep in ("torch==2.13.0",):
        assert dep in (ROOT / "pyproject.toml").read_text()


def _lock() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver and " " not in ver, f"deploy/constraints.txt: {line!r} is not a pin"
            pins[canonicalize_name(name)] = ver
    return pins


def test_every_install_path_uses_the_lock():
    """README's two commands, .ci/run and the image install with deploy/constraints.txt."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S).group(1)
    for command in filter(None, block.splitlines()):
        assert "pip install -c deploy/constraints.txt " in command, command
    assert "-c deploy/constraints.txt -e '.[dev]'" in (ROOT / ".ci" / "run").read_text()
    docker = (ROOT / "k8s" / "Dockerfile").read_text()
    assert "COPY --chown=ray:users deploy/constraints.txt" in docker
    assert docker.count("pip install --no-cache-dir -c deploy/constraints.txt") == 3
    assert "bash deploy/lock.sh" in readme


def test_lock_satisfies_pyproject_and_is_what_is_installed():
    """Every dependency pyproject names (extras too) is pinned, inside pyproject's range;
    torch carries no local label (the CUDA build must satisfy it). Where the environment was
    installed with the lock (CI, README), the installed versions are the pinned ones."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for spec in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (spec, pins[name])
    assert "+" not in pins["torch"]
    mismatched = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # an extra this environment did not install (bench's matplotlib)
        if Version(installed).public != Version(pinned).public:
            mismatched[name] = (pinned, installed)
    if mismatched and os.environ.get("CI"):
        pytest.fail(f"installed versions differ from deploy/constraints.txt: {mismatched}")


@pytest.mark.parametrize("host, key, allow, refused", [
    ("127.0.0.1", None, False, False),
    ("localhost", None, False, False),
    ("::1", None, False, False),
    ("0.0.0.0", None, False, True),
    ("0.0.0.0", "k", False, False),
    ("0.0.0.0", None, True, False),
    ("10.1.2.3", None, False, True),
])
def test_serve_fails_closed_without_a_key_off_loopback(monkeypatch, host, key, allow, refused):
    from raysvc.cli import check_exposure
    from raysvc.serve.args import ServeArgs

    monkeypatch.delenv("RAYSVC_API_KEY", raising=False)
    args = ServeArgs(api_key=key, allow_unauthenticated=allow)
    if refused:
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            check_exposure(host, args)
    else:
        check_exposure(host, args)


def test_cli_refuses_an_open_host_without_a_key():
    env = {k: v for k, v in os.environ.items() if k != "RAYSVC_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "raysvc.cli", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "--allow-unauthenticated" in out.stderr, out.stderr
