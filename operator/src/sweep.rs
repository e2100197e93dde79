//! The orphan sweep: every so often, the AWS resources tagged for this cluster (and, for an
//! operator that watches one namespace, that namespace) whose owner QuestDB no longer exists.
//! Cleanup behind the finalizer removes what a database had; this finds what escaped it (a
//! finalizer removed by hand, a resource EC2 listed too late, a crash between create and
//! record). Each orphan is deleted or only reported (`--orphans`), and counted in
//! `qdb_operator_orphans_total{kind,action}`.
//!
//! AWS is listed before Kubernetes: a resource is created only for a QuestDB that exists, so one
//! whose owner is missing from a later listing of QuestDBs really has none. Data volumes that a
//! deletion kept on purpose (reclaim policy Retain, tagged [`keys::RETAINED`]) are never touched.
//!
//! A sweep costs nothing when nothing is orphaned: AWS comes from the reconciles' shared
//! inventory snapshot (listed by cluster; a sweep scoped to a namespace keeps what carries its
//! namespace tag, as its own listing filtered by it did), and owners first from the controller's
//! QuestDB cache. The cache may still hold a database just deleted (its resources then wait for
//! the next sweep) but never lacks one whose resources AWS lists (the operator creates them from
//! that cache), so only a resource whose owner the cache lacks is a candidate, and candidates are
//! confirmed by a LIST taken now. Snapshots are listed once per sweep (one DescribeSnapshots);
//! those a deletion kept (tagged retained) are left, like kept volumes.

use std::collections::HashSet;
use std::time::Duration;

use kube::api::{Api, ListParams};
use qdb_crd::{QuestDB, keys};
use tracing::{info, warn};

use crate::aws::ec2::owner_of_tags_map;
use crate::aws::inventory::Listing;
use crate::aws::{AwsError, EbsSnapshot, InstanceState};
use crate::context::Context;

/// What the sweep does with an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrphanMode {
    /// Deleted: instances terminated, volumes detached and deleted, security groups deleted.
    Delete,
    /// Only logged and counted, for a human to look at.
    Report,
    /// No sweep.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Instance,
    Volume,
    SecurityGroup,
    Snapshot,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Instance => "instance",
            Kind::Volume => "volume",
            Kind::SecurityGroup => "security_group",
            Kind::Snapshot => "snapshot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub kind: Kind,
    pub id: String,
    pub owner_uid: String,
}

/// The resources of `listing` whose owner is not in `owners`, instances first (a volume or a
/// security group is released only once its instance is gone). Resources with no owner tag are
/// not the operator's; kept data volumes are left alone.
pub fn orphans(listing: &Listing, owners: &HashSet<String>) -> Vec<Orphan> {
    let orphaned = |owner: &str| !owner.is_empty() && !owners.contains(owner);
    let mut out = Vec::new();
    for i in &listing.instances {
        let owner = owner_of_tags_map(&i.tags);
        if orphaned(&owner) && i.state != InstanceState::Terminated {
            out.push(Orphan { kind: Kind::Instance, id: i.id.clone(), owner_uid: owner });
        }
    }
    for v in &listing.volumes {
        let owner = owner_of_tags_map(&v.tags);
        if orphaned(&owner) && !v.tags.contains_key(keys::RETAINED) {
            out.push(Orphan { kind: Kind::Volume, id: v.id.clone(), owner_uid: owner });
        }
    }
    for (owner, g) in &listing.groups {
        if orphaned(owner) {
            out.push(Orphan { kind: Kind::SecurityGroup, id: g.id.clone(), owner_uid: owner.clone() });
        }
    }
    out
}

/// The snapshots whose owner is not in `owners`, except those a deletion kept on purpose.
pub fn orphan_snapshots(snapshots: &[EbsSnapshot], owners: &HashSet<String>) -> Vec<Orphan> {
    snapshots
        .iter()
        .filter(|s| !s.owner_uid.is_empty() && !owners.contains(&s.owner_uid) && !s.retained)
        .map(|s| Orphan { kind: Kind::Snapshot, id: s.id.clone(), owner_uid: s.owner_uid.clone() })
        .collect()
}

/// Runs a sweep every `interval` until the future is dropped (with the controller).
pub async fn run(ctx: &Context, namespace: Option<String>, mode: OrphanMode, interval: Duration) {
    if mode == OrphanMode::Off {
        return std::future::pending().await;
    }
    // A snapshot as old as the resync serves: the converged databases' passes refresh it at that
    // pace, and an orphan found one resync later costs nothing.
    let max_age = interval.max(ctx.settings.resync);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sweep(ctx, namespace.as_deref(), mode, max_age).await {
            warn!(error = %crate::reconcile::chain(&e), "orphan sweep failed; trying again at the next");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("listing AWS resources")]
    Aws(#[from] AwsError),
    #[error("listing QuestDB resources")]
    Kube(#[from] kube::Error),
}

/// One sweep over an AWS view no older than `max_age`; returns the orphans found.
pub async fn sweep(
    ctx: &Context,
    namespace: Option<&str>,
    mode: OrphanMode,
    max_age: Duration,
) -> Result<Vec<Orphan>, SweepError> {
    let snapshot = ctx.inventory.snapshot(&ctx.aws, max_age).await?;
    let scoped;
    let listing = match namespace {
        Some(ns) => {
            scoped = snapshot.listing.in_namespace(ns);
            &scoped
        }
        None => &snapshot.listing,
    };
    // Snapshots are not in the shared inventory (no reconcile needs them all): one listing a
    // sweep, taken with AWS's view, before Kubernetes is read.
    let snapshots = ctx.aws.cluster_snapshots(&ctx.settings.cluster, namespace).await?;
    let cached: HashSet<String> =
        ctx.caches.questdbs.state().iter().filter_map(|q| q.metadata.uid.clone()).collect();
    let mut found = orphans(listing, &cached);
    found.extend(orphan_snapshots(&snapshots, &cached));
    if !found.is_empty() {
        let api: Api<QuestDB> = match namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        };
        ctx.metrics.kube("list", "QuestDB");
        let owners: HashSet<String> = api
            .list_metadata(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|q| q.metadata.uid)
            .collect();
        found = orphans(listing, &owners);
        found.extend(orphan_snapshots(&snapshots, &owners));
    }
    for kind in [Kind::Instance, Kind::Volume, Kind::SecurityGroup, Kind::Snapshot] {
        let n = found.iter().filter(|o| o.kind == kind).count();
        ctx.metrics
            .orphans_seen
            .get_or_create(&crate::metrics::KindLabels { kind: kind.as_str().into() })
            .set(n as i64);
    }
    for o in &found {
        let done = match mode {
            OrphanMode::Delete => match remove(ctx, o, listing).await {
                Ok(true) => "deleted",
                Ok(false) => continue,
                Err(e) => {
                    // Dependencies (a group still used by a terminating instance) clear by the
                    // next sweep.
                    info!(kind = o.kind.as_str(), id = %o.id, error = %e, "orphan not removed yet");
                    continue;
                }
            },
            OrphanMode::Report | OrphanMode::Off => "reported",
        };
        warn!(kind = o.kind.as_str(), id = %o.id, owner_uid = %o.owner_uid, action = done, "orphaned AWS resource");
        ctx.metrics.orphan(o.kind.as_str(), done);
    }
    Ok(found)
}

/// Deletes one orphan; false when it must wait (a volume still held by a live instance).
async fn remove(ctx: &Context, o: &Orphan, listing: &Listing) -> Result<bool, AwsError> {
    let aws = &ctx.aws;
    match o.kind {
        Kind::Instance => {
            if listing.instances.iter().any(|i| i.id == o.id && i.state == InstanceState::ShuttingDown) {
                return Ok(false);
            }
            aws.terminate_instance(&o.id).await?;
            Ok(true)
        }
        Kind::Volume => {
            let Some(v) = listing.volumes.iter().find(|v| v.id == o.id) else { return Ok(false) };
            // Attached, it waits: its orphan instance is terminated by this sweep (EC2 detaches
            // it then), and any other attachment is the EBS CSI driver's to undo.
            if !v.attachments.is_empty() {
                return Ok(false);
            }
            aws.delete_volume(&v.id).await?;
            Ok(true)
        }
        Kind::SecurityGroup => {
            aws.delete_security_group(&o.id).await?;
            Ok(true)
        }
        Kind::Snapshot => {
            aws.delete_snapshot(&o.id).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    use crate::aws::fixtures::{self, owned_by as tags};
    use crate::aws::{Instance, SecurityGroup, Volume};

    fn instance(id: &str, owner: &str, state: InstanceState) -> Instance {
        Instance { state, tags: tags(owner), ..fixtures::instance(id) }
    }

    fn volume(id: &str, mut tags: BTreeMap<String, String>, retained: bool) -> Volume {
        if retained {
            tags.insert(keys::RETAINED.into(), "true".into());
        }
        Volume { tags, ..fixtures::volume(id) }
    }

    #[test]
    fn only_what_belongs_to_a_missing_owner_is_an_orphan() {
        let sg = |id: &str| SecurityGroup {
            id: id.into(),
            rules: vec![],
            foreign: vec![],
            tags: Default::default(),
        };
        let listing = Listing {
            groups: vec![
                ("live".into(), sg("sg-live")),
                ("gone".into(), sg("sg-gone")),
                ("".into(), sg("sg-x")),
            ],
            volumes: vec![
                volume("vol-live", tags("live"), false),
                volume("vol-gone", tags("gone"), false),
                volume("vol-kept", tags("gone"), true),
                volume("vol-untagged", BTreeMap::new(), false),
            ],
            instances: vec![
                instance("i-live", "live", InstanceState::Running),
                instance("i-gone", "gone", InstanceState::Stopped),
                instance("i-done", "gone", InstanceState::Terminated),
            ],
        };
        let owners: HashSet<String> = ["live".to_string()].into();
        let found: Vec<(Kind, String)> =
            orphans(&listing, &owners).into_iter().map(|o| (o.kind, o.id)).collect();
        assert_eq!(
            found,
            [
                (Kind::Instance, "i-gone".to_string()),
                (Kind::Volume, "vol-gone".to_string()),
                (Kind::SecurityGroup, "sg-gone".to_string()),
            ],
            "instances first; kept volumes, untagged and terminated resources are not orphans"
        );
        let all: HashSet<String> = ["live".to_string(), "gone".to_string()].into();
        assert!(orphans(&listing, &all).is_empty());
    }

    #[test]
    fn a_snapshot_is_an_orphan_only_if_its_owner_is_gone_and_it_was_not_kept() {
        let snap = |id: &str, owner: &str, retained: bool| EbsSnapshot {
            id: id.into(),
            state: crate::aws::SnapshotState::Completed,
            volume_size_gib: 1,
            started: None,
            request: None,
            retained,
            owner_uid: owner.into(),
        };
        let snapshots = [
            snap("snap-live", "live", false),
            snap("snap-gone", "gone", false),
            snap("snap-kept", "gone", true),
            snap("snap-x", "", false),
        ];
        let owners: HashSet<String> = ["live".to_string()].into();
        let found: Vec<(Kind, String)> =
            orphan_snapshots(&snapshots, &owners).into_iter().map(|o| (o.kind, o.id)).collect();
        assert_eq!(found, [(Kind::Snapshot, "snap-gone".to_string())]);
    }
}
