"""The container, the pins and the quick start agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pinned_versions(requirements: Path) -> dict[str, str]:
    """name -> version for every `name==version` line of a requirements file."""
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_dockerfile_base_image_matches_pinned_tensorflow():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+tensorflow/tensorflow:(\S+)-gpu-jupyter\s*$", dockerfile, re.MULTILINE)
    assert base, "Dockerfile must start FROM an official tensorflow/tensorflow:<version>-gpu-jupyter tag"
    assert base.group(1) == pinned_versions(ROOT / "requirements.txt")["tensorflow"]
    # The check inside the image asserts the same version.
    assert f"tf.__version__ == '{base.group(1)}'" in dockerfile


def test_every_runtime_dependency_is_pinned():
    for path in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "-r")):
                assert "==" in line, f"{path}: {line} is not pinned"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    for name, pinned in pinned_versions(ROOT / "requirements.txt").items():
        assert version(name) == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def test_quick_start_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    # CI runs the quick start's test command itself: a command line, not a comment.
    commands = [line.split("#", 1)[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in commands
    # The edit-test loop: make test-fast runs the tests not marked slow.
    fast = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert fast and '-m "not slow"' in fast.group(1)


def test_dockerfile_runs_as_a_user_and_copies_only_an_allowlist():
    """No root in the container; no data, HDF5 file or checkpoint of the build folder in it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)\s*$", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert dockerfile.index("USER") > dockerfile.index("COPY --chown")  # after the files are in
    assert "--allow-root" not in dockerfile
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # everything ignored first, then the code re-included
    included = [rule[1:] for rule in rules if rule.startswith("!")]
    assert "gbmpcnsl/" in included and "requirements.txt" in included and "step*.ipynb" in included
    assert not any(part in rule for rule in included for part in ("data", ".h5", ".keras", "*/"))
    assert {"**/*.h5", "**/*.keras"} <= set(rules[rules.index(f"!{included[-1]}") :])


def test_docs_publish_jupyter_on_the_loopback_only():
    text = (ROOT / "docs" / "deployment.md").read_text()
    assert "-p 127.0.0.1:8888:8888" in text
    assert not re.search(r"-p\s+8888:8888", text)
