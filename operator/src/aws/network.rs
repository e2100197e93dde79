//! Where and how this cluster's database nodes launch: the EKS cluster's VPC and a subnet per
//! availability zone, the extra security groups nodes need (the EKS cluster security group, so the
//! control plane reaches the kubelet), the node instance profile, IMDSv2, and tags for everything.
//! Empty settings launch into the account's default VPC, as before (the local cloud's emulator
//! without `up`'s network, and tools).

use std::collections::BTreeMap;

use qdb_crd::keys;

/// The operator's own tag keys start with this (see [`qdb_crd::keys`]).
const RESERVED_PREFIX: &str = "cloud.questdb.io/";

/// The operator's network settings for one regional cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Security groups are created here; None: the default VPC.
    pub vpc_id: Option<String>,
    /// Availability zone -> subnet. Non-empty: every launch goes to its zone's subnet.
    pub subnets: BTreeMap<String, String>,
    /// Added to the database's own group on every node.
    pub extra_security_groups: Vec<String>,
    /// Name or ARN of the node instance profile (the node role EKS maps to the node group).
    pub instance_profile: Option<String>,
    /// IMDSv2's hop limit: 1 keeps IMDS from pods that are not on the host network (the
    /// database pod needs none; EKS's best practices recommend it), 2 lets them reach it.
    pub imds_hop_limit: u8,
    /// Added to every instance, volume, network interface and security group. The operator's own
    /// tags (`Name`, `cloud.questdb.io/*`) are not overridable: lookups depend on them.
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("{0:?} is not ZONE=SUBNET (e.g. us-east-1a=subnet-0abc)")]
    NotZoneSubnet(String),
    #[error("{0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("tag {0:?} is the operator's own (lookups depend on it) and cannot be set")]
    ReservedTag(String),
    #[error("zone {0} has two subnets")]
    DuplicateZone(String),
    #[error("IMDS hop limit {0} is outside 1..=64")]
    HopLimit(u8),
    #[error("the volume is in {zone}, and no subnet is configured there (subnets: {configured})")]
    NoSubnet { zone: String, configured: String },
}

/// Where one instance launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// None: EC2 chooses (default VPC, first launch).
    pub zone: Option<String>,
    pub subnet: Option<String>,
}

impl NodeNetwork {
    /// Settings from the operator's flags: `ZONE=SUBNET` and `KEY=VALUE` pairs.
    pub fn from_flags(
        vpc_id: Option<String>,
        subnets: &[String],
        extra_security_groups: Vec<String>,
        instance_profile: Option<String>,
        imds_hop_limit: u8,
        tags: &[String],
    ) -> Result<NodeNetwork, NetworkError> {
        let mut zones = BTreeMap::new();
        for pair in subnets {
            let (zone, subnet) = split_pair(pair).ok_or_else(|| NetworkError::NotZoneSubnet(pair.clone()))?;
            if zones.insert(zone.to_string(), subnet.to_string()).is_some() {
                return Err(NetworkError::DuplicateZone(zone.to_string()));
            }
        }
        let mut extra = BTreeMap::new();
        for pair in tags {
            let (key, value) = split_pair(pair).ok_or_else(|| NetworkError::NotKeyValue(pair.clone()))?;
            if key == "Name" || key == keys::MANAGED_BY || key.starts_with(RESERVED_PREFIX) {
                return Err(NetworkError::ReservedTag(key.to_string()));
            }
            extra.insert(key.to_string(), value.to_string());
        }
        if !(1..=64).contains(&imds_hop_limit) {
            return Err(NetworkError::HopLimit(imds_hop_limit));
        }
        Ok(NodeNetwork {
            vpc_id: vpc_id.filter(|v| !v.is_empty()),
            subnets: zones,
            extra_security_groups: extra_security_groups.into_iter().filter(|g| !g.is_empty()).collect(),
            instance_profile: instance_profile.filter(|p| !p.is_empty()),
            imds_hop_limit,
            tags: extra,
        })
    }

    /// The subnet for a launch: the volume's zone's (an EBS volume attaches only within its zone),
    /// or for a first launch a zone chosen by the database's UID, which spreads databases over the
    /// zones and gives every try of one launch the same answer.
    pub fn placement(&self, zone: Option<&str>, owner_uid: &str) -> Result<Placement, NetworkError> {
        if self.subnets.is_empty() {
            return Ok(Placement { zone: zone.map(str::to_string), subnet: None });
        }
        let found = match zone {
            Some(zone) => self.subnets.get_key_value(zone),
            None => {
                let pick = stable_hash(owner_uid) % self.subnets.len() as u64;
                self.subnets.iter().nth(usize::try_from(pick).unwrap_or(0))
            }
        };
        match found {
            Some((zone, subnet)) => Ok(Placement { zone: Some(zone.clone()), subnet: Some(subnet.clone()) }),
            None => Err(NetworkError::NoSubnet {
                zone: zone.unwrap_or_default().to_string(),
                configured: self.subnets.keys().cloned().collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// The owner's tags followed by the configured ones (which cannot name the owner's keys).
    pub fn tags_with(&self, mut owner_tags: Vec<(String, String)>) -> Vec<(String, String)> {
        owner_tags.extend(self.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        owner_tags
    }
}

fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let (k, v) = pair.split_once('=')?;
    let (k, v) = (k.trim(), v.trim());
    (!k.is_empty() && !v.is_empty()).then_some((k, v))
}

/// FNV-1a: the same on every run and build, unlike std's randomly seeded hasher.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Whether `instance_type` takes `EbsOptimized=true`. Current generations are EBS-optimized by
/// default (true changes nothing and costs nothing); a few old ones cannot be, and RunInstances
/// refuses the flag for them, so it is left out there.
pub fn ebs_optimized(instance_type: &str) -> Option<bool> {
    let family = instance_type.split('.').next().unwrap_or_default();
    const NEVER: &[&str] = &["t1", "t2", "m1", "m2", "c1", "cc2", "cg1", "cr1", "hi1", "hs1", "g2"];
    (!NEVER.contains(&family)).then_some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(subnets: &[&str]) -> NodeNetwork {
        let subnets: Vec<String> = subnets.iter().map(|s| s.to_string()).collect();
        NodeNetwork::from_flags(Some("vpc-1".into()), &subnets, vec![], None, 1, &[]).unwrap()
    }

    #[test]
    fn a_launch_goes_to_its_volumes_zone_subnet() {
        let n = network(&["us-east-1a=subnet-a", "us-east-1b=subnet-b"]);
        let p = n.placement(Some("us-east-1b"), "uid").unwrap();
        assert_eq!(p, Placement { zone: Some("us-east-1b".into()), subnet: Some("subnet-b".into()) });
        let err = n.placement(Some("us-east-1c"), "uid").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the volume is in us-east-1c, and no subnet is configured there \
                                     (subnets: us-east-1a, us-east-1b)"
        );
    }

    #[test]
    fn a_first_launch_picks_a_zone_by_uid_the_same_every_time_and_spreads() {
        let n = network(&["us-east-1a=subnet-a", "us-east-1b=subnet-b", "us-east-1c=subnet-c"]);
        let first = n.placement(None, "3f1c").unwrap();
        assert_eq!(n.placement(None, "3f1c").unwrap(), first, "every try of one launch agrees");
        assert!(first.subnet.is_some() && first.zone.is_some());
        let zones: std::collections::BTreeSet<_> =
            (0..30).map(|i| n.placement(None, &format!("uid-{i}")).unwrap().zone.unwrap()).collect();
        assert_eq!(zones.len(), 3, "thirty databases use every zone: {zones:?}");
    }

    #[test]
    fn without_subnets_ec2_chooses_as_before() {
        let n = NodeNetwork::default();
        assert_eq!(n.placement(None, "u").unwrap(), Placement { zone: None, subnet: None });
        assert_eq!(n.placement(Some("z"), "u").unwrap(), Placement { zone: Some("z".into()), subnet: None });
    }

    #[test]
    fn flags_are_checked() {
        let bad = |subnets: &[&str], tags: &[&str], hop: u8| {
            let s: Vec<String> = subnets.iter().map(|s| s.to_string()).collect();
            let t: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
            NodeNetwork::from_flags(None, &s, vec![], None, hop, &t).unwrap_err()
        };
        assert_eq!(bad(&["us-east-1a"], &[], 1), NetworkError::NotZoneSubnet("us-east-1a".into()));
        assert_eq!(bad(&["a=s1", "a=s2"], &[], 1), NetworkError::DuplicateZone("a".into()));
        assert_eq!(bad(&[], &["team"], 1), NetworkError::NotKeyValue("team".into()));
        assert_eq!(bad(&[], &["Name=x"], 1), NetworkError::ReservedTag("Name".into()));
        assert_eq!(
            bad(&[], &["cloud.questdb.io/owner-uid=x"], 1),
            NetworkError::ReservedTag("cloud.questdb.io/owner-uid".into())
        );
        assert_eq!(bad(&[], &[], 0), NetworkError::HopLimit(0));
        let ok = NodeNetwork::from_flags(
            Some(String::new()),
            &[],
            vec![String::new(), "sg-eks".into()],
            Some(String::new()),
            2,
            &["team=db".into(), "cost-center = 42".into()],
        )
        .unwrap();
        assert_eq!(ok.vpc_id, None, "an empty flag (an unset env var in a manifest) is no VPC");
        assert_eq!(ok.extra_security_groups, ["sg-eks"]);
        assert_eq!(ok.instance_profile, None);
        let tags = ok.tags_with(vec![("Name".into(), "qdb-x".into())]);
        assert_eq!(tags[0], ("Name".into(), "qdb-x".into()), "the owner's tags come first");
        assert!(tags.contains(&("cost-center".into(), "42".into())));
    }

    #[test]
    fn ebs_optimized_only_where_ec2_takes_it() {
        assert_eq!(ebs_optimized("m6i.xlarge"), Some(true));
        assert_eq!(ebs_optimized("r7g.2xlarge"), Some(true));
        assert_eq!(ebs_optimized("t2.micro"), None);
        assert_eq!(ebs_optimized("t3.micro"), Some(true));
    }
}
