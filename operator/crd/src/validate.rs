//! Checks on a spec that the CRD schema states as patterns (repeated here so the provisioner can
//! reject before writing) or cannot state at all (server.conf keys and values, CIDR octets).

use std::net::Ipv4Addr;

use crate::{QuestDBSpec, VolumeSpec, VolumeType};

pub const MAX_VOLUME_GIB: u32 = 16384;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("version {0:?} is not MAJOR.MINOR.PATCH")]
    Version(String),
    #[error("instance type {0:?} is not an EC2 instance type like m6i.xlarge")]
    InstanceType(String),
    #[error("node image {0:?} is not an AMI id like ami-0123456789abcdef0")]
    NodeImage(String),
    #[error("volume size {0} GiB is outside 1..={MAX_VOLUME_GIB}")]
    VolumeSize(u32),
    #[error("allowed CIDR {0:?} is not an IPv4 CIDR like 203.0.113.0/24")]
    Cidr(String),
    #[error("server config key {0:?} must be lowercase letters, digits, '.', '_' or '-'")]
    ConfigKey(String),
    #[error("server config value of {0:?} must be one line without control characters")]
    ConfigValue(String),
    #[error("server config value of {0:?} must not begin or end with blanks: QuestDB trims them")]
    ConfigValueBlanks(String),
    #[error("volume performance: {0}")]
    VolumePerformance(String),
    #[error("DNS name {0:?} is not a lowercase domain name")]
    DnsName(String),
    #[error("volume to start from {0:?} is not an EBS volume id like vol-0123456789abcdef0")]
    FromVolume(String),
    #[error("snapshot to start from {0:?} is not an EBS snapshot id like snap-0123456789abcdef0")]
    FromSnapshot(String),
    #[error("snapshot to restore {0:?} is not an EBS snapshot id like snap-0123456789abcdef0")]
    RestoreSnapshot(String),
    #[error("zone to restore into {0:?} is not an availability zone name like us-east-1b")]
    RestoreZone(String),
    #[error("a database starts from one of a kept volume, a snapshot or an adopted volume")]
    TwoStarts,
    #[error("adopt: {0}")]
    Adopt(String),
    #[error("snapshot policy: keep {0} is outside 1..={MAX_SNAPSHOTS_KEPT}")]
    SnapshotsKept(u32),
    #[error("snapshot policy: {0}")]
    Schedule(#[from] crate::cron::CronError),
    #[error("snapshot policy: the schedule names no day that exists (e.g. 31 February)")]
    ScheduleNeverFires,
}

/// The most snapshots a policy keeps (EBS allows 100,000 per region; a database's listing in
/// status stays small).
pub const MAX_SNAPSHOTS_KEPT: u32 = 1000;

/// An RFC 1123 label: what a database id must be, as it names the resource and its objects
/// and is a label value.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every problem is reported, not only the first, so one round trip fixes them all.
pub fn validate(spec: &QuestDBSpec) -> Result<(), Vec<SpecError>> {
    let mut errors = Vec::new();
    if !is_semver(&spec.version) {
        errors.push(SpecError::Version(spec.version.clone()));
    }
    if !is_instance_type(&spec.instance_type) {
        errors.push(SpecError::InstanceType(spec.instance_type.clone()));
    }
    if !is_ami(&spec.node_image) {
        errors.push(SpecError::NodeImage(spec.node_image.clone()));
    }
    if !(1..=MAX_VOLUME_GIB).contains(&spec.volume.size_gib) {
        errors.push(SpecError::VolumeSize(spec.volume.size_gib));
    }
    if let Err(why) = volume_performance(&spec.volume) {
        errors.push(SpecError::VolumePerformance(why));
    }
    if let Some(id) = spec.volume.from_volume.as_ref().filter(|id| !is_resource_id(id, "vol-")) {
        errors.push(SpecError::FromVolume(id.clone()));
    }
    if let Some(id) = spec.volume.from_snapshot.as_ref().filter(|id| !is_resource_id(id, "snap-")) {
        errors.push(SpecError::FromSnapshot(id.clone()));
    }
    if let Some(r) = &spec.restore {
        if !is_resource_id(&r.snapshot, "snap-") {
            errors.push(SpecError::RestoreSnapshot(r.snapshot.clone()));
        }
        let zone_name = |z: &str| {
            (1..=64).contains(&z.len())
                && z.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if let Some(z) = r.zone.as_ref().filter(|z| !zone_name(z)) {
            errors.push(SpecError::RestoreZone(z.clone()));
        }
    }
    if let Some(keep) = spec.snapshot_policy.keep.filter(|k| !(1..=MAX_SNAPSHOTS_KEPT).contains(k)) {
        errors.push(SpecError::SnapshotsKept(keep));
    }
    match spec.snapshot_policy.schedule.as_deref().map(str::parse::<crate::cron::Schedule>) {
        Some(Err(e)) => errors.push(e.into()),
        Some(Ok(s)) if !s.ever_fires() => errors.push(SpecError::ScheduleNeverFires),
        _ => {}
    }
    let starts =
        [spec.volume.from_volume.is_some(), spec.volume.from_snapshot.is_some(), spec.adopt.is_some()];
    if starts.iter().filter(|s| **s).count() > 1 {
        errors.push(SpecError::TwoStarts);
    }
    if let Some(a) = &spec.adopt {
        for (id, prefix) in [(&a.instance_id, "i-"), (&a.volume_id, "vol-"), (&a.security_group_id, "sg-")] {
            if !is_resource_id(id, prefix) {
                errors.push(SpecError::Adopt(format!("{id:?} is not an id like {prefix}0123456789abcdef0")));
            }
        }
    }
    for cidr in &spec.network.allowed_cidrs {
        if !is_ipv4_cidr(cidr) {
            errors.push(SpecError::Cidr(cidr.clone()));
        }
    }
    for (k, v) in &spec.server_config {
        let key_ok = !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !key_ok {
            errors.push(SpecError::ConfigKey(k.clone()));
        }
        // A newline would let a value write arbitrary extra lines into server.conf; other control
        // characters (DEL, C1) the apiserver refuses in an apply body (YAML allows none of them).
        if v.chars().any(|c| c.is_control() && c != '\t') {
            errors.push(SpecError::ConfigValue(k.clone()));
        } else if v.trim() != v {
            // Checked against QuestDB 9.3: it trims every value it reads from server.conf, even
            // blanks escaped for Java's properties format, so such a value could never apply.
            errors.push(SpecError::ConfigValueBlanks(k.clone()));
        }
    }
    if let Some(name) = &spec.network.dns_name
        && !is_dns_name(name)
    {
        errors.push(SpecError::DnsName(name.clone()));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// EBS's limits on provisioned IOPS and throughput by volume type, as CreateVolume and
/// ModifyVolume document them, so AWS never refuses what the spec asks.
pub fn volume_performance(v: &VolumeSpec) -> Result<(), String> {
    let size = u64::from(v.size_gib);
    match v.type_ {
        VolumeType::Gp2 => match (v.iops, v.throughput_mibps) {
            (None, None) => Ok(()),
            _ => Err("gp2 takes no iops or throughput: both follow its size".into()),
        },
        VolumeType::Gp3 => {
            let iops = v.iops.unwrap_or(GP3_BASE_IOPS);
            if !(GP3_BASE_IOPS..=16_000).contains(&iops) {
                return Err(format!("gp3 iops {iops} is outside 3000-16000"));
            }
            // The baseline 3000 comes with every size; more is at most 500 per GiB.
            if iops > GP3_BASE_IOPS && u64::from(iops) > 500 * size {
                return Err(format!("gp3 iops {iops} exceeds 500 per GiB ({} for {size} GiB)", 500 * size));
            }
            let throughput = v.throughput_mibps.unwrap_or(125);
            if !(125..=1000).contains(&throughput) {
                return Err(format!("gp3 throughput {throughput} MiB/s is outside 125-1000"));
            }
            if u64::from(throughput) * 4 > u64::from(iops) {
                return Err(format!(
                    "gp3 throughput {throughput} MiB/s exceeds 0.25 MiB/s per IOPS ({} at {iops} IOPS)",
                    iops / 4
                ));
            }
            Ok(())
        }
        VolumeType::Io2 => {
            let Some(iops) = v.iops else { return Err("io2 needs iops (100-256000)".into()) };
            if !(100..=256_000).contains(&iops) {
                return Err(format!("io2 iops {iops} is outside 100-256000"));
            }
            if u64::from(iops) > 1000 * size {
                return Err(format!("io2 iops {iops} exceeds 1000 per GiB ({} for {size} GiB)", 1000 * size));
            }
            match v.throughput_mibps {
                None => Ok(()),
                Some(_) => Err("io2 takes no throughput: it follows the iops".into()),
            }
        }
    }
}

/// What every gp3 volume gets without asking.
const GP3_BASE_IOPS: u32 = 3000;

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The CRD caps the version at 32 characters (its CEL rule's cost budget).
fn is_semver(s: &str) -> bool {
    if s.len() > 32 {
        return false;
    }
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| is_digits(p))
}

fn is_instance_type(s: &str) -> bool {
    let Some((family, size)) = s.split_once('.') else { return false };
    family.starts_with(|c: char| c.is_ascii_lowercase())
        && family.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !size.is_empty()
        && size.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn is_ami(s: &str) -> bool {
    is_resource_id(s, "ami-")
}

/// An EC2 id: the prefix, then 8 or 17 lowercase hex digits.
fn is_resource_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

pub fn is_ipv4_cidr(s: &str) -> bool {
    let Some((ip, prefix)) = s.split_once('/') else { return false };
    // Ipv4Addr's parser already refuses leading zeros and octets above 255.
    ip.parse::<Ipv4Addr>().is_ok()
        && is_digits(prefix)
        && prefix.len() <= 2
        && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
}

fn is_dns_name(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && s.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NetworkSpec, ReclaimPolicy, VolumeSpec, VolumeType};

    pub fn spec() -> QuestDBSpec {
        QuestDBSpec {
            version: "8.2.1".into(),
            instance_type: "m6i.xlarge".into(),
            node_image: "ami-0123456789abcdef0".into(),
            volume: VolumeSpec {
                size_gib: 100,
                type_: VolumeType::Gp3,
                iops: None,
                throughput_mibps: None,
                reclaim_policy: ReclaimPolicy::Delete,
                from_volume: None,
                from_snapshot: None,
            },
            server_config: [("cairo.commit.lag".to_string(), "1000".to_string())].into(),
            paused: false,
            restart_token: None,
            allow_version_downgrade: false,
            network: NetworkSpec {
                allowed_cidrs: vec!["203.0.113.0/24".into()],
                dns_name: Some("db1.example.com".into()),
            },
            adopt: None,
            snapshot: None,
            restore: None,
            snapshot_policy: Default::default(),
        }
    }

    #[test]
    fn a_good_spec_passes() {
        assert_eq!(validate(&spec()), Ok(()));
    }

    #[test]
    fn every_error_is_reported() {
        let mut s = spec();
        s.version = "8.2".into();
        s.instance_type = "huge".into();
        s.node_image = "img-1".into();
        s.volume.size_gib = 0;
        s.network.allowed_cidrs = vec!["10.0.0.0/33".into(), "300.1.1.1/8".into(), "1.2.3.4".into()];
        s.server_config.insert("Bad Key".into(), "x".into());
        s.server_config.insert("http.bind.to".into(), "0.0.0.0\nevil=1".into());
        s.network.dns_name = Some("Not_A_Name".into());
        s.volume.from_volume = Some("snap-0123456789abcdef0".into());
        let errors = validate(&s).unwrap_err();
        assert_eq!(errors.len(), 11, "{errors:?}");
        assert!(errors.contains(&SpecError::VolumeSize(0)));
        assert!(errors.contains(&SpecError::FromVolume("snap-0123456789abcdef0".into())));
        assert!(errors.contains(&SpecError::ConfigValue("http.bind.to".into())));
    }

    #[test]
    fn an_adoption_names_three_resource_ids_and_no_kept_volume() {
        let mut s = spec();
        s.adopt = Some(crate::AdoptSpec {
            instance_id: "i-0123456789abcdef0".into(),
            volume_id: "vol-0123456789abcdef0".into(),
            security_group_id: "sg-0123456789abcdef0".into(),
        });
        assert_eq!(validate(&s), Ok(()));
        s.volume.from_volume = Some("vol-0123456789abcdef1".into());
        if let Some(a) = s.adopt.as_mut() {
            a.security_group_id = "vol-0123456789abcdef0".into();
        }
        let errors = validate(&s).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.contains(&SpecError::TwoStarts), "{errors:?}");
        assert!(errors.iter().any(|e| matches!(e, SpecError::Adopt(m) if m.contains("sg-"))), "{errors:?}");
    }

    #[test]
    fn a_database_starts_from_one_snapshot_id_and_nothing_else() {
        let mut s = spec();
        s.volume.from_snapshot = Some("snap-0123456789abcdef0".into());
        assert_eq!(validate(&s), Ok(()));
        s.volume.from_snapshot = Some("vol-0123456789abcdef0".into());
        assert_eq!(validate(&s), Err(vec![SpecError::FromSnapshot("vol-0123456789abcdef0".into())]));
        let mut s = spec();
        let restore = |snapshot: &str, zone: Option<&str>| crate::RestoreRequest {
            id: "i-1".into(),
            snapshot: snapshot.into(),
            zone: zone.map(String::from),
        };
        s.restore = Some(restore("snap-0123456789abcdef0", Some("us-east-1b")));
        assert_eq!(validate(&s), Ok(()));
        s.restore = Some(restore("vol-0123456789abcdef0", Some("US East")));
        assert_eq!(
            validate(&s),
            Err(vec![
                SpecError::RestoreSnapshot("vol-0123456789abcdef0".into()),
                SpecError::RestoreZone("US East".into())
            ])
        );
        let mut s = spec();
        s.snapshot_policy.keep = Some(0);
        assert_eq!(validate(&s), Err(vec![SpecError::SnapshotsKept(0)]));
        s.snapshot_policy.keep = Some(1);
        assert_eq!(validate(&s), Ok(()));
        s.snapshot_policy.schedule = Some("0 3 * * MON".into());
        assert!(matches!(&validate(&s).unwrap_err()[..], [SpecError::Schedule(_)]));
        s.snapshot_policy.schedule = Some("0 3 31 2 *".into());
        assert_eq!(validate(&s), Err(vec![SpecError::ScheduleNeverFires]));
        s.snapshot_policy.schedule = Some("0 3 * * 1".into());
        assert_eq!(validate(&s), Ok(()));
        s.volume.from_snapshot = Some("snap-0123456789abcdef0".into());
        s.volume.from_volume = Some("vol-0123456789abcdef0".into());
        assert_eq!(validate(&s), Err(vec![SpecError::TwoStarts]));
    }

    #[test]
    fn what_the_apiserver_refuses_is_refused_first() {
        // Found by provisioner_outcomes::every_spec_the_provisioner_accepts_the_apiserver_accepts.
        let mut s = spec();
        s.version = format!("1.2.{}", "9".repeat(28));
        assert_eq!(s.version.len(), 32);
        assert!(validate(&s).is_ok());
        s.version.push('9');
        assert_eq!(validate(&s), Err(vec![SpecError::Version(s.version.clone())]));
        let mut s = spec();
        s.server_config.insert("a".into(), "tab\tis fine, é€😀 too".into());
        assert!(validate(&s).is_ok());
        for bad in ["del\u{7f}", "c1\u{85}", "nul\u{0}", "cr\r"] {
            let mut s = spec();
            s.server_config.insert("a".into(), bad.into());
            assert_eq!(validate(&s), Err(vec![SpecError::ConfigValue("a".into())]), "{bad:?}");
        }
        for bad in [" leading", "trailing ", "\ttab first", "both "] {
            let mut s = spec();
            s.server_config.insert("a".into(), bad.into());
            assert_eq!(validate(&s), Err(vec![SpecError::ConfigValueBlanks("a".into())]), "{bad:?}");
        }
    }

    #[test]
    fn volume_performance_follows_ebs_limits() {
        let v = |type_, size_gib, iops, throughput_mibps| VolumeSpec {
            size_gib,
            type_,
            iops,
            throughput_mibps,
            reclaim_policy: ReclaimPolicy::Delete,
            from_volume: None,
            from_snapshot: None,
        };
        use VolumeType::*;
        for ok in [
            v(Gp3, 1, None, None),
            v(Gp3, 1, Some(3000), Some(750)),
            v(Gp3, 32, Some(16_000), Some(1000)),
            v(Gp2, 20, None, None),
            v(Io2, 4, Some(4000), None),
            v(Io2, 16384, Some(256_000), None),
        ] {
            assert_eq!(volume_performance(&ok), Ok(()), "{ok:?}");
        }
        for (bad, why) in [
            (v(Gp3, 100, Some(2999), None), "outside 3000-16000"),
            (v(Gp3, 100, Some(16_001), None), "outside 3000-16000"),
            (v(Gp3, 10, Some(6000), None), "500 per GiB (5000 for 10 GiB)"),
            (v(Gp3, 100, None, Some(1001)), "outside 125-1000"),
            (v(Gp3, 100, None, Some(751)), "0.25 MiB/s per IOPS (750 at 3000 IOPS)"),
            (v(Gp2, 100, Some(3000), None), "gp2 takes no iops"),
            (v(Gp2, 100, None, Some(125)), "gp2 takes no iops"),
            (v(Io2, 100, None, None), "io2 needs iops"),
            (v(Io2, 100, Some(99), None), "outside 100-256000"),
            (v(Io2, 4, Some(4001), None), "1000 per GiB (4000 for 4 GiB)"),
            (v(Io2, 100, Some(1000), Some(125)), "io2 takes no throughput"),
        ] {
            let err = volume_performance(&bad).expect_err(&format!("{bad:?}"));
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn cidr_edges() {
        assert!(is_ipv4_cidr("0.0.0.0/0"));
        assert!(is_ipv4_cidr("255.255.255.255/32"));
        assert!(!is_ipv4_cidr("1.2.3.4/"));
        assert!(!is_ipv4_cidr("1.2.3/24"));
        assert!(!is_ipv4_cidr("01.2.3.4/24"));
        assert!(!is_ipv4_cidr("1.2.3.4/024"));
    }
}
