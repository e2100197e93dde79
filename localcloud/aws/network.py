"""A regional cluster's network in the AWS emulator, as an EKS cluster has it: a VPC of its own
CIDR (two regions never share node addresses, so one host can route to both), a subnet per
availability zone, the EKS cluster security group and the node instance profile. Idempotent: found
by the cluster tag or name, made only when missing. Prints what the operator's flags need as env
file lines, `export QDB_<ENV_NAME>_...` (the operator's own variables without the cluster part:
QDB_VPC_ID, QDB_SUBNETS, QDB_EXTRA_SECURITY_GROUPS, QDB_INSTANCE_PROFILE), plus the VPC's CIDR.

Usage: network.py ENDPOINT REGION CLUSTER ENV_NAME CIDR   (CIDR a /16, e.g. 10.1.0.0/16)
"""

import ipaddress
import json
import sys

import boto3

TAG = "cloud.questdb.io/cluster"


def main(endpoint, region, cluster, env_name, cidr):
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    ec2 = session.client("ec2", region_name=region, endpoint_url=endpoint)
    iam = session.client("iam", region_name=region, endpoint_url=endpoint)
    tags = [{"Key": TAG, "Value": cluster}, {"Key": "Name", "Value": f"{cluster}-eks"}]
    tagged = [{"Name": f"tag:{TAG}", "Values": [cluster]}]

    vpcs = ec2.describe_vpcs(Filters=tagged)["Vpcs"]
    if vpcs:
        vpc = vpcs[0]["VpcId"]
    else:
        vpc = ec2.create_vpc(
            CidrBlock=cidr, TagSpecifications=[{"ResourceType": "vpc", "Tags": tags}]
        )["Vpc"]["VpcId"]

    zones = sorted(
        z["ZoneName"]
        for z in ec2.describe_availability_zones()["AvailabilityZones"]
        if z.get("ZoneType", "availability-zone") == "availability-zone"
    )
    existing = {
        s["AvailabilityZone"]: s["SubnetId"]
        for s in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    }
    # A /20 per zone, in zone order: 4091 node addresses each, as eksctl's default layout has.
    blocks = ipaddress.ip_network(cidr).subnets(new_prefix=20)
    subnets = {}
    for zone, block in zip(zones, blocks):
        if zone in existing:
            subnets[zone] = existing[zone]
            continue
        subnets[zone] = ec2.create_subnet(
            VpcId=vpc,
            CidrBlock=str(block),
            AvailabilityZone=zone,
            TagSpecifications=[{"ResourceType": "subnet", "Tags": tags}],
        )["Subnet"]["SubnetId"]

    # EKS's control plane reaches kubelets through the cluster security group.
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": [f"{cluster}-eks-cluster"]}]
    )["SecurityGroups"]
    if groups:
        cluster_group = groups[0]["GroupId"]
    else:
        cluster_group = ec2.create_security_group(
            GroupName=f"{cluster}-eks-cluster",
            Description=f"EKS cluster security group of {cluster}",
            VpcId=vpc,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
        )["GroupId"]

    profile = f"{cluster}-node"
    try:
        arn = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
            ],
        }
        iam.create_role(RoleName=profile, AssumeRolePolicyDocument=json.dumps(trust))
        arn = iam.create_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Arn"]
        iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=profile)

    values = {
        "VPC_ID": vpc,
        "VPC_CIDR": cidr,
        "SUBNETS": ",".join(f"{zone}={subnet}" for zone, subnet in sorted(subnets.items())),
        "EXTRA_SECURITY_GROUPS": cluster_group,
        "INSTANCE_PROFILE": profile,
        "INSTANCE_PROFILE_ARN": arn,
    }
    for key, value in values.items():
        print(f"export QDB_{env_name}_{key}={value}")


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
