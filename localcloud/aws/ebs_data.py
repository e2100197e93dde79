"""EBS snapshots that keep the data: the emulator keeps none, so this keeps it beside moto.

A volume's storage is on this machine (the node simulator plays the block device, see its
storage.rs): `<images dir>/<volume>.img`, a loop-mounted XFS image, or else the directory
`<volumes dir>/<volume>`. This copies that storage when CreateSnapshot is accepted, as EBS
captures the device's blocks at that moment, and gives a volume created from the snapshot that
copy, so a restore returns the data as it was.

- CreateSnapshot copies before it answers (sparse files stay sparse; reflinks where the
  filesystem has them). A mounted image is copied with its filesystem frozen, so the copy is one
  point in time, as an EBS snapshot is; the freeze also writes out what processes wrote and did
  not sync, which EBS would not see (kinder on that one point: QuestDB's CHECKPOINT CREATE syncs
  anyway). The snapshot is `pending` while it copies and then for QDB_AWS_SNAPSHOT_SECONDS
  (realistic timing only), then `completed`, as EBS reports its upload.
- CreateVolume from a snapshot that is not `completed` is refused, as EBS refuses it; from a
  completed one, the new volume's storage starts as the snapshot's copy (the simulator mounts an
  existing image instead of formatting one, and grows it if the volume is larger).
- DeleteSnapshot removes the copy.

Without QDB_AWS_SNAPSHOTS_DIR (moto alone) snapshots keep no data, as before.
"""

import os
import shutil
import subprocess
import threading

from moto.ec2 import exceptions as ec2_errors
from moto.ec2.models import EC2Backend
from moto.ec2.models.elastic_block_store import Snapshot

VOLUMES_DIR = os.environ.get("QDB_AWS_VOLUMES_DIR")
IMAGES_DIR = os.environ.get("QDB_AWS_VOLUME_IMAGES_DIR")
SNAPSHOTS_DIR = os.environ.get("QDB_AWS_SNAPSHOTS_DIR")


class IncorrectState(ec2_errors.EC2ClientError):
    def __init__(self, message):
        super().__init__("IncorrectState", message)


_locks_lock = threading.Lock()
_locks = {}


def lock_for(path):
    """One copy at a time per target: a CreateVolume retried while its first copy runs waits."""
    with _locks_lock:
        return _locks.setdefault(path, threading.Lock())


def copy(source, target, frozen=None):
    """A file or a directory tree, attributes kept; a file's holes stay holes. `frozen`: a mount
    point whose filesystem is frozen for the copy (its image is `source`)."""
    with lock_for(target):
        if os.path.exists(target):
            return
        # A name of its own, renamed into place: a copy cut short is never taken for a whole one.
        tmp = f"{target}.new-{os.getpid()}-{threading.get_ident()}"
        remove(tmp)
        args = ["cp", "-a", "--reflink=auto"]
        if os.path.isfile(source):
            args.append("--sparse=always")
        if frozen:
            subprocess.run(["fsfreeze", "-f", frozen], check=True, capture_output=True)
        try:
            subprocess.run(args + [source, tmp], check=True, capture_output=True)
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", frozen], check=True, capture_output=True)
        os.rename(tmp, target)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def storage_of(volume_id):
    """The volume's storage as the simulator keeps it: (its image, the image's mount point if
    mounted), or (its directory, None), or None."""
    mount = os.path.join(VOLUMES_DIR, volume_id) if VOLUMES_DIR else None
    image = os.path.join(IMAGES_DIR, volume_id + ".img") if IMAGES_DIR else None
    if image and os.path.isfile(image):
        return image, (mount if mount and os.path.ismount(mount) else None)
    if mount and os.path.isdir(mount) and not os.path.ismount(mount):
        return mount, None
    return None


def saved(snapshot_id):
    """The snapshot's copy (an image or a directory), or None when it holds no data."""
    for path in (os.path.join(SNAPSHOTS_DIR, snapshot_id + ".img"), os.path.join(SNAPSHOTS_DIR, snapshot_id)):
        if os.path.exists(path):
            return path
    return None


def install(pending_seconds):
    """`pending_seconds()` is how long a new snapshot stays pending (0 with instant timing)."""
    if not SNAPSHOTS_DIR:
        return
    os.makedirs(SNAPSHOTS_DIR, exist_ok=True)
    original_create_snapshot = EC2Backend.create_snapshot
    original_create_volume = EC2Backend.create_volume
    original_delete_snapshot = EC2Backend.delete_snapshot

    def create_snapshot(self, volume_id, description, *args, **kwargs):
        snapshot = original_create_snapshot(self, volume_id, description, *args, **kwargs)
        snapshot.status = "pending"
        found = storage_of(volume_id)
        if found is not None:
            source, mounted = found
            suffix = ".img" if source.endswith(".img") else ""
            copy(source, os.path.join(SNAPSHOTS_DIR, snapshot.id + suffix), frozen=mounted)

        def complete():
            if snapshot.status == "pending":
                snapshot.status = "completed"

        delay = pending_seconds()
        if delay > 0:
            timer = threading.Timer(delay, complete)
            timer.daemon = True
            timer.start()
        else:
            complete()
        return snapshot

    def create_volume(self, *args, **kwargs):
        snapshot_id = kwargs.get("snapshot_id")
        if snapshot_id:
            snapshot = self.get_snapshot(snapshot_id)
            if snapshot.status != "completed":
                raise IncorrectState(f"Snapshot '{snapshot_id}' is not 'completed'.")
        volume = original_create_volume(self, *args, **kwargs)
        source = saved(snapshot_id) if snapshot_id else None
        if source is not None:
            image = source.endswith(".img")
            directory = IMAGES_DIR if image else VOLUMES_DIR
            target = os.path.join(directory, volume.id + (".img" if image else ""))
            # A CreateVolume repeated with its ClientToken answers the same volume, which may be
            # in use by now: its storage is made once (copy does nothing if it exists).
            os.makedirs(directory, exist_ok=True)
            copy(source, target)
        return volume

    def delete_snapshot(self, snapshot_id):
        snapshot = original_delete_snapshot(self, snapshot_id)
        path = saved(snapshot_id)
        if path is not None:
            remove(path)
        return snapshot

    EC2Backend.create_snapshot = create_snapshot
    EC2Backend.create_volume = create_volume
    EC2Backend.delete_snapshot = delete_snapshot
    Snapshot.progress = property(lambda self: "100%" if self.status == "completed" else "0%")

