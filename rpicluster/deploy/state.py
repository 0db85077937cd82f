"""What ``up`` recorded on this machine: the SSH clusters' state files and the local cluster's.

Layout under :func:`rpicluster.config.state_dir`::

    clusters/<cluster id>/state.json   one SSH cluster (scheduler, workers, pids, logs)
    clusters/<cluster id>/tls/         its private CA and certificates
    current                            the id of the SSH cluster ``up`` last recorded
    local.json                         the running embedded cluster (``up --local``)

Standard library and :mod:`rpicluster.inventory` only: reading a record never connects anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from rpicluster import config
from rpicluster.errors import ConfigError
from rpicluster.inventory import NodeSpec

#: File of the running embedded cluster, in the state directory.
LOCAL_FILE = "local.json"


# --------------------------------------------------------------------------- SSH clusters


def cluster_id(inventory: str | os.PathLike) -> str:
    """Stable name of the cluster of an inventory file (its stem plus a hash of its path)."""
    path = Path(inventory).resolve()
    return f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def cluster_dir(cid: str) -> Path:
    """The directory holding one SSH cluster's state file and certificates."""
    return config.state_dir() / "clusters" / cid


def node_to_json(node: NodeSpec) -> dict:
    d = {f.name: getattr(node, f.name) for f in fields(node)}
    d.update(key=str(node.key), known_hosts=str(node.known_hosts), env=dict(node.env),
             tags=list(node.tags))
    return d


def node_from_json(d: dict) -> NodeSpec:
    return NodeSpec(**{**d, "key": Path(d["key"]), "known_hosts": Path(d["known_hosts"]),
                       "env": MappingProxyType(d["env"]), "tags": tuple(d["tags"])})


@dataclass
class ClusterState:
    """What runs where: scheduler and workers with pids, logs and how to reach them."""

    cid: str
    inventory: str
    address: str = ""
    dashboard: str = ""
    tls: bool = True
    scheduler: dict | None = None        # {"local", "pid", "log", "node"}
    workers: dict[str, dict] = field(default_factory=dict)   # name -> {"pid", "log", "node"}
    failed: dict[str, dict] = field(default_factory=dict)    # name -> {"reason", "at"} (last up)

    @property
    def path(self) -> Path:
        return cluster_dir(self.cid) / "state.json"

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)
        (config.state_dir() / "current").write_text(self.cid)

    def certs(self, name: str):
        """``name``'s certificate files from the cluster's CA (None without TLS)."""
        from rpicluster.deploy.tls import CertificateAuthority

        return CertificateAuthority(cluster_dir(self.cid) / "tls").issue(name) if self.tls else None

    def security(self):
        """The client's ``distributed.Security`` (None without TLS)."""
        certs = self.certs("client")
        return certs.security() if certs else None


def load_state(inventory: str | os.PathLike | None = None) -> ClusterState:
    """The recorded state of ``inventory``'s cluster, or of the last one ``up`` recorded.

    Raises
    ------
    ConfigError
        Nothing is recorded (the message says how to start a cluster).
    """
    if inventory is None:
        current = config.state_dir() / "current"
        if not current.exists():
            raise ConfigError(f"no cluster recorded in {config.state_dir()} "
                              "(run rpicluster up -c cluster.toml first)")
        cid = current.read_text().strip()
    else:
        cid = cluster_id(Path(inventory))
    path = cluster_dir(cid) / "state.json"
    if not path.exists():
        raise ConfigError(f"no running cluster recorded for {inventory or cid} ({path} missing; "
                          "run rpicluster up first)")
    return ClusterState(**json.loads(path.read_text()))


def recorded_cluster(inventory: str | os.PathLike | None = None) -> dict | None:
    """The SSH cluster ``up`` recorded (last, or for ``inventory``), or None when there is none.

    Returns a dict with ``address``, ``dashboard``, ``inventory``, ``tls`` and ``workers``.
    """
    try:
        state = load_state(inventory)
    except ConfigError:
        return None
    if state.scheduler is None:
        return None
    return {"address": state.address, "dashboard": state.dashboard, "inventory": state.inventory,
            "tls": state.tls, "workers": list(state.workers)}


# --------------------------------------------------------------------------- the local cluster


def local_path() -> Path:
    """Where the embedded cluster's record is written."""
    return config.state_dir() / LOCAL_FILE


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    # A zombie still answers kill(0); it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def local_record() -> dict | None:
    """The running embedded cluster's record, or None.

    Keys: ``pid``, ``scheduler_address``, ``dashboard_link``, ``n_workers``,
    ``threads_per_worker``, ``memory_limit``, ``started`` (older records may lack some). A record
    whose process has died is removed and reported as None.
    """
    path = local_path()
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        path.unlink(missing_ok=True)
        return None
    if not pid_alive(int(info.get("pid", -1))):
        path.unlink(missing_ok=True)
        return None
    return info


__all__ = ["ClusterState", "cluster_id", "cluster_dir", "load_state", "recorded_cluster",
           "node_to_json", "node_from_json", "local_path", "local_record", "pid_alive"]
