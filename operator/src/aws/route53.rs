//! Route53: the hosted zone and each database's A record in it.

use aws_sdk_route53::types::{Change, ChangeAction, ChangeBatch, ResourceRecord, ResourceRecordSet, RrType};

use super::{Aws, AwsError, Service};
use crate::build::dns::same_name;

/// Route53 returns ids as `/hostedzone/Z123`; status and logs carry the bare `Z123` (the SDK
/// accepts either form as input).
fn bare_zone_id(id: &str) -> String {
    id.trim_start_matches('/').trim_start_matches("hostedzone/").to_string()
}

fn a_record(name: &str, ip: &str, ttl: i64) -> Result<ResourceRecordSet, aws_sdk_route53::error::BuildError> {
    ResourceRecordSet::builder()
        .name(name)
        .r#type(RrType::A)
        .ttl(ttl)
        .resource_records(ResourceRecord::builder().value(ip).build()?)
        .build()
}

fn change_batch(
    action: ChangeAction,
    record: ResourceRecordSet,
) -> Result<ChangeBatch, aws_sdk_route53::error::BuildError> {
    ChangeBatch::builder()
        .changes(Change::builder().action(action).resource_record_set(record).build()?)
        .build()
}

impl Aws {
    /// The hosted zone for `zone_name` (e.g. "region-a.questdb.example"); created (public) when
    /// `create` is true and it does not exist (the local cloud has none; real accounts get theirs
    /// from infrastructure code, often private to the VPC).
    pub async fn hosted_zone(&self, zone_name: &str, create: bool) -> Result<Option<String>, AwsError> {
        const OP: &str = "ListHostedZonesByName";
        // Zones are listed in name order starting at `zone_name`: the first is it, if any.
        let req = self.route53.list_hosted_zones_by_name().dns_name(zone_name).max_items(1);
        let out = self.call(Service::Route53, OP, || req.clone().send()).await?;
        if let Some(zone) = out.hosted_zones().iter().find(|z| same_name(z.name(), zone_name)) {
            return Ok(Some(bare_zone_id(zone.id())));
        }
        if !create {
            return Ok(None);
        }
        const CREATE: &str = "CreateHostedZone";
        let req = self
            .route53
            .create_hosted_zone()
            .name(zone_name)
            .caller_reference(caller_reference(zone_name.trim_end_matches('.')));
        let out = self.call(Service::Route53, CREATE, || req.clone().send()).await?;
        let zone =
            out.hosted_zone().ok_or_else(|| AwsError::unexpected(CREATE, "no hosted zone in the reply"))?;
        tracing::info!(zone = zone_name, id = zone.id(), "created hosted zone");
        Ok(Some(bare_zone_id(zone.id())))
    }

    /// The A record `name` as Route53 has it, whole (DELETE must repeat it exactly).
    async fn find_a_record(&self, zone_id: &str, name: &str) -> Result<Option<ResourceRecordSet>, AwsError> {
        const OP: &str = "ListResourceRecordSets";
        // Records are listed in (name, type) order from the start: the first is it, if any.
        let req = self
            .route53
            .list_resource_record_sets()
            .hosted_zone_id(zone_id)
            .start_record_name(name)
            .start_record_type(RrType::A)
            .max_items(1);
        let out = self.call(Service::Route53, OP, || req.clone().send()).await?;
        Ok(out
            .resource_record_sets()
            .iter()
            .find(|r| r.r#type() == &RrType::A && same_name(r.name(), name))
            .cloned())
    }

    /// Every A record in the zone as `(name, (ip, ttl))`, names without the trailing dot: one
    /// paginated listing (300 records a page) instead of one read per database.
    pub async fn list_a_records(&self, zone_id: &str) -> Result<Vec<(String, (String, i64))>, AwsError> {
        self.list_a_records_paged(zone_id, 300).await
    }

    pub(crate) async fn list_a_records_paged(
        &self,
        zone_id: &str,
        page_size: i32,
    ) -> Result<Vec<(String, (String, i64))>, AwsError> {
        const OP: &str = "ListResourceRecordSets";
        let mut out = Vec::new();
        let mut next: Option<(String, RrType)> = None;
        loop {
            let mut req =
                self.route53.list_resource_record_sets().hosted_zone_id(zone_id).max_items(page_size);
            if let Some((name, kind)) = &next {
                req = req.start_record_name(name).start_record_type(kind.clone());
            }
            let page = self.call(Service::Route53, OP, || req.clone().send()).await?;
            for r in page.resource_record_sets().iter().filter(|r| r.r#type() == &RrType::A) {
                let ip = r.resource_records().first().map(|v| v.value().to_string()).unwrap_or_default();
                out.push((r.name().trim_end_matches('.').to_string(), (ip, r.ttl().unwrap_or_default())));
            }
            next = match (page.is_truncated(), page.next_record_name(), page.next_record_type()) {
                (true, Some(name), Some(kind)) => Some((name.to_string(), kind.clone())),
                _ => break,
            };
        }
        Ok(out)
    }

    /// `(ip, ttl)` of the A record `name`, if there is one.
    pub async fn get_a_record(&self, zone_id: &str, name: &str) -> Result<Option<(String, i64)>, AwsError> {
        let Some(record) = self.find_a_record(zone_id, name).await? else { return Ok(None) };
        let ip = record.resource_records().first().map(|r| r.value().to_string()).unwrap_or_default();
        Ok(Some((ip, record.ttl().unwrap_or_default())))
    }

    pub async fn upsert_a_record(
        &self,
        zone_id: &str,
        name: &str,
        ip: &str,
        ttl: i64,
    ) -> Result<(), AwsError> {
        const OP: &str = "ChangeResourceRecordSets";
        let batch = a_record(name, ip, ttl)
            .and_then(|r| change_batch(ChangeAction::Upsert, r))
            .map_err(|e| AwsError::unexpected(OP, e.to_string()))?;
        let req = self.route53.change_resource_record_sets().hosted_zone_id(zone_id).change_batch(batch);
        self.call(Service::Route53, OP, || req.clone().send()).await.map(|_| ())
    }

    /// Absent (or gone in between) counts as deleted; so does a zone that is gone.
    pub async fn delete_a_record(&self, zone_id: &str, name: &str) -> Result<(), AwsError> {
        const OP: &str = "ChangeResourceRecordSets";
        let record = match self.find_a_record(zone_id, name).await {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let batch = change_batch(ChangeAction::Delete, record)
            .map_err(|e| AwsError::unexpected(OP, e.to_string()))?;
        let req = self.route53.change_resource_record_sets().hosted_zone_id(zone_id).change_batch(batch);
        match self.call(Service::Route53, OP, || req.clone().send()).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// A reference unique to one CreateHostedZone call (only the local cloud creates zones; the
/// look-up by name before it is what keeps a second one from being made).
fn caller_reference(zone: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut token = format!("{zone}-{nanos:x}");
    token.truncate(128);
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_ids_lose_their_prefix() {
        assert_eq!(bare_zone_id("/hostedzone/Z0441723226OZ66S5ZCNZ"), "Z0441723226OZ66S5ZCNZ");
        assert_eq!(bare_zone_id("Z1"), "Z1");
    }

    #[test]
    fn record_shape() {
        let r = a_record("db1.example.com", "10.0.1.17", 60).unwrap();
        assert_eq!((r.name(), r.r#type(), r.ttl()), ("db1.example.com", &RrType::A, Some(60)));
        assert_eq!(r.resource_records()[0].value(), "10.0.1.17");
    }
}
