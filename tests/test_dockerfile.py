"""Static checks of the Dockerfile and .dockerignore (no Docker engine here): both variants resolve to a
base (CUDA for gpu), the install follows the Makefile (torch first, then the project against the same
constraints file, non-editable, no dev extra), the image runs as a numeric non-root user, and the paths
that must be writable under a read-only root filesystem are volumes owned by that user."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(instrs: list[tuple[str, str]]) -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults, and per stage: its FROM, its name and its instructions."""
    global_args: dict[str, str] = {}
    out: list[dict] = []
    for word, rest in instrs:
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            out.append({"from": parts[0], "name": name, "instrs": []})
        elif not out:
            if word == "ARG":
                key, _, default = rest.partition("=")
                global_args[key] = default
        else:
            out[-1]["instrs"].append((word, rest))
    return global_args, out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[dict]]:
    return stages(instructions((REPO / "Dockerfile").read_text()))


def final(dockerfile) -> dict:
    return dockerfile[1][-1]


def runs(stage: dict) -> list[str]:
    return [rest for word, rest in stage["instrs"] if word == "RUN"]


def env_of(stage_list: list[dict], stage: dict) -> dict[str, str]:
    """ENV in effect in a stage, following FROM <earlier stage> chains."""
    by_name = {s["name"]: s for s in stage_list if s["name"]}
    chain, s = [], stage
    while s is not None:
        chain.append(s)
        s = by_name.get(s["from"])
    env: dict[str, str] = {}
    for s in reversed(chain):
        for word, rest in s["instrs"]:
            if word == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = value
    return env


def makefile_installs() -> tuple[str, list[str]]:
    """The Makefile's default TORCH and its pip install lines, in order."""
    text = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH\s*\?=\s*(\S+)", text, re.M).group(1)
    return torch, [line.strip() for line in text.splitlines() if "pip install" in line and "--upgrade pip" not in line]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_each_variant_resolves_to_a_base(dockerfile, variant):
    global_args, stage_list = dockerfile
    assert "VARIANT" in global_args, "the variant is a build arg"
    args = dict(global_args, VARIANT=variant)
    base_name = substitute(final(dockerfile)["from"], args)
    base = next((s for s in stage_list if s["name"] == base_name), None)
    assert base is not None, f"VARIANT={variant}: no stage {base_name}"
    image = substitute(base["from"], args)
    if variant == "gpu":
        assert image.startswith("nvidia/cuda:"), image
        assert global_args["VARIANT"] == "gpu", "the default is the GPU image"
    else:
        assert "cuda" not in image
        assert env_of(stage_list, base).get("TORCH_INDEX_URL", "").endswith("/whl/cpu"), "CPU torch wheel"
    names = {s["name"] for s in stage_list if s["name"]}
    for s in stage_list:
        ref = substitute(s["from"], args)
        if ref not in names:
            tag = ref.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"image {ref} is not pinned to a tag"


def test_install_follows_the_makefile(dockerfile):
    torch, make_lines = makefile_installs()
    stage = final(dockerfile)
    args = {rest.partition("=")[0]: rest.partition("=")[2] for word, rest in stage["instrs"] if word == "ARG"}
    assert args.get("TORCH") == torch, f"Dockerfile TORCH {args.get('TORCH')} != Makefile {torch}"

    installs = [r for r in runs(stage) if "pip install" in r]
    torch_at = next(i for i, r in enumerate(installs) if "${TORCH}" in r)
    project_at = next(i for i, r in enumerate(installs) if re.search(r"\s\.(\s|$)", r) or "'.[" in r)
    assert torch_at < project_at, "torch is installed before the project, as in the Makefile"
    assert "-c" not in shlex.split(installs[torch_at]), "torch goes in first and alone, as in the Makefile"

    make_project = next(line for line in make_lines if "-c " in line)
    constraints = re.search(r"-c\s+(\S+)", make_project).group(1)
    project = shlex.split(installs[project_at].split("&&")[0])
    assert "-c" in project, f"the project is installed against {constraints}, as in the Makefile"
    assert ["-c", constraints] == project[project.index("-c"):project.index("-c") + 2], "same constraints file"
    assert (REPO / constraints).is_file()
    assert "-e" not in project and "--editable" not in project, "the image installs the project non-editable"
    assert not any("[dev]" in w for w in project), "no dev extra in the image"
    for r in installs:
        words = shlex.split(r.split("&&")[0])
        if "pip" in words and "${TORCH}" not in r and "--upgrade" not in words:
            assert "-c" in words, f"every other pip install is constrained: {r}"


def test_runs_as_a_numeric_non_root_user(dockerfile):
    stage = final(dockerfile)
    users = [rest for word, rest in stage["instrs"] if word == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} is not a numeric non-root UID"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    words = [w for w, _ in stage["instrs"]]
    assert "RUN" not in words[words.index("USER"):], "nothing runs as root after USER"
    created = " ".join(runs(stage))
    assert re.search(rf"useradd\b.*--uid {uid}\b", created), "the user exists in /etc/passwd"


def test_writable_paths_are_volumes_owned_by_the_user(dockerfile):
    stage = final(dockerfile)
    env = env_of(dockerfile[1], stage)
    uid = [rest for word, rest in stage["instrs"] if word == "USER"][-1].split(":")[0]
    volumes = [v for word, rest in stage["instrs"] if word == "VOLUME" for v in re.findall(r"/[\w/.-]+", rest)]
    hf_home = env.get("HF_HOME", "")
    owner = next((v for v in volumes if hf_home == v or hf_home.startswith(v + "/")), None)
    assert owner, f"HF_HOME={hf_home!r} is not under a VOLUME ({volumes})"
    created = " ".join(runs(stage))
    assert f"mkdir -p {hf_home}" in created and re.search(rf"chown -R {uid}:\d+ {owner}\b", created)
    assert env.get("MPLCONFIGDIR", "/tmp").startswith("/tmp"), "matplotlib's config dir must be writable"


def test_has_what_kuberay_and_the_scheduler_need(dockerfile):
    stage = final(dockerfile)
    text = " ".join(rest for _, rest in stage["instrs"])
    assert re.search(r"--from=kubectl /bin/kubectl /usr/local/bin/kubectl", text), "the creator pod runs kubectl"
    assert "ray[default]" in text, "KubeRay submits through the dashboard's job server (ray[default])"
    assert "wget" in text, "older KubeRay probes call wget"


def test_python_version_meets_the_project(dockerfile):
    stage = final(dockerfile)
    args = {rest.partition("=")[0]: rest.partition("=")[2] for word, rest in stage["instrs"] if word == "ARG"}
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
    assert tuple(int(x) for x in args["PYTHON_VERSION"].split(".")) >= floor


# --- .dockerignore -------------------------------------------------------------------------------------


def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern that matches a folder covers its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def test_ignore_matcher():
    pats = ["**/__pycache__", "*.egg-info", "tests", "docs/*.png", "!docs/keep.png"]
    assert ignored("feature_store/__pycache__/x.pyc", pats)
    assert ignored("subsume.egg-info/PKG-INFO", pats)
    assert ignored("tests/test_k8s.py", pats) and not ignored("subsume/tests.py", pats)
    assert ignored("docs/a.png", pats) and not ignored("docs/keep.png", pats)


def test_dockerignore_keeps_what_the_install_needs():
    patterns = ignore_patterns()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "configs/constraints.txt", pyproject["project"].get("readme", "README.md")]
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in {p.rstrip("*") for p in packages}:
        needed.append(f"{pkg}/__init__.py")
    for path in needed:
        assert not ignored(path, patterns), f".dockerignore drops {path}, which `pip install .` needs"
    for path in [".venv/bin/python", ".git/HEAD", "subsume/__pycache__/cli.cpython-311.pyc", "demo-work/x"]:
        assert ignored(path, patterns), f".dockerignore should drop {path}"
