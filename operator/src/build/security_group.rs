//! Ingress rules of the database's own security group: every client port from every allowed CIDR.
//!
//! The group belongs to one database alone, so the operator owns all of its ingress: a rule that
//! is not desired (added by hand, or for a CIDR since removed) is revoked. Rules are TCP, one port
//! each; the AWS step maps `IpPermission`s to and from [`Rule`] (a permission it cannot express as
//! one, e.g. a port range, should be revoked as a whole).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::{HTTP_PORT, ILP_PORT, PGWIRE_PORT};

pub const CLIENT_PORTS: [u16; 3] = [HTTP_PORT, PGWIRE_PORT, ILP_PORT];

/// One TCP ingress rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub port: u16,
    pub cidr: String,
}

/// Sorted and without duplicates. CIDRs are written in canonical form (host bits cleared,
/// `10.1.2.3/8` -> `10.0.0.0/8`) so they compare equal to what EC2 reports back; anything that is
/// not an IPv4 CIDR is skipped (validation has already refused it).
pub fn desired_rules(allowed_cidrs: &[String]) -> Vec<Rule> {
    let cidrs: BTreeSet<String> = allowed_cidrs.iter().filter_map(|c| canonical_cidr(c)).collect();
    let rules: BTreeSet<Rule> = cidrs
        .iter()
        .flat_map(|cidr| CLIENT_PORTS.iter().map(move |&port| Rule { port, cidr: cidr.clone() }))
        .collect();
    rules.into_iter().collect()
}

/// `(to_add, to_remove)`: authorize the first, revoke the second, and `current` equals `desired`.
pub fn sg_diff(current: &[Rule], desired: &[Rule]) -> (Vec<Rule>, Vec<Rule>) {
    let current: BTreeSet<&Rule> = current.iter().collect();
    let desired: BTreeSet<&Rule> = desired.iter().collect();
    let to_add = desired.difference(&current).map(|r| (*r).clone()).collect();
    let to_remove = current.difference(&desired).map(|r| (*r).clone()).collect();
    (to_add, to_remove)
}

pub fn canonical_cidr(cidr: &str) -> Option<String> {
    let (ip, prefix) = cidr.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    Some(format!("{}/{prefix}", Ipv4Addr::from(u32::from(ip) & mask)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(port: u16, cidr: &str) -> Rule {
        Rule { port, cidr: cidr.into() }
    }

    #[test]
    fn every_port_from_every_cidr() {
        let rules = desired_rules(&["203.0.113.0/24".into(), "10.1.2.3/8".into(), "203.0.113.0/24".into()]);
        assert_eq!(
            rules,
            [
                rule(8812, "10.0.0.0/8"),
                rule(8812, "203.0.113.0/24"),
                rule(9000, "10.0.0.0/8"),
                rule(9000, "203.0.113.0/24"),
                rule(9009, "10.0.0.0/8"),
                rule(9009, "203.0.113.0/24"),
            ]
        );
        assert!(desired_rules(&[]).is_empty());
        assert!(desired_rules(&["nonsense".into()]).is_empty());
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(canonical_cidr("0.0.0.0/0").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(canonical_cidr("1.2.3.4/0").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(canonical_cidr("1.2.3.4/32").as_deref(), Some("1.2.3.4/32"));
        assert_eq!(canonical_cidr("192.168.7.9/20").as_deref(), Some("192.168.0.0/20"));
        assert_eq!(canonical_cidr("1.2.3.4/33"), None);
        assert_eq!(canonical_cidr("1.2.3.4"), None);
    }

    #[test]
    fn diff_cases() {
        let a = desired_rules(&["203.0.113.0/24".into()]);
        let b = desired_rules(&["198.51.100.0/24".into()]);
        // In sync: nothing to do.
        assert_eq!(sg_diff(&a, &a), (vec![], vec![]));
        // Empty group: add everything.
        assert_eq!(sg_diff(&[], &a), (a.clone(), vec![]));
        // Access closed: revoke everything.
        assert_eq!(sg_diff(&a, &[]), (vec![], a.clone()));
        // CIDR replaced: add the new, revoke the old.
        assert_eq!(sg_diff(&a, &b), (b.clone(), a.clone()));
        // A stray rule (e.g. SSH added by hand) goes; duplicates in `current` count once.
        let mut current = a.clone();
        current.push(rule(22, "0.0.0.0/0"));
        current.push(a[0].clone());
        assert_eq!(sg_diff(&current, &a), (vec![], vec![rule(22, "0.0.0.0/0")]));
    }
}
