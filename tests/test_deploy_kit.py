"""The deployment kit: systemd units, prepare-pi.sh, example inventories, docker-compose.yml and
the commands README.md shows, each checked against the code it must agree with."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from rpicluster.cli import main as rpicluster_cli
from rpicluster.deploy import systemd
from rpicluster.errors import ConfigError
from rpicluster.inventory import load_inventory
from rpicluster.testing import wait_until

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- CLI parsing


def parse_cli(group: click.Command, argv: list[str], prog: str) -> click.Context:
    """Parse ``argv`` down to the leaf command as click would, without invoking anything."""
    ctx = group.make_context(prog, list(argv))
    while isinstance(ctx.command, click.Group):
        pending = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not pending and ctx.command.invoke_without_command:
            break  # a group that is a command too (`rpicluster runs`)
        name, cmd, rest = ctx.command.resolve_command(ctx, pending)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def parse_rpicluster(argv: list[str], cwd: Path) -> click.Context:
    """Parse an ``rpicluster`` argv; paths it requires to exist are created empty under ``cwd``.

    README commands name files an earlier command makes (a model, a run directory); creating
    them lets every other check (unknown options, missing arguments, bad values) still run.
    """
    for _ in range(5):
        try:
            with contextlib.chdir(cwd):
                return parse_cli(rpicluster_cli, argv, "rpicluster")
        except click.BadParameter as exc:
            ptype = getattr(exc.param, "type", None)
            missing = re.search(r"'([^']+)' does not exist", str(exc.message))
            if not (isinstance(ptype, click.Path) and missing):
                raise
            path = cwd / missing.group(1)
            if ptype.file_okay:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True)
    raise AssertionError(f"could not parse {argv}")


def raw_options(cmd: click.Command, argv: list[str]) -> dict:
    """Options and arguments of ``argv`` as strings, unknown options refused; values are not
    converted (a unit's paths exist on its host, not here)."""
    opts, rest, _ = cmd.make_parser(click.Context(cmd, info_name=cmd.name)).parse_args(argv)
    assert not rest, rest
    return opts


def dask_cli() -> click.Group:
    """The ``dask`` command with the subcommands packages register (scheduler, worker, ...)."""
    from importlib.metadata import entry_points

    import dask.cli

    for ep in entry_points(group="dask_cli"):
        if ep.name not in dask.cli.cli.commands:
            dask.cli.cli.add_command(ep.load(), ep.name)
    return dask.cli.cli


# --------------------------------------------------------------------------- inventories


@pytest.mark.parametrize("name, n_workers, tags", [
    ("paper-cluster.toml", 6, {"rpi4": 4, "x86": 2}),
    ("pi5-shelf.toml", 8, {"rpi5": 8}),
])
def test_example_inventories_load(name, n_workers, tags):
    spec = load_inventory(ROOT / "deploy" / "inventories" / name)
    assert len(spec.workers) == n_workers
    for tag, count in tags.items():
        assert sum(tag in w.tags for w in spec.workers) == count
    assert all(w.memory and w.nthreads >= 4 for w in spec.workers)


# --------------------------------------------------------------------------- systemd units


@pytest.fixture
def inventory(tmp_path, home, free_port):
    """An inventory for this machine: scheduler and a worker on 127.0.0.1, run as the current
    user with this interpreter, state and work directories in tmp_path."""
    path = tmp_path / "cluster.toml"
    path.write_text(f'''
[scheduler]
host = "127.0.0.1"
scheduler_port = {free_port()}
dashboard_port = {free_port()}
[defaults]
user = "{getpass.getuser()}"
python = "{sys.executable}"
local_directory = "{tmp_path / 'work'}"
[[workers]]
host = "127.0.0.1"
nthreads = 2
memory = "1GiB"
tags = ["rpi4"]
env = {{ OMP_NUM_THREADS = "1", ODD = "a \\"quoted\\" 50% $HOME \\\\ value" }}
''')
    return path


def unit_argv(unit: systemd.Unit) -> list[str]:
    """ExecStart= split as systemd splits it (double quotes, backslash escapes, %% and $$)."""
    return [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(unit.exec_start)]


def unit_settings(unit: systemd.Unit) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


class RecordingConnection:
    """Records what ``up`` would create on a host (directories, files) instead of sending it."""

    def __init__(self):
        self.files: list[str] = []

    def makedirs(self, path, mode=0o700):
        pass

    def put_bytes(self, data, path, *, mode=0o600):
        self.files.append(path)


def test_worker_unit_runs_what_up_runs(tmp_path):
    """The paper inventory's Pi unit: the dask worker argv up would start, TLS files where up
    puts them, restart on failure, memory capped above Dask's own limit."""
    from distributed.cli.dask_worker import main as dask_worker

    from rpicluster.deploy.cluster import _push_certs
    from rpicluster.deploy.tls import CertificateAuthority

    spec = load_inventory(ROOT / "deploy" / "inventories" / "paper-cluster.toml")
    pi = spec.workers[0]
    unit = systemd.worker_unit(spec, pi)
    argv = unit_argv(unit)
    assert argv[0] == "/home/pi/.venvs/rpicluster/bin/python"
    assert argv[1:3] == ["-m", "distributed.cli.dask_worker"]
    params = raw_options(dask_worker, argv[3:])
    assert params["scheduler"] == "tls://192.168.1.10:8786" and params["name"] == pi.host
    assert params["nthreads"] == "4" and params["nanny"] and params["memory_limit"] == str(pi.memory)
    assert params["resources"] == "rpi4=4 arm64=4"
    conn = RecordingConnection()
    certs = CertificateAuthority(tmp_path / "ca").issue(pi.name)
    pushed = _push_certs(conn, certs, unit.tls_dir.rsplit("/tls", 1)[0], local=False)
    assert [params["tls_ca_file"], params["tls_cert"], params["tls_key"]] == \
        [pushed["ca"], pushed["cert"], pushed["key"]] == conn.files
    settings = unit_settings(unit)
    assert settings["Restart"] == ["always"] and settings["User"] == ["pi"]
    assert int(settings["MemoryMax"][0]) > pi.memory
    assert 'Environment="OMP_NUM_THREADS=1"' in unit.text
    # Dask's clocks as on every cluster rpicluster starts (config.DASK_DEFAULTS)...
    assert 'Environment="DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=100ms"' in unit.text
    # ...unless the inventory's env chose its own.
    chosen = dataclasses.replace(
        pi, env={**pi.env, "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "20ms"})
    text = systemd.worker_unit(spec, chosen).text
    assert text.count("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL") == 1
    assert 'Environment="DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=20ms"' in text


def test_scheduler_unit_runs_the_start_spec_up_sends(home):
    """One builder (remote.start_spec) for up and the units: the same argv, preload included."""
    from rpicluster.deploy import remote

    spec = load_inventory(ROOT / "deploy" / "inventories" / "paper-cluster.toml")
    unit = systemd.scheduler_unit(spec)
    workdir = unit.tls_dir.rsplit("/tls", 1)[0]
    start = remote.start_spec("scheduler", spec.scheduler, local_directory=workdir,
                              tls=remote.tls_paths(unit.tls_dir))
    argv = unit_argv(unit)
    assert argv[1:] == remote.command(start)[1:]
    # The guard (no client-sent code on the scheduler) first, then the page, then Dask's
    # version check without the noise.
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--preload"] == [
        "rpicluster.deploy.guard", "rpicluster.dashboard", "rpicluster.deploy.versions"]
    assert argv[argv.index("--tls-cert") + 1] == f"{workdir}/tls/node.pem"


def test_units_refuse_values_that_break_them(tmp_path, home):
    path = tmp_path / "bad.toml"
    path.write_text('[scheduler]\nhost = "10.0.0.1"\n[[workers]]\nhost = "pi01"\n'
                    'env = { NOTE = "two\\nlines" }\n')
    with pytest.raises(ConfigError, match=r"worker pi01\.env\.NOTE.*newline"):
        systemd.render_units(path)
    assert systemd.quote_arg("a b", "x") == '"a b"'
    assert systemd.quote_arg('50%"$', "x") == '"50%%\\"$$"'
    assert systemd.host_path("~/x", "/home/pi") == "/home/pi/x"
    assert systemd.host_path("~me/v/bin/python", "/home/pi") == "/home/me/v/bin/python"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_rendered_units_pass_systemd_analyze_verify(inventory, tmp_path):
    kit = systemd.write_units(inventory, tmp_path / "units")
    for unit in kit.units:
        path = kit.out_dir / unit.host / unit.filename
        res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and unit.filename not in res.stderr, res.stderr


def test_rendered_units_start_a_working_tls_cluster(inventory, tmp_path):
    """Start the scheduler and worker exactly as their units' ExecStart lines say, with the
    certificates installed where install.sh puts them, and connect with client.env."""
    import dask
    from distributed import Client

    kit = systemd.write_units(inventory, tmp_path / "units")
    assert {u.role for u in kit.units} == {"scheduler", "worker"}
    sched, worker = kit.units
    assert sched.local and not worker.local
    assert "rpicluster.dashboard" in unit_argv(sched)
    # install.sh copies <host>/worker-tls/* into the unit's tls directory; do the same here.
    script = kit.install_script.read_text()
    assert f"127.0.0.1:{worker.tls_dir}/" in script
    Path(worker.tls_dir).mkdir(parents=True)
    for f in (kit.out_dir / worker.host / "worker-tls").iterdir():
        shutil.copy(f, worker.tls_dir)
    env_vars = dict(re.findall(r"^export (\w+)=(\S+)$", kit.client_env.read_text(), re.M))
    # The values as the shell would see them: the unit's Environment= quoting undone by systemd.
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for unit in (sched, worker):
            procs.append(subprocess.Popen(unit_argv(unit), env=run_env, cwd=tmp_path,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = f"tls://127.0.0.1:{load_inventory(inventory).scheduler.scheduler_port}"
        config = {k[len("DASK_"):].lower().replace("__", "."): shlex.split(v)[0]
                  for k, v in env_vars.items()}
        with dask.config.set(config):
            client = wait_until(lambda: Client(address, timeout=5), 90, ignore=OSError,
                                what=f"the unit's scheduler answering at {address}",
                                interval=0.5)
            with client:
                client.wait_for_workers(1, timeout=90)
                (info,) = client.scheduler_info()["workers"].values()
                assert info["name"] == "127.0.0.1" and info["nthreads"] == 2
                assert info["resources"] == {"rpi4": 2}
                assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        # Without the client certificate the TLS scheduler refuses the connection.
        with pytest.raises(OSError):
            Client(address.replace("tls://", "tcp://"), timeout=3)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_a_second_kit_rotates_certificates_of_a_host_that_left(inventory, tmp_path):
    """deploy systemd rotates like up: after the worker leaves the inventory, a new CA."""
    first = systemd.write_units(inventory, tmp_path / "kit1")
    ca_before = (first.out_dir / "127.0.0.1" / "worker-tls" / "ca.pem").read_bytes()
    systemd.write_units(inventory, tmp_path / "kit2")       # nothing to rotate: the same CA
    assert (tmp_path / "kit2" / "127.0.0.1" / "worker-tls" / "ca.pem").read_bytes() == ca_before
    head, workers = inventory.read_text().split("[[workers]]")
    inventory.write_text(head + "[[workers]]" + workers.replace('"127.0.0.1"', '"10.0.0.9"'))
    with pytest.warns(UserWarning, match="'127.0.0.1' has a certificate but is no longer in the "
                                         "inventory.*install every unit again"):
        kit = systemd.write_units(inventory, tmp_path / "kit3")
    ca_file = re.search(r"CA_FILE=(\S+)", kit.client_env.read_text()).group(1)
    assert Path(shlex.split(ca_file)[0]).read_bytes() != ca_before


def test_deploy_systemd_command(inventory, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "units"
    res = CliRunner().invoke(rpicluster_cli, ["deploy", "systemd", "-c", str(inventory),
                                              "-o", str(out), "--insecure"])
    assert res.exit_code == 0, res.output
    assert (out / "127.0.0.1" / "rpicluster-worker.service").exists()
    assert "tcp://127.0.0.1" in (out / "127.0.0.1" / "rpicluster-worker.service").read_text()
    assert "install.sh" in res.output and not (out / "client.env").exists()
    res = CliRunner().invoke(rpicluster_cli, ["deploy", "systemd", "-c", str(tmp_path / "no.toml")])
    assert res.exit_code == 1 and "error:" in res.output and "no.toml" in res.output


# --------------------------------------------------------------------------- prepare-pi.sh

PREPARE = ROOT / "deploy" / "prepare-pi.sh"


def test_prepare_pi_script_is_valid_shell():
    subprocess.run(["bash", "-n", str(PREPARE)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_prepare_pi_script_is_shellcheck_clean():
    res = subprocess.run(["shellcheck", str(PREPARE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("arch, ok", [("arm64", True), ("amd64", True), ("armhf", False)])
def test_prepare_pi_checks_the_userland_architecture(tmp_path, arch, ok):
    """``--check`` with ``dpkg --print-architecture`` answering ``arch`` (a stand-in dpkg)."""
    fake = tmp_path / "dpkg"
    fake.write_text(f"#!/bin/sh\necho {arch}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(PREPARE), "--check"], env=env, capture_output=True,
                         text=True)
    assert (res.returncode == 0) == ok, res.stderr
    if not ok:
        assert "32-bit" in res.stderr and "no armv7" in res.stderr and "64-bit" in res.stderr


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_services_match_the_clis(tmp_path, monkeypatch):
    import importlib.util

    import yaml

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"scheduler", "pi-1", "pi-2", "desktop"} <= set(services)
    for name in ("pi-1", "pi-2"):
        assert services[name]["cpus"] == 0.5 and services[name]["mem_limit"]
    dockerfile = ROOT / services["scheduler"]["build"]["dockerfile"]
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
        assert all((ROOT / s).exists() for s in src.split()), src
    dask = dask_cli()
    seen = set()
    for name, svc in services.items():
        argv = svc["command"]
        if argv[0] == "dask":
            ctx = parse_cli(dask, argv[1:], "dask")
            seen.add(ctx.info_name)
            if ctx.info_name == "worker":
                assert ctx.params["scheduler"] == "tcp://scheduler:8786"
                assert ctx.params["name"] == name
            else:
                assert "rpicluster.dashboard" in ctx.params["preload"]
        elif argv[0] == "rpicluster":
            parse_rpicluster(argv[1:], tmp_path)
        else:
            assert argv[0] == "python", name
            script = ROOT / "examples" / Path(argv[1]).name
            monkeypatch.syspath_prepend(str(script.parent))     # as `python script` would
            module_spec = importlib.util.spec_from_file_location("example", script)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            module.parser().parse_args(argv[2:])
    assert seen == {"scheduler", "worker"}


# --------------------------------------------------------------------------- README commands


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_text() -> str:
    """README.md and every page of the docs site, each without its code blocks."""
    return "\n".join(re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.M | re.S)
                     for page in DOC_PAGES)


def readme_commands() -> list[list[str]]:
    """Every ``rpicluster ...`` command in the code blocks of README.md and docs/, as argv after
    the name."""
    commands = []
    blocks = [b for page in DOC_PAGES
              for b in re.findall(r"^ *```(\w*)\n(.*?)^ *```", page.read_text(), re.M | re.S)]
    for lang, block in blocks:
        if lang not in ("", "bash", "sh", "console"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part, comments=True)
                if words and words[0] in ("rpicluster", ".venv/bin/rpicluster"):
                    commands.append(words[1:])
    return commands


def test_readme_commands_parse(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 10 and ["demo"] in commands
    for argv in commands:
        try:
            parse_rpicluster(argv, tmp_path)
        except click.ClickException as exc:
            raise AssertionError(f"README: rpicluster {shlex.join(argv)}: {exc}") from None


def test_readme_inline_commands_name_real_subcommands_and_options():
    """Prose names commands by parts (`rpicluster train ... --resume model.skops.run`,
    `rpicluster dashboard [--scheduler ADDR | -c TOML | --local]`): every subcommand and option
    such a span names must exist on that command."""
    text = doc_text()
    spans = re.findall(r"`(rpicluster [^`]+)`", text.replace("\n", " "))
    assert len(spans) >= 10
    for span in spans:
        cmd, words = rpicluster_cli, span.split()[1:]
        while isinstance(cmd, click.Group) and words and words[0] in cmd.commands:
            cmd = cmd.commands[words.pop(0)]
        assert not isinstance(cmd, click.Group) or not words, f"README: `{span}`: no such command"
        names = {n for p in cmd.params for n in (*p.opts, *p.secondary_opts)}
        for word in words:
            flag = word.strip("[]|").split("=")[0]
            if flag.startswith("-") and flag not in ("-", "--", "-h", "--help"):
                assert flag in names, f"README: `{span}`: {cmd.name} has no option {flag}"


def test_readme_paths_exist():
    """Every repository path README.md and the docs pages link to or name (`benchmarks/...`,
    `python examples/x.py`) is there; a page's links are relative to its own folder."""
    paths = set()
    for page in DOC_PAGES:
        text = page.read_text()
        paths |= {(page.parent / p).resolve().relative_to(ROOT)
                  for p in re.findall(r"\]\(([^)#:]+)\)", text)}
        paths |= {Path(p) for p in re.findall(
            r"`((?:benchmarks|docs|rpicluster|deploy|examples|tests|\.ci)/[^` ]*)`", text)}
        paths |= {Path(p) for p in re.findall(r"python ((?:benchmarks|examples)/\S+\.py)", text)}
    assert len(paths) >= 20
    # docs/architecture.md names the package's rooms relative to rpicluster/ (`deploy/ssh.py`)
    missing = sorted(str(p) for p in paths
                     if not (ROOT / p).exists() and not (ROOT / "rpicluster" / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
