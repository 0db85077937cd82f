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
    assert len(lines) == 1 and lines[0].startswith("error: 127.0.0.1"), res.stderr
