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
