//! What the simulator reads from the EC2 emulator: the instances of its cluster, their user data,
//! and whether a volume is attached to an instance.

use anyhow::{Context, Result};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceAttributeName, InstanceStateName, VolumeAttachmentState};
use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub running: bool,
    pub terminated: bool,
    pub private_dns: String,
    pub private_ip: String,
    pub public_ip: Option<String>,
    pub az: String,
    pub instance_type: String,
    pub image_id: String,
}

pub async fn cluster_instances(ec2: &Client, tag_key: &str, cluster: &str) -> Result<Vec<Instance>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(Filter::builder().name(format!("tag:{tag_key}")).values(cluster).build())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.context("DescribeInstances")?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            let Some(id) = i.instance_id() else { continue };
            let state = i.state().and_then(|s| s.name());
            out.push(Instance {
                id: id.to_string(),
                running: state == Some(&InstanceStateName::Running),
                terminated: matches!(
                    state,
                    Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
                ),
                private_dns: i.private_dns_name().unwrap_or_default().to_string(),
                private_ip: i.private_ip_address().unwrap_or_default().to_string(),
                public_ip: i.public_ip_address().map(str::to_string),
                az: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
                instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                image_id: i.image_id().unwrap_or_default().to_string(),
            });
        }
    }
    Ok(out)
}

pub async fn user_data(ec2: &Client, instance_id: &str) -> Result<String> {
    let out = ec2
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .with_context(|| format!("DescribeInstanceAttribute userData of {instance_id}"))?;
    let Some(encoded) = out.user_data().and_then(|v| v.value()) else {
        return Ok(String::new());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .with_context(|| format!("user data of {instance_id} is not base64"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// EC2's figures for an instance type: what the machine has, which the node reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineType {
    pub memory_mib: u64,
    pub vcpus: u64,
    pub network_interfaces: u64,
    pub ipv4_per_interface: u64,
}

pub async fn machine_type(ec2: &Client, name: &str) -> Result<MachineType> {
    let out = ec2
        .describe_instance_types()
        .instance_types(name.into())
        .send()
        .await
        .with_context(|| format!("DescribeInstanceTypes {name}"))?;
    let t = out.instance_types().first().with_context(|| format!("EC2 knows no instance type {name}"))?;
    let n = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
    Ok(MachineType {
        memory_mib: n(t.memory_info().and_then(|m| m.size_in_mib())),
        vcpus: n(t.v_cpu_info().and_then(|v| v.default_v_cpus()).map(i64::from)),
        network_interfaces: n(t.network_info().and_then(|v| v.maximum_network_interfaces()).map(i64::from)),
        ipv4_per_interface: n(t.network_info().and_then(|v| v.ipv4_addresses_per_interface()).map(i64::from)),
    })
}

/// The volume's size in bytes when EC2 reports it attached to exactly this instance.
pub async fn attached_volume(ec2: &Client, volume_id: &str, instance_id: &str) -> Result<Option<u64>> {
    let sizes = describe_volumes(ec2, &[volume_id.to_string()], Some(instance_id)).await?;
    Ok(sizes.get(volume_id).copied())
}

/// The volumes EC2 knows among `ids`.
async fn volumes(ec2: &Client, ids: &[String]) -> Result<Vec<aws_sdk_ec2::types::Volume>> {
    let out = ec2
        .describe_volumes()
        // A filter, not VolumeIds: one volume deleted meanwhile must not fail the whole call.
        .filters(Filter::builder().name("volume-id").set_values(Some(ids.to_vec())).build())
        .send()
        .await
        .with_context(|| format!("DescribeVolumes {}", ids.join(" ")))?;
    Ok(out.volumes.unwrap_or_default())
}

/// Volume id -> size in bytes, of the volumes EC2 knows among `ids` (attached to `instance_id`
/// only, if given).
pub async fn describe_volumes(
    ec2: &Client,
    ids: &[String],
    instance_id: Option<&str>,
) -> Result<std::collections::BTreeMap<String, u64>> {
    Ok(volumes(ec2, ids)
        .await?
        .iter()
        .filter(|v| {
            instance_id.is_none_or(|i| {
                v.attachments().iter().any(|a| {
                    a.instance_id() == Some(i) && a.state() == Some(&VolumeAttachmentState::Attached)
                })
            })
        })
        .filter_map(|v| Some((v.volume_id()?.to_string(), v.size()?.max(0) as u64 * (1 << 30))))
        .collect())
}

/// Volume id -> its attachments (instance id, state), for the volumes EC2 lists among `ids`.
pub async fn volume_attachments(
    ec2: &Client,
    ids: &[String],
) -> Result<std::collections::BTreeMap<String, Vec<(String, VolumeAttachmentState)>>> {
    Ok(volumes(ec2, ids)
        .await?
        .iter()
        .filter_map(|v| {
            let attachments = v
                .attachments()
                .iter()
                .filter_map(|a| Some((a.instance_id()?.to_string(), a.state()?.clone())))
                .collect();
            Some((v.volume_id()?.to_string(), attachments))
        })
        .collect())
}

/// The EBS CSI driver's ControllerPublishVolume.
pub async fn attach_volume(ec2: &Client, volume_id: &str, instance_id: &str, device: &str) -> Result<()> {
    ec2.attach_volume()
        .volume_id(volume_id)
        .instance_id(instance_id)
        .device(device)
        .send()
        .await
        .map(drop)
        .with_context(|| format!("AttachVolume {volume_id} to {instance_id}"))
}

/// The EBS CSI driver's ControllerUnpublishVolume.
pub async fn detach_volume(ec2: &Client, volume_id: &str, instance_id: &str) -> Result<()> {
    ec2.detach_volume()
        .volume_id(volume_id)
        .instance_id(instance_id)
        .send()
        .await
        .map(drop)
        .with_context(|| format!("DetachVolume {volume_id} from {instance_id}"))
}
