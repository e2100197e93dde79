//! The DNS step: the database's name points at its node's private IP (Route53 A record), and
//! is withdrawn while paused, when there is no node to point at.

use qdb_crd::WaitReason;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Error, Facts, aws_err};
use crate::aws::{Aws, AwsError};
use crate::build::Desired;
use crate::build::dns::dns_record;
use crate::context::Context;

/// The reasons of what this step does: it writes Route53 records only, never EC2.
pub const REASONS: &[&str] = &["UpdatedDns", "WithdrewDns"];

/// The hosted zone's id, looked up (or created) once; concurrent first passes share the lookup,
/// so the zone is never created twice.
pub async fn hosted_zone(ctx: &Context) -> Result<Option<String>, Error> {
    let mut known = ctx.hosted_zone.lock().await;
    if let Some(id) = known.as_ref() {
        return Ok(Some(id.clone()));
    }
    let found = ctx
        .aws
        .hosted_zone(&ctx.settings.dns_zone, ctx.settings.create_hosted_zone)
        .await
        .map_err(aws_err("finding the hosted zone"))?;
    known.clone_from(&found);
    Ok(found)
}

pub async fn ensure(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    let Some(zone) = hosted_zone(ctx).await? else {
        facts.wait(WaitReason::NoHostedZone, format!("no Route53 hosted zone {}", ctx.settings.dns_zone));
        return Ok(());
    };
    let ip = facts.instance.as_ref().and_then(|i| i.private_ip.clone());
    // Route53 allows five requests a second per account: the zone is listed once per resync
    // for every database, not read per database. Drift is repaired at the next listing.
    let current = ctx
        .dns_records
        .get(&ctx.aws, &zone, &d.dns_name, ctx.settings.resync)
        .await
        .map_err(aws_err("listing the DNS records"))?;
    match ip {
        Some(ip) if !d.spec.paused => {
            let want = dns_record(&d.dns_name, &ip);
            let value = (want.target.clone(), want.ttl);
            if current.as_ref() != Some(&value) {
                ctx.aws
                    .upsert_a_record(&zone, &want.name, &want.target, want.ttl)
                    .await
                    .map_err(aws_err("writing the DNS record"))?;
                ctx.dns_records.saw(&d.dns_name, Some(value)).await;
                facts.did("UpdatedDns", format!("{} -> {}", want.name, want.target));
            }
            facts.dns = Some(want);
        }
        _ if d.spec.paused && current.is_some() => {
            ctx.aws
                .delete_a_record(&zone, &d.dns_name)
                .await
                .map_err(aws_err("withdrawing the DNS record"))?;
            ctx.dns_records.saw(&d.dns_name, None).await;
            facts.did("WithdrewDns", format!("{} while paused", d.dns_name));
        }
        _ => {}
    }
    Ok(())
}

/// An A record's target and TTL, as Route53 returns them.
type Record = (String, i64);

/// The zone's A records as last listed, with the operator's own writes since, shared by every
/// reconcile. Reads that find the listing old share one new listing.
#[derive(Default)]
pub struct ZoneRecords(tokio::sync::Mutex<Listing>);

#[derive(Default)]
struct Listing {
    at: Option<Instant>,
    records: HashMap<String, Record>,
}

/// Route53 names end in a dot and compare case-insensitively.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Listing {
    fn is_fresh(&self, max_age: Duration) -> bool {
        self.at.is_some_and(|at| at.elapsed() < max_age)
    }
}

impl ZoneRecords {
    /// The A record `name` from a listing younger than `max_age`, else from a new one.
    pub async fn get(
        &self,
        aws: &Aws,
        zone: &str,
        name: &str,
        max_age: Duration,
    ) -> Result<Option<Record>, AwsError> {
        let mut listing = self.0.lock().await;
        if !listing.is_fresh(max_age) {
            let at = Instant::now();
            let records = aws.list_a_records(zone).await?;
            *listing =
                Listing { at: Some(at), records: records.into_iter().map(|(n, r)| (key(&n), r)).collect() };
        }
        Ok(listing.records.get(&key(name)).cloned())
    }

    /// What the operator itself just wrote (None: deleted), so the listing stays true without
    /// another read.
    pub async fn saw(&self, name: &str, value: Option<Record>) {
        let mut listing = self.0.lock().await;
        match value {
            Some(v) => listing.records.insert(key(name), v),
            None => listing.records.remove(&key(name)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_without_the_trailing_dot_and_case() {
        assert_eq!(key("DB-1.ns.Zone.example."), key("db-1.ns.zone.example"));
    }

    #[tokio::test]
    async fn the_operators_own_writes_update_the_listing() {
        let zone = ZoneRecords::default();
        {
            let mut l = zone.0.lock().await;
            l.at = Some(Instant::now());
            l.records.insert(key("a.zone"), ("10.0.0.1".into(), 60));
        }
        zone.saw("b.zone.", Some(("10.0.0.2".into(), 60))).await;
        zone.saw("a.zone", None).await;
        let l = zone.0.lock().await;
        assert!(l.is_fresh(Duration::from_secs(60)) && !l.is_fresh(Duration::ZERO));
        assert_eq!(l.records.get("b.zone"), Some(&("10.0.0.2".to_string(), 60)));
        assert!(!l.records.contains_key("a.zone"));
    }
}
