"""The TOML inventory: host ranges, defaults and overrides, and everything refused before SSH."""

import re
from pathlib import Path

import pytest

from rpicluster import config, load_inventory
from rpicluster.errors import InventoryError
from rpicluster.inventory import expand_hosts, write_example


@pytest.fixture
def write(tmp_path):
    """Write an inventory text to tmp_path/cluster.toml and return its path."""
    def _write(text: str) -> Path:
        path = tmp_path / "cluster.toml"
        path.write_text(text)
        return path
    return _write


BASE = '''
[scheduler]
host = "10.0.0.1"
[defaults]
user = "pi"
key = "keys/id"
python = "/opt/venv/bin/python"
'''


@pytest.mark.parametrize("pattern, expected", [
    ("pi[01-03].lan", ["pi01.lan", "pi02.lan", "pi03.lan"]),
    ("10.0.0.[11-13]", ["10.0.0.11", "10.0.0.12", "10.0.0.13"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("r[1-2]c[1-2]", ["r1c1", "r1c2", "r2c1", "r2c2"]),
    ("laptop.lan", ["laptop.lan"]),
])
def test_expand_hosts(pattern, expected):
    assert expand_hosts(pattern) == expected


def test_issue_example_loads_with_defaults_and_overrides(write, tmp_path):
    spec = load_inventory(write(BASE + '''
[[workers]]
hosts = "pi[01-04].lan"
nthreads = 4
memory = "3GiB"
tags = ["rpi4"]
[[workers]]
host = "laptop.lan"
user = "me"
port = 2222
nthreads = 7
memory = "12GiB"
env = { OMP_NUM_THREADS = "1" }
'''))
    assert [w.host for w in spec.workers] == ["pi01.lan", "pi02.lan", "pi03.lan", "pi04.lan",
                                              "laptop.lan"]
    pi, laptop = spec.workers[0], spec.workers[-1]
    assert (pi.user, pi.port, pi.nthreads, pi.memory, pi.tags) == ("pi", 22, 4, 3 * 2**30, ("rpi4",))
    assert pi.resources == {"rpi4": 4}
    assert pi.key == tmp_path / "keys" / "id"          # relative to the inventory file
    assert pi.known_hosts == Path(config.KNOWN_HOSTS).expanduser()
    assert pi.workdir == f"{config.REMOTE_DIRECTORY}/pi01.lan"
    assert (laptop.user, laptop.port, laptop.memory) == ("me", 2222, 12 * 2**30)
    assert dict(laptop.env) == {"OMP_NUM_THREADS": "1"}
    assert spec.scheduler.host == "10.0.0.1"
    assert spec.scheduler.scheduler_port == config.SCHEDULER_PORT
    with pytest.raises(AttributeError):
        pi.nthreads = 2  # frozen


@pytest.mark.parametrize("body, where", [
    ('[[workers]]\nhost = "pi1; rm -rf ~"', "workers[0].host"),
    ('[[workers]]\nhost = "$(reboot)"', "workers[0].host"),
    ('[[workers]]\nhost = "pi1"\npython = "/usr/bin/python3 -c \'import os\'"', "workers[0].python"),
    ('[[workers]]\nhost = "pi1"\nlocal_directory = "/tmp/x`id`"', "workers[0].local_directory"),
    ('[[workers]]\nhost = "pi1"\nkey = "~/.ssh/id|nc"', "workers[0].key"),
    ('[[workers]]\nhost = "pi1"\nenv = { "A;B" = "1" }', "workers[0].env.A;B"),
    # Finding 8: patterns ended in $, which also matches before a trailing newline ...
    ('[[workers]]\nhost = "pi1\\n"', "workers[0].host"),
    ('[[workers]]\nhost = "pi1"\npython = "/usr/bin/python3\\n"', "workers[0].python"),
    ('[[workers]]\nhost = "pi1"\nenv = { "A\\n" = "1" }', "workers[0].env.A\n"),
    ('[[workers]]\nhost = "pi1"\ntags = ["rpi4\\n"]', "workers[0].tags"),
    # ... and a leading "-" passed in user and python (read as an option by ssh / python).
    ('[[workers]]\nhost = "pi1"\nuser = "-lroot"', "workers[0].user"),
    ('[[workers]]\nhost = "pi1"\nuser = "pi\\n"', "workers[0].user"),
    ('[[workers]]\nhost = "pi1"\npython = "-c"', "workers[0].python"),
    ('[[workers]]\nhost = "pi1"\nlocal_directory = "--help"', "workers[0].local_directory"),
])
def test_injection_attempts_are_refused_before_any_connection(write, body, where):
    with pytest.raises(InventoryError, match=re.escape(f"cluster.toml: {where}: ")):
        load_inventory(write(BASE + body))


@pytest.mark.parametrize("body, message", [
    ('[[workers]]\nhost = "pi1"\nthreads = 4', r"workers\[0\]\.threads: unknown key"),
    ('[[workers]]\nhost = "pi1"\nport = 70000', r"workers\[0\]\.port: 70000 is not a port"),
    ('[[workers]]\nhost = "pi1"\nport = true', r"workers\[0\]\.port: True is not a port"),
    ('[[workers]]\nhosts = "pi[1-2]"\n[[workers]]\nhost = "pi2"',
     r"workers\[1\]: duplicate host 'pi2' \(also in workers\[0\]\)"),
    ('[[workers]]\nhost = "pi1"\nmemory = "lots"', r"workers\[0\]\.memory: 'lots' is not a memory"),
    ('[[workers]]\nhost = "pi1"\nnthreads = 0', r"workers\[0\]\.nthreads"),
    ('[[workers]]\nhost = "pi1"\nhosts = "pi[2-3]"', r"workers\[0\]: give exactly one"),
    ('[[workers]]\nhosts = "pi[3-1]"', r"counts down"),
    ('[cluster]\nname = "x"', r"cluster: unknown key"),
    ('', r"workers: expected at least one"),
])
def test_invalid_values_name_file_and_key(write, body, message):
    with pytest.raises(InventoryError, match=message):
        load_inventory(write(BASE + body))


def test_scheduler_host_required_and_toml_errors_named(write):
    with pytest.raises(InventoryError, match="scheduler.host: missing"):
        load_inventory(write('[scheduler]\n[[workers]]\nhost = "pi1"\n'))
    with pytest.raises(InventoryError, match="cluster.toml: not valid TOML"):
        load_inventory(write("[scheduler\n"))
    with pytest.raises(InventoryError, match="inventory file not found"):
        load_inventory(Path(write("")).with_name("nope.toml"))


def test_init_example_is_a_valid_inventory(tmp_path):
    path = write_example(tmp_path / "cluster.toml")
    spec = load_inventory(path)
    assert len(spec.workers) == 4 and spec.workers[0].tags == ("rpi4",)
    with pytest.raises(InventoryError, match="already exists"):
        write_example(path)
