"""The package as users meet it: the import-name hazard, the CLI, the README's commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_does_not_mistake_our_kernels_for_hf_kernels():
    """`kernels/` installs as top-level `kernels`, the import name of HF's hub-kernels package.

    transformers probes it (find_spec + distribution version); the probe must stay False
    with raysvc installed, or transformers would try to load hub kernels from our code.
    Run in a fresh interpreter from the repo root, where `kernels/` is on sys.path too.
    """
    code = ("import kernels, transformers.utils.import_utils as iu; "
            "assert kernels.__file__.startswith({!r}), kernels.__file__; "
            "print(iu.is_kernels_available())".format(str(ROOT / "kernels")))
    for cwd in (ROOT, ROOT / "tests"):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "False"


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
