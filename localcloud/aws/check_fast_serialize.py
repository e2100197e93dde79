"""Checks that fast_serialize changes no byte of what the emulator answers.

The same calls the control plane makes (and DescribeImages, the largest answer), with the
emulator's randomness seeded, once without and once with the patch, each in a process of its
own; the answers must be equal but for request ids and timestamps. Exits 1 with the first
difference. Usage: check_fast_serialize.py (the parent) or check_fast_serialize.py run orig|fast.
"""

import os
import re
import subprocess
import sys


def calls(fast):
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3
    from moto import mock_aws
    from moto.moto_api._internal import mock_random

    if fast:
        import fast_serialize

        fast_serialize.install()
    mock_random.seed(1)
    bodies = []

    def keep(http_response, **_):
        bodies.append(http_response.content)

    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        r53 = boto3.client("route53", region_name="us-east-1")
        for c in (ec2, r53):
            c.meta.events.register("after-call", keep)
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        sg = ec2.create_security_group(GroupName="g", Description="d")["GroupId"]
        ec2.authorize_security_group_ingress(
            GroupId=sg,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": 9000, "ToPort": 9009,
                            "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}],
        )
        tags = lambda kind, n: [{"ResourceType": kind, "Tags": [{"Key": "cluster", "Value": "a"}, {"Key": "n", "Value": str(n)}]}]
        for n in range(3):
            i = ec2.run_instances(ImageId=ami, MinCount=2, MaxCount=2, InstanceType="m6i.large",
                                  SecurityGroupIds=[sg], TagSpecifications=tags("instance", n))
            v = ec2.create_volume(AvailabilityZone="us-east-1a", Size=20, TagSpecifications=tags("volume", n))
            ec2.attach_volume(VolumeId=v["VolumeId"], InstanceId=i["Instances"][0]["InstanceId"], Device="/dev/xvdaa")
        ec2.modify_volume(VolumeId=v["VolumeId"], Size=30)
        ec2.terminate_instances(InstanceIds=[i["Instances"][1]["InstanceId"]])
        ec2.describe_instances()
        ec2.describe_instances(Filters=[{"Name": "tag:cluster", "Values": ["a"]}])
        ec2.describe_instance_attribute(InstanceId=i["Instances"][0]["InstanceId"], Attribute="userData")
        ec2.describe_volumes()
        ec2.describe_volumes_modifications()
        ec2.describe_security_groups()
        ec2.describe_tags()
        ec2.describe_instance_types(InstanceTypes=["m6i.large"])
        ec2.describe_subnets()
        z = r53.create_hosted_zone(Name="x.test", CallerReference="c")["HostedZone"]["Id"]
        r53.change_resource_record_sets(HostedZoneId=z, ChangeBatch={"Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
            "Name": "a.x.test", "Type": "A", "TTL": 60, "ResourceRecords": [{"Value": "10.0.0.1"}]}}]})
        r53.list_resource_record_sets(HostedZoneId=z)
        r53.list_hosted_zones()
    volatile = re.compile(rb"<(requestId|RequestId|clientToken)>[^<]*</\1>|\d{4}-\d\d-\d\d[T ][0-9:.]+(Z|\+00:00| UTC)?")
    sys.stdout.buffer.write(b"\n=====\n".join(volatile.sub(b"", b) for b in bodies))


def main():
    if sys.argv[1:2] == ["run"]:
        calls(sys.argv[2] == "fast")
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    # moto's mock answers in-process only for AWS's own endpoints: an endpoint from the caller's
    # environment (the local cloud's) would send these calls to a real server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = {}
    for mode in ("orig", "fast"):
        run = subprocess.run([sys.executable, __file__, "run", mode], cwd=here, env=env, capture_output=True)
        if run.returncode != 0:
            print(f"the calls ({mode}) failed:\n{run.stderr.decode(errors='replace')}")
            return 1
        out[mode] = run.stdout
    a, b = out["orig"], out["fast"]
    if a == b:
        print(f"identical: {len(a)} bytes of answers")
        return 0
    i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    print(f"differ at byte {i}:\n  without: {a[max(0, i - 120):i + 80]!r}\n  with:    {b[max(0, i - 120):i + 80]!r}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
