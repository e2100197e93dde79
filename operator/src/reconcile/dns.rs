//! The DNS step: the database's name points at its node's private IP (Route53 A record), and
//! is withdrawn while paused, when there is no node to point at.

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
    let current =
        ctx.aws.get_a_record(&zone, &d.dns_name).await.map_err(aws_err("reading the DNS record"))?;
    match ip {
        Some(ip) if !d.spec.paused => {
            let want = dns_record(&d.dns_name, &ip);
            if current.as_ref() != Some(&(want.target.clone(), want.ttl)) {
                ctx.aws
                    .upsert_a_record(&zone, &want.name, &want.target, want.ttl)
                    .await
                    .map_err(aws_err("writing the DNS record"))?;
                facts.did("UpdatedDns", format!("{} -> {}", want.name, want.target));
            }
            facts.dns = Some(want);
        }
        _ if d.spec.paused && current.is_some() => {
            ctx.aws
                .delete_a_record(&zone, &d.dns_name)
                .await
                .map_err(aws_err("withdrawing the DNS record"))?;
            facts.did("WithdrewDns", format!("{} while paused", d.dns_name));
        }
        _ => {}
    }
    Ok(())
}
