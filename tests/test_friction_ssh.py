"""A host that is not an SSH server is one line, not paramiko's traceback (issue 26, item 8).

README's unedited example inventory names hosts that are not there; what answered on port 22
there was no SSH server. Here a real TCP server on 127.0.0.1 accepts and hangs up at once.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

SCRIPT = """
import sys
from pathlib import Path
from rpicluster.deploy.ssh import Connection
from rpicluster.errors import RPiClusterError
from rpicluster.inventory import NodeSpec

node = NodeSpec(host="127.0.0.1", user="pi", port=int(sys.argv[1]), key=Path(sys.argv[2]),
                known_hosts=Path(sys.argv[3]), python="python3", local_directory="/tmp")
try:
    with Connection(node, timeout=5):
        pass
except RPiClusterError as exc:
    print(f"error: {exc}", file=sys.stderr)
"""


def test_a_host_that_is_no_ssh_server_is_one_line(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def hang_up():
        for _ in range(3):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    try:
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(port), str(key),
                              str(tmp_path / "known_hosts")],
                             capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: 127.0.0.1:{port}: cannot connect: "
                                                   "something answered but did not speak SSH ("), \
        res.stderr


def test_doctor_lists_the_scheduler_host_first(tmp_path, home):
    """The scheduler's host is checked too (it was left out of the table): here it is this
    machine; the worker is a closed port, so it fails and doctor exits 1."""
    from click.testing import CliRunner

    from rpicluster.cli import main

    with socket.create_server(("127.0.0.1", 0)) as s:
        closed = s.getsockname()[1]
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(f'[scheduler]\nhost = "127.0.0.1"\n[defaults]\nuser = "pi"\n'
                         f'key = "{key}"\nknown_hosts = "{tmp_path / "known_hosts"}"\n'
                         f'port = {closed}\n[[workers]]\nhosts = "127.0.0.1"\n')
    res = CliRunner().invoke(main, ["doctor", "-c", str(inventory)])
    assert res.exit_code == 1, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("127.0.0.1")]
    assert rows[0].startswith("127.0.0.1 (scheduler)") and " ok " in rows[0], res.output
    assert len(rows) == 2 and "FAIL" in rows[1], res.output
    assert f"127.0.0.1:{closed}: cannot connect: connection refused: no SSH server listens on " \
        "that port; enable SSH on the host" in rows[1], res.output


def test_a_host_name_that_does_not_resolve_says_so_and_what_to_check(tmp_path, home):
    """A misspelt host (``.invalid`` never resolves, RFC 2606): not errno -2's 'Name or service
    not known' alone, but what it means and what to check."""
    from click.testing import CliRunner

    from rpicluster.cli import main

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(f'[scheduler]\nhost = "127.0.0.1"\n[defaults]\nuser = "pi"\n'
                         f'key = "{key}"\nknown_hosts = "{tmp_path / "known_hosts"}"\n'
                         '[[workers]]\nhosts = "pi01.invalid"\n')
    res = CliRunner().invoke(main, ["doctor", "-c", str(inventory)])
    assert res.exit_code == 1, res.output
    row = next(line for line in res.output.splitlines() if line.startswith("pi01.invalid"))
    assert "FAIL" in row and "pi01.invalid:22: cannot connect: the host name does not resolve (" \
        in row and "check its spelling in the inventory, or use its IP address" in row, row
