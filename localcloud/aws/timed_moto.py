"""The AWS emulator with EC2's timing: moto's server, with its EC2 models taught to take time.

moto changes state at once and lists exactly what exists; EC2 does neither, and the operator's
fencing is only proven if the emulator is no kinder than EC2. moto 5.2's state manager registers
no EC2 model, and a proxy that rewrote moto's XML could not make moto's own checks see the
in-between states (an attach while the volume is still detaching, a detach while the instance is
still stopping). So this wraps moto's EC2 backend in-process, before its server starts:

- instances: pending -> running, stopping -> stopped, shutting-down -> terminated each take
  QDB_AWS_INSTANCE_SECONDS (a range "lo-hi", jittered); a volume stays attached until its
  instance is really stopped or terminated;
- volumes: creating -> available, attaching -> attached and detaching -> available take
  QDB_AWS_VOLUME_SECONDS; a detach completes only after the instance holding the volume is
  stopped or terminated; an attach of a volume that is not `available`, or to an instance that is not running or
  stopped, is refused as EC2 refuses it;
- eventual consistency: an instance, volume or security group just created is missing from
  Describe calls (listings, and by id as NotFound) for up to QDB_AWS_DESCRIBE_LAG_SECONDS;
- ClientToken: a RunInstances or CreateVolume repeated with the same token returns the first
  result, as EC2 does (moto ignores it), also once the instance terminated; a RunInstances
  repeated with other parameters fails IdempotentParameterMismatch;
- a RunInstances' network-interface tags land on the instance's interface, as in EC2 (moto drops
  them); a live instance's private address is never handed to another (moto's may be);
- ModifyVolume: a second modification of a volume within QDB_AWS_MODIFY_COOLDOWN_SECONDS (default 21600, EBS's six hours) of
  the last is refused with VolumeModificationRateExceeded, as EBS refuses it;
- snapshots: pending -> completed takes QDB_AWS_SNAPSHOT_SECONDS, and they keep the volume's data
  (ebs_data.py, in either timing);
- every AttachVolume / DetachVolume / StopInstances / TerminateInstances is appended to
  QDB_AWS_CALL_LOG (JSON lines) with the true state, at that moment, of every instance that ever
  held the volume, so a test can prove the fencing order from the calls themselves.

QDB_AWS_TIMING=instant turns all of it off (the scale benchmarks); the default is realistic.
In both, moto's response serializer and its resources' tag lookups are made cheaper
(fast_serialize.py; the same bytes, which check_fast_serialize.py proves).
Usage: timed_moto.py -H 127.0.0.1 -p PORT (moto_server's own flags).
"""

import json
import os
import random
import sys
import threading
import time

import ebs_data
import fast_serialize
from moto import server
from moto.core.responses import BaseResponse
from moto.ec2 import exceptions as ec2_errors
from moto.ec2.models import EC2Backend
from moto.ec2.models.elastic_block_store import Volume
from moto.ec2.models.instances import Instance, InstanceState
from moto.ec2.models.security_groups import SecurityGroup
from moto.ec2.responses.elastic_block_store import ElasticBlockStore

STOPPED = ("stopped", "terminated")


def seconds_range(name, default):
    """A delay range from the environment, "lo-hi" or a single number, in seconds."""
    text = os.environ.get(name, default)
    lo, _, hi = text.partition("-")
    lo = float(lo)
    return lo, float(hi) if hi else lo


INSTANCE_SECONDS = seconds_range("QDB_AWS_INSTANCE_SECONDS", "3-8")
VOLUME_SECONDS = seconds_range("QDB_AWS_VOLUME_SECONDS", "1-4")
DESCRIBE_LAG_SECONDS = seconds_range("QDB_AWS_DESCRIBE_LAG_SECONDS", "0-3")
# EBS reports a snapshot pending for minutes while it uploads; shorter here, as the other delays.
SNAPSHOT_SECONDS = seconds_range("QDB_AWS_SNAPSHOT_SECONDS", "2-6")
CALL_LOG = os.environ.get("QDB_AWS_CALL_LOG")
MODIFY_COOLDOWN_SECONDS = float(os.environ.get("QDB_AWS_MODIFY_COOLDOWN_SECONDS", "21600"))

_log_lock = threading.Lock()
# Calls moto makes to itself (an instance's root volume at launch, the detach inside a
# termination) are not the client's calls: they take no time and are not logged.
_internal = threading.local()
# The request being answered, for what moto's backend is not told (CreateVolume's ClientToken).
_request = threading.local()


class EC2IncorrectState(ec2_errors.EC2ClientError):
    def __init__(self, code, message):
        super().__init__(code, message)


def is_internal():
    return getattr(_internal, "depth", 0) > 0


class internal:
    def __enter__(self):
        _internal.depth = getattr(_internal, "depth", 0) + 1

    def __exit__(self, *exc):
        _internal.depth -= 1


def jitter(bounds):
    return random.uniform(*bounds)


def later(bounds, fn):
    """Runs fn once after a jittered delay, on a daemon thread, as moto itself."""

    def run():
        with internal():
            fn()

    timer = threading.Timer(jitter(bounds), run)
    timer.daemon = True
    timer.start()


def set_state(instance, name, code):
    instance._state = InstanceState(name, code)
    # Every transition bumps the generation so a superseded timer (a stop overtaken by a
    # terminate) does nothing when it fires.
    instance._qdb_generation = getattr(instance, "_qdb_generation", 0) + 1
    return instance._qdb_generation


def current(instance, generation):
    return getattr(instance, "_qdb_generation", 0) == generation


def stamp_created(resource):
    if not is_internal():
        resource._qdb_visible_at = time.monotonic() + jitter(DESCRIBE_LAG_SECONDS)


def visible(resource):
    return time.monotonic() >= getattr(resource, "_qdb_visible_at", 0)


def log_call(action, volume=None, instance_ids=(), **extra):
    if not CALL_LOG or is_internal():
        return
    entry = {"t": time.time(), "action": action, "instances": list(instance_ids), **extra}
    # Who asked: the access key of the request's signature (each component has its own).
    caller = getattr(_request, "caller", None)
    if caller:
        entry["caller"] = caller
    if volume is not None:
        entry["volume"] = volume.id
        entry["holders"] = {i.id: i._state.name for i in getattr(volume, "_qdb_holders", {}).values()}
    with _log_lock, open(CALL_LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


def caller_of(headers):
    """The access key id in a SigV4 Authorization header, e.g. `Credential=testing/2026...`."""
    auth = (headers or {}).get("Authorization", "") or ""
    marker = "Credential="
    if marker not in auth:
        return None
    return auth.split(marker, 1)[1].split("/", 1)[0]


def install():
    original_setup = BaseResponse.setup_class

    def setup_class(self, request, full_url, headers, *args, **kwargs):
        _request.caller = caller_of(headers)
        return original_setup(self, request, full_url, headers, *args, **kwargs)

    BaseResponse.setup_class = setup_class

    # ------------------------------------------------------------------ instances
    original_run = EC2Backend.run_instances

    def run_instances(self, *args, **kwargs):
        # EC2 answers a repeated ClientToken with the first launch, not a second instance.
        token = kwargs.get("client_token")
        tokens = self.__dict__.setdefault("_qdb_tokens", {})
        # The same token with other parameters is refused, as EC2 does (a token is valid for at
        # least 24 hours after its instance terminated).
        asked = (args[0] if args else kwargs.get("image_id"), kwargs.get("instance_type"),
                 kwargs.get("subnet_id"), kwargs.get("placement"))
        if token and token != "ABCDE" and ("run", token) in tokens:
            reservation, first = tokens[("run", token)]
            if first != asked:
                raise EC2IncorrectState(
                    "IdempotentParameterMismatch",
                    "Arguments on this idempotent request are inconsistent with arguments used in "
                    "previous request(s).",
                )
            return reservation
        # moto applies a launch's instance and volume tags but drops its network-interface ones;
        # EC2 tags the primary interface with them.
        interface_tags = kwargs.get("tags", {}).get("network-interface", {})
        # The instance's own root volume is attached by moto inside the launch.
        with internal():
            reservation = original_run(self, *args, **kwargs)
        for instance in reservation.instances:
            for nic in instance.nics.values():
                nic.add_tags(interface_tags)
        if token and token != "ABCDE":
            tokens[("run", token)] = (reservation, asked)
        for instance in reservation.instances:
            stamp_created(instance)
            generation = set_state(instance, "pending", 0)

            def run(instance=instance, generation=generation):
                if current(instance, generation):
                    set_state(instance, "running", 16)

            later(INSTANCE_SECONDS, run)
        return reservation

    EC2Backend.run_instances = run_instances

    original_stop = Instance.stop
    original_start = Instance.start
    original_terminate = Instance.terminate

    def stop(self):
        previous = InstanceState(self._state.name, self._state.code)
        if is_internal():
            return original_stop(self)
        if self._state.name in ("stopping", "stopped", "shutting-down", "terminated"):
            return previous
        generation = set_state(self, "stopping", 64)

        def finish():
            if current(self, generation):
                original_stop(self)
                set_state(self, "stopped", 80)

        later(INSTANCE_SECONDS, finish)
        return previous

    def start(self):
        previous = InstanceState(self._state.name, self._state.code)
        if is_internal():
            return original_start(self)
        if self._state.name != "stopped":
            raise EC2IncorrectState(
                "IncorrectInstanceState",
                f"The instance '{self.id}' is not in a state from which it can be started.",
            )
        generation = set_state(self, "pending", 0)

        def finish():
            if current(self, generation):
                original_start(self)
                set_state(self, "running", 16)

        later(INSTANCE_SECONDS, finish)
        return previous

    def terminate(self):
        previous = InstanceState(self._state.name, self._state.code)
        if is_internal():
            return original_terminate(self)
        if self._state.name in ("shutting-down", "terminated"):
            return previous
        generation = set_state(self, "shutting-down", 32)

        def finish():
            if current(self, generation):
                # moto's terminate detaches the volumes, as EC2 does once the machine is gone.
                original_terminate(self)
                set_state(self, "terminated", 48)

        later(INSTANCE_SECONDS, finish)
        return previous

    Instance.stop = stop
    Instance.start = start
    Instance.terminate = terminate
    # moto frees an instance's private address whenever a Python copy of the instance is
    # collected (Instance.__del__), so in a subnet of the cluster's VPC the next launch got the
    # address of a live instance: two nodes of one name, and the second never joined. EC2 frees
    # it at termination, which moto's terminate does too (it deletes the interface).
    Instance.__del__ = lambda self: None

    original_stop_instances = EC2Backend.stop_instances
    original_terminate_instances = EC2Backend.terminate_instances

    def stop_instances(self, instance_ids, *args, **kwargs):
        log_call("StopInstances", instance_ids=instance_ids)
        return original_stop_instances(self, instance_ids, *args, **kwargs)

    def terminate_instances(self, instance_ids, *args, **kwargs):
        log_call("TerminateInstances", instance_ids=instance_ids)
        return original_terminate_instances(self, instance_ids, *args, **kwargs)

    EC2Backend.stop_instances = stop_instances
    EC2Backend.terminate_instances = terminate_instances

    original_by_ids = EC2Backend.get_reservations_by_instance_ids
    original_describe = EC2Backend.describe_instances

    def get_reservations_by_instance_ids(self, instance_ids, filters=None):
        for instance_id in instance_ids:
            instance = self.get_instance_by_id(instance_id)
            if instance is not None and not visible(instance):
                raise ec2_errors.InvalidInstanceIdError(instance_id)
        return original_by_ids(self, instance_ids, filters)

    def describe_instances(self, filters=None):
        reservations = original_describe(self, filters)
        for reservation in reservations:
            reservation.instances = [i for i in reservation.instances if visible(i)]
        return [r for r in reservations if r.instances]

    EC2Backend.get_reservations_by_instance_ids = get_reservations_by_instance_ids
    EC2Backend.describe_instances = describe_instances

    # ------------------------------------------------------------------ volumes
    original_create_volume = EC2Backend.create_volume
    original_describe_volumes = EC2Backend.describe_volumes
    original_attach = EC2Backend.attach_volume
    original_detach = EC2Backend.detach_volume

    def create_volume(self, *args, **kwargs):
        token = getattr(_request, "client_token", None)
        tokens = self.__dict__.setdefault("_qdb_tokens", {})
        earlier = tokens.get(("volume", token)) if token else None
        if earlier is not None and earlier.id in self.volumes:
            return earlier
        volume = original_create_volume(self, *args, **kwargs)
        if token:
            tokens[("volume", token)] = volume
        stamp_created(volume)
        if not is_internal():
            volume._qdb_available_at = time.monotonic() + jitter(VOLUME_SECONDS)
        return volume

    original_status = Volume.status

    def volume_status(self):
        if time.monotonic() < getattr(self, "_qdb_available_at", 0):
            return "creating"
        return original_status.fget(self)

    Volume.status = property(volume_status)

    def describe_volumes(self, volume_ids=None, filters=None):
        if volume_ids:
            for volume_id in volume_ids:
                volume = self.volumes.get(volume_id)
                if volume is not None and not visible(volume):
                    raise ec2_errors.InvalidVolumeIdError(volume_id)
        return [v for v in original_describe_volumes(self, volume_ids, filters) if visible(v)]

    def attach_volume(self, volume_id, instance_id, device_path, delete_on_termination=False):
        if is_internal():
            attachment = original_attach(self, volume_id, instance_id, device_path, delete_on_termination)
            volume = self.get_volume(volume_id)
            volume._qdb_holders = getattr(volume, "_qdb_holders", {})
            volume._qdb_holders[instance_id] = self.get_instance(instance_id)
            return attachment
        volume = self.get_volume(volume_id)
        instance = self.get_instance(instance_id)
        log_call("AttachVolume", volume=volume, instance_ids=[instance_id])
        if volume.attachment is not None:
            raise ec2_errors.VolumeInUseError(volume_id, volume.attachment.instance.id)
        if volume.status != "available":
            raise EC2IncorrectState("IncorrectState", f"vol '{volume_id}' is not 'available'.")
        if instance._state.name not in ("running", "stopped"):
            raise EC2IncorrectState(
                "IncorrectInstanceState",
                f"Instance '{instance_id}' is not 'running' or 'stopped'.",
            )
        attachment = original_attach(self, volume_id, instance_id, device_path, delete_on_termination)
        volume._qdb_holders = getattr(volume, "_qdb_holders", {})
        volume._qdb_holders[instance_id] = instance
        attachment.status = "attaching"
        token = object()
        volume._qdb_attach_token = token

        def finish():
            if volume.attachment is attachment and volume._qdb_attach_token is token:
                attachment.status = "attached"

        later(VOLUME_SECONDS, finish)
        return attachment

    def detach_volume(self, volume_id, instance_id, device_path):
        if is_internal():
            return original_detach(self, volume_id, instance_id, device_path)
        volume = self.get_volume(volume_id)
        log_call("DetachVolume", volume=volume, instance_ids=[instance_id] if instance_id else [])
        attachment = volume.attachment
        if attachment is None or (instance_id and attachment.instance.id != instance_id):
            raise ec2_errors.InvalidVolumeAttachmentError(volume_id, instance_id)
        if attachment.status == "detaching":
            return attachment
        attachment.status = "detaching"
        instance = attachment.instance
        device = device_path or attachment.device

        def finish():
            if volume.attachment is not attachment:
                return
            # The machine still holds the disk until it has really stopped.
            if instance._state.name not in STOPPED:
                again = threading.Timer(0.5, run_internal, args=(finish,))
                again.daemon = True
                again.start()
                return
            if instance._state.name == "terminated":
                return  # the termination already let go of it
            original_detach(self, volume_id, instance.id, device)

        later(VOLUME_SECONDS, finish)
        return attachment

    EC2Backend.create_volume = create_volume

    # moto's backend never sees CreateVolume's ClientToken; the request handler hands it over.
    original_create_volume_response = ElasticBlockStore.create_volume

    def create_volume_response(self):
        _request.client_token = self._get_param("ClientToken")
        try:
            return original_create_volume_response(self)
        finally:
            _request.client_token = None

    ElasticBlockStore.create_volume = create_volume_response
    EC2Backend.describe_volumes = describe_volumes
    EC2Backend.attach_volume = attach_volume
    EC2Backend.detach_volume = detach_volume

    # ------------------------------------------------------------------ security groups
    original_sg_init = SecurityGroup.__init__
    original_describe_sgs = EC2Backend.describe_security_groups

    def sg_init(self, *args, **kwargs):
        original_sg_init(self, *args, **kwargs)
        stamp_created(self)

    def describe_security_groups(self, group_ids=None, groupnames=None, filters=None):
        groups = original_describe_sgs(self, group_ids, groupnames, filters)
        hidden = [g.id for g in groups if not visible(g)]
        if group_ids and hidden:
            raise ec2_errors.InvalidSecurityGroupNotFoundError(hidden)
        return [g for g in groups if visible(g)]

    SecurityGroup.__init__ = sg_init
    EC2Backend.describe_security_groups = describe_security_groups

    # ------------------------------------------------------------------ volume modifications
    original_modify = Volume.modify

    def modify(self, *args, **kwargs):
        last = self.modifications[-1] if self.modifications else None
        started = getattr(last, "_qdb_started", None)
        if started is not None and time.time() < started + MODIFY_COOLDOWN_SECONDS:
            raise EC2IncorrectState(
                "VolumeModificationRateExceeded",
                "You've reached the maximum modification rate per volume limit. "
                "Wait at least 6 hours between modifications per EBS volume.",
            )
        original_modify(self, *args, **kwargs)
        self.modifications[-1]._qdb_started = time.time()

    Volume.modify = modify

    # A region's backend makes its default VPC and security group when first used: those exist
    # long before any client asks, so they are visible at once.
    original_backend_init = EC2Backend.__init__

    def backend_init(self, *args, **kwargs):
        with internal():
            original_backend_init(self, *args, **kwargs)

    EC2Backend.__init__ = backend_init


def run_internal(fn):
    with internal():
        fn()


if __name__ == "__main__":
    # Cheaper answers, the same bytes (check_fast_serialize.py): in either timing.
    fast_serialize.install()
    realistic = os.environ.get("QDB_AWS_TIMING", "realistic") != "instant"
    if realistic:
        install()
    # Snapshots keep their data in either timing; only their pending time is timing.
    ebs_data.install(lambda: jitter(SNAPSHOT_SECONDS) if realistic else 0)
    server.main(sys.argv[1:])
