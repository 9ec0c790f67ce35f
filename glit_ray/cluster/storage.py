"""Where every node of the cluster can reach: checked before a command writes anything.

Ray Train's workers write their checkpoints into the run's storage from their own nodes, and a
search's mirror is what survives its head node. On one machine any directory does. On a cluster
whose work can land on other nodes (an autoscaler that declares worker node types, or more than
one host up) a directory on a node's own disk does not: Ray Train fails at the first checkpoint,
after a whole epoch on the GPUs ("Unable to set up cluster storage"), and a mirror on the head's
disk goes with the head. There the storage must be a URI (s3://, gs://, ...) or a path on a
filesystem every node mounts (NFS, EFS, Lustre, ...: read from the mount table).

Ray's fake multi-node clusters (`RAY_FAKE_CLUSTER=1`, tests) run every node on this machine.
"""
from __future__ import annotations

import os
from pathlib import Path

import ray

from glit_ray.cluster.resources import ClusterShape
from glit_ray.core.errors import UserError

# filesystems every node of a cluster can mount (EFS mounts as nfs4)
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "cifs", "smb3", "glusterfs", "ceph", "gpfs", "beegfs", "fuse.glusterfs",
                      "fuse.ceph", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.lustre")
MOUNTS = Path("/proc/self/mounts")


def is_uri(storage: str) -> bool:
    """A remote storage URI (s3://, gs://, ...); file:// names a local path."""
    return "://" in storage and not storage.startswith("file://")


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) of the filesystem that holds `path` (its nearest existing parent)."""
    path = path.resolve()
    best = ("/", "unknown")
    try:
        lines = MOUNTS.read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def spans_hosts(shape: ClusterShape) -> bool:
    """Whether work can land on another machine than this one: worker node types declared by an autoscaler, or
    nodes up on more than one host (not on Ray's fake multi-node clusters, all on this machine)."""
    if os.environ.get("RAY_FAKE_CLUSTER") == "1":
        return False
    if shape.autoscaled:
        return any(t.max_count > 0 and not t.head for t in shape.node_types)
    return len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}) > 1


def check_reachable(storage: str | Path, flag: str, shape: ClusterShape) -> None:
    """Refuse `storage` (a URI, or a path: a run directory by default) where the cluster spans hosts and it is on a
    node's own disk; `flag`: the option that sets it, named in the one-line error."""
    storage = str(storage)
    if is_uri(storage) or not spans_hosts(shape):
        return
    point, fstype = mount_of(Path(storage.removeprefix("file://")))
    if fstype in SHARED_FILESYSTEMS:
        return
    raise UserError(f"{storage} is on this node's own disk ({fstype} at {point}), which the other nodes of this cluster "
                    f"({shape}) cannot reach: give {flag} s3://BUCKET/PREFIX (or a path on a filesystem every node "
                    "mounts: NFS, EFS, Lustre)")
