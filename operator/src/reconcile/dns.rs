//! The DNS step: the database's name points at its node's private IP (Route53 A record), and
//! is withdrawn while paused, when there is no node to point at.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Error, Facts, aws_err};
use crate::build::Desired;
use crate::build::dns::dns_record;
use crate::context::Context;

pub async fn hosted_zone(ctx: &Context) -> Result<Option<String>, Error> {
    if let Some(id) = ctx.hosted_zone.get() {
        return Ok(Some(id.clone()));
    }
    let found = ctx
        .aws
        .hosted_zone(&ctx.settings.dns_zone, ctx.settings.create_hosted_zone)
        .await
        .map_err(aws_err("finding the hosted zone"))?;
    if let Some(id) = &found {
        let _ = ctx.hosted_zone.set(id.clone());
    }
    Ok(found)
}

pub async fn ensure(ctx: &Context, d: &Desired, facts: &mut Facts) -> Result<(), Error> {
    let Some(zone) = hosted_zone(ctx).await? else {
        facts.wait("NoHostedZone", format!("no Route53 hosted zone {}", ctx.settings.dns_zone));
        return Ok(());
    };
    let ip = facts.instance.as_ref().and_then(|i| i.private_ip.clone());
    // Route53 allows five requests a second per account: a record read within the last resync
    // interval is taken as still true. Drift is still repaired, at the next resync.
    let current = match ctx.dns_records.recent(&d.dns_name, ctx.settings.resync) {
        Some(seen) => seen,
        None => ctx.aws.get_a_record(&zone, &d.dns_name).await.map_err(aws_err("reading the DNS record"))?,
    };
    let now = match ip {
        Some(ip) if !d.spec.paused => {
            let want = dns_record(&d.dns_name, &ip);
            let value = (want.target.clone(), want.ttl);
            if current.as_ref() != Some(&value) {
                ctx.aws
                    .upsert_a_record(&zone, &want.name, &want.target, want.ttl)
                    .await
                    .map_err(aws_err("writing the DNS record"))?;
                facts.did("UpdatedDns", format!("{} -> {}", want.name, want.target));
            }
            facts.dns = Some(want);
            Some(value)
        }
        _ if d.spec.paused && current.is_some() => {
            ctx.aws
                .delete_a_record(&zone, &d.dns_name)
                .await
                .map_err(aws_err("withdrawing the DNS record"))?;
            facts.did("WithdrewDns", format!("{} while paused", d.dns_name));
            None
        }
        _ => current,
    };
    ctx.dns_records.saw(&d.dns_name, now);
    Ok(())
}

/// An A record's target and TTL, as Route53 returns them.
type Record = (String, i64);

/// What the operator last read or wrote in Route53, per record name (None: absent), and when.
#[derive(Default)]
pub struct SeenRecords(Mutex<HashMap<String, (Option<Record>, Instant)>>);

impl SeenRecords {
    /// The record as seen within `max_age`, if it was: `Some(None)` means seen absent.
    pub fn recent(&self, name: &str, max_age: Duration) -> Option<Option<Record>> {
        let seen = self.0.lock().ok()?;
        seen.get(name).filter(|(_, at)| at.elapsed() < max_age).map(|(value, _)| value.clone())
    }

    pub fn saw(&self, name: &str, value: Option<Record>) {
        if let Ok(mut seen) = self.0.lock() {
            seen.insert(name.to_string(), (value, Instant::now()));
        }
    }

    pub fn forget(&self, name: &str) {
        if let Ok(mut seen) = self.0.lock() {
            seen.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_seen_recently_is_remembered_until_it_is_old_or_forgotten() {
        let seen = SeenRecords::default();
        assert_eq!(seen.recent("db.zone", Duration::from_secs(60)), None, "never seen");
        seen.saw("db.zone", Some(("10.0.0.1".into(), 60)));
        assert_eq!(seen.recent("db.zone", Duration::from_secs(60)), Some(Some(("10.0.0.1".into(), 60))));
        assert_eq!(seen.recent("db.zone", Duration::ZERO), None, "too old");
        seen.saw("db.zone", None);
        assert_eq!(seen.recent("db.zone", Duration::from_secs(60)), Some(None), "seen absent");
        seen.forget("db.zone");
        assert_eq!(seen.recent("db.zone", Duration::from_secs(60)), None);
    }
}
