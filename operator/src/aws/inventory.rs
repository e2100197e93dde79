//! One view of the cluster's EC2 resources, shared by every reconcile. Looking each database's
//! security group, volume and instances up on its own costs three describe calls per database per
//! pass. EC2's describe budget is about 20 per second per account, and 20 databases failing over at
//! once already spent most of their time queued for it. One snapshot of everything tagged with the
//! cluster costs three calls, whatever the number of databases.
//!
//! A snapshot serves a database only if it is younger than the age the caller allows (the poll
//! interval for a database waiting on AWS, the resync interval for a converged one) and began
//! after that database last changed something in AWS. Each pass that changed something (or failed
//! part-way) marks its database, and that database's next read waits for a newer snapshot. A stale
//! view could otherwise miss a replacement just launched and launch another. Reads that wait
//! together share one fetch.
//!
//! The orphan sweep reads the same snapshot whole ([`Inventory::snapshot`]): between them, a
//! converged fleet costs the three listings once per resync, not once per resync and once per
//! sweep.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qdb_crd::keys;

use super::ec2::{owner_of_tags_map, pick_volume, sort_by_launch, tag_filter};
use super::{Aws, AwsError, Instance, SecurityGroup, Volume};

/// Everything the three listings returned, as they returned it (the sweep needs duplicates and
/// terminated instances too).
#[derive(Debug, Default, Clone)]
pub struct Listing {
    /// With the owner UID each is tagged with ("" for none).
    pub groups: Vec<(String, SecurityGroup)>,
    pub volumes: Vec<Volume>,
    pub instances: Vec<Instance>,
}

impl Listing {
    /// What is tagged with namespace `ns`: an operator that watches one sweeps only its own.
    pub fn in_namespace(&self, ns: &str) -> Listing {
        let ours = |tags: &BTreeMap<String, String>| tags.get(keys::NAMESPACE).is_some_and(|n| n == ns);
        Listing {
            groups: self.groups.iter().filter(|(_, g)| ours(&g.tags)).cloned().collect(),
            volumes: self.volumes.iter().filter(|v| ours(&v.tags)).cloned().collect(),
            instances: self.instances.iter().filter(|i| ours(&i.tags)).cloned().collect(),
        }
    }
}

/// The cluster's security groups, data volumes and live instances, by owner UID.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub started: Option<Instant>,
    pub listing: Listing,
    groups: HashMap<String, SecurityGroup>,
    volumes: HashMap<String, Volume>,
    instances: HashMap<String, Vec<Instance>>,
}

/// One database's part of the inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub security_group: Option<SecurityGroup>,
    pub volume: Option<Volume>,
    /// Not terminated, oldest launch first.
    pub instances: Vec<Instance>,
}

impl Snapshot {
    pub fn found(&self, uid: &str) -> Found {
        Found {
            security_group: self.groups.get(uid).cloned(),
            volume: self.volumes.get(uid).cloned(),
            instances: self.instances.get(uid).cloned().unwrap_or_default(),
        }
    }

    /// Groups what three cluster-wide listings returned by owner. Anything without an owner tag
    /// is not ours and is left out.
    pub fn from_listings(
        started: Instant,
        groups: Vec<(String, SecurityGroup)>,
        volumes: Vec<(Option<i64>, Volume)>,
        instances: Vec<Instance>,
    ) -> Snapshot {
        let listing = Listing {
            groups: groups.clone(),
            volumes: volumes.iter().map(|(_, v)| v.clone()).collect(),
            instances: instances.clone(),
        };
        let mut snapshot = Snapshot { started: Some(started), listing, ..Snapshot::default() };
        for (owner, g) in groups {
            if !owner.is_empty() {
                // The first one, as a lookup by owner would pick it.
                snapshot.groups.entry(owner).or_insert(g);
            }
        }
        let mut by_owner: HashMap<String, Vec<(Option<i64>, Volume)>> = HashMap::new();
        for (created, v) in volumes {
            let owner = owner_of_tags_map(&v.tags);
            if !owner.is_empty() {
                by_owner.entry(owner).or_default().push((created, v));
            }
        }
        snapshot.volumes =
            by_owner.into_iter().filter_map(|(owner, vs)| Some((owner, pick_volume(vs)?))).collect();
        for i in instances {
            let owner = owner_of_tags_map(&i.tags);
            if !owner.is_empty() {
                snapshot.instances.entry(owner).or_default().push(i);
            }
        }
        snapshot.instances.values_mut().for_each(|v| sort_by_launch(v));
        snapshot
    }
}

/// Whether a snapshot begun at `started` may serve a read asked for at `asked` by a database last
/// changed at `changed`. One begun after the read was asked for is always young enough.
pub fn is_fresh(started: Instant, asked: Instant, max_age: Duration, changed: Option<Instant>) -> bool {
    asked.saturating_duration_since(started) < max_age && changed.is_none_or(|c| started > c)
}

/// How long something this operator created may be missing from EC2's listings: EC2's Describe
/// calls lag its writes by seconds (eventual consistency); a minute covers that with room.
pub const LISTING_LAG: Duration = Duration::from_secs(60);

/// What this operator created for one database, with when: EC2 may not list it yet.
#[derive(Debug, Default, Clone)]
struct Created {
    group: Option<(SecurityGroup, Instant)>,
    volume: Option<(Volume, Instant)>,
    instances: Vec<(Instance, Instant)>,
}

impl Created {
    /// Fills in what the listing left out but was created within [`LISTING_LAG`] of `now`, so a
    /// pass never creates a second one of what EC2 has not shown yet.
    fn fill(&self, found: &mut Found, now: Instant) {
        let young = |at: &Instant| now.saturating_duration_since(*at) < LISTING_LAG;
        if found.security_group.is_none()
            && let Some((g, at)) = &self.group
            && young(at)
        {
            found.security_group = Some(g.clone());
        }
        if found.volume.is_none()
            && let Some((v, at)) = &self.volume
            && young(at)
        {
            found.volume = Some(v.clone());
        }
        for (i, at) in &self.instances {
            if young(at) && !found.instances.iter().any(|f| f.id == i.id) {
                found.instances.push(i.clone());
            }
        }
    }
}

pub struct Inventory {
    cluster: String,
    /// Held while fetching, so reconciles waiting at once share one fetch.
    current: tokio::sync::Mutex<Arc<Snapshot>>,
    changed: Mutex<HashMap<String, Instant>>,
    created: Mutex<HashMap<String, Created>>,
}

impl Inventory {
    pub fn new(cluster: &str) -> Inventory {
        Inventory {
            cluster: cluster.to_string(),
            current: tokio::sync::Mutex::new(Arc::new(Snapshot::default())),
            changed: Mutex::new(HashMap::new()),
            created: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers a security group, volume or instance just created for `uid`.
    pub fn created_group(&self, uid: &str, g: &SecurityGroup) {
        self.remember(uid, |c| c.group = Some((g.clone(), Instant::now())));
    }

    pub fn created_volume(&self, uid: &str, v: &Volume) {
        self.remember(uid, |c| c.volume = Some((v.clone(), Instant::now())));
    }

    pub fn created_instance(&self, uid: &str, i: &Instance) {
        self.remember(uid, |c| {
            c.instances.retain(|(_, at)| at.elapsed() < LISTING_LAG);
            c.instances.push((i.clone(), Instant::now()));
        });
    }

    /// An instance this operator terminated is not filled in again from memory.
    pub fn terminated_instance(&self, uid: &str, id: &str) {
        self.remember(uid, |c| c.instances.retain(|(i, _)| i.id != id));
    }

    fn remember(&self, uid: &str, f: impl FnOnce(&mut Created)) {
        if let Ok(mut c) = self.created.lock() {
            f(c.entry(uid.to_string()).or_default());
        }
    }

    fn with_created(&self, uid: &str, mut found: Found) -> Found {
        if let Ok(c) = self.created.lock()
            && let Some(created) = c.get(uid)
        {
            created.fill(&mut found, Instant::now());
            sort_by_launch(&mut found.instances);
        }
        found
    }

    /// Database `uid`'s security group, data volume and live instances (oldest launch first), from
    /// the shared snapshot when [`is_fresh`] allows it to serve at `max_age`, else from a new one.
    pub async fn lookup(&self, aws: &Aws, uid: &str, max_age: Duration) -> Result<Found, AwsError> {
        let changed = self.changed.lock().ok().and_then(|c| c.get(uid).copied());
        let snapshot = self.fresh(aws, max_age, changed).await?;
        Ok(self.with_created(uid, snapshot.found(uid)))
    }

    /// The whole snapshot, no older than `max_age`: the orphan sweep's view of AWS.
    pub async fn snapshot(&self, aws: &Aws, max_age: Duration) -> Result<Arc<Snapshot>, AwsError> {
        self.fresh(aws, max_age, None).await
    }

    async fn fresh(
        &self,
        aws: &Aws,
        max_age: Duration,
        changed: Option<Instant>,
    ) -> Result<Arc<Snapshot>, AwsError> {
        self.shared(Instant::now(), max_age, changed, |started| async move {
            let scope = || vec![tag_filter(keys::CLUSTER, &self.cluster)];
            // At once: each waits its turn at EC2's budget anyway, and in series a fleet's every
            // reconcile waited the sum of three round trips.
            let (groups, volumes, instances) = futures::try_join!(
                aws.list_security_groups(scope()),
                aws.list_volumes(scope()),
                aws.list_instances(scope()),
            )?;
            Ok(Snapshot::from_listings(started, groups, volumes, instances))
        })
        .await
    }

    /// The current snapshot if it may serve a read asked for at `asked`, else a new one from
    /// `fetch`, one fetch at a time. Freshness is judged at the time of asking, not of getting the
    /// lock: judged at the lock, a listing slower than `max_age` (three listings of 250 databases
    /// in the emulator took longer than the bench's 1 s poll) was too old for every read queued
    /// behind it, so each made its own, one after another, and a fleet's passes waited in line.
    async fn shared<F, Fut>(
        &self,
        asked: Instant,
        max_age: Duration,
        changed: Option<Instant>,
        fetch: F,
    ) -> Result<Arc<Snapshot>, AwsError>
    where
        F: FnOnce(Instant) -> Fut,
        Fut: std::future::Future<Output = Result<Snapshot, AwsError>>,
    {
        let mut current = self.current.lock().await;
        if let Some(started) = current.started
            && is_fresh(started, asked, max_age, changed)
        {
            return Ok(current.clone());
        }
        *current = Arc::new(fetch(Instant::now()).await?);
        Ok(current.clone())
    }

    /// Database `uid` changed something in AWS (or may have): its next view is fetched anew.
    pub fn changed(&self, uid: &str) {
        if let Ok(mut c) = self.changed.lock() {
            c.insert(uid.to_string(), Instant::now());
        }
    }

    /// How long ago this process last created something for `uid`, if it did.
    pub fn last_created(&self, uid: &str) -> Option<Duration> {
        let c = self.created.lock().ok()?;
        let created = c.get(uid)?;
        let times = created.group.iter().map(|g| g.1).chain(created.volume.iter().map(|v| v.1));
        times.chain(created.instances.iter().map(|i| i.1)).max().map(|t| t.elapsed())
    }

    /// Forgets a database that is gone.
    pub fn forget(&self, uid: &str) {
        if let Ok(mut c) = self.changed.lock() {
            c.remove(uid);
        }
        if let Ok(mut c) = self.created.lock() {
            c.remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::fixtures::{self, owned_by as tags};

    fn instance(id: &str, owner: &str, launched: i64) -> Instance {
        Instance { launched_at_ms: Some(launched), tags: tags(owner), ..fixtures::instance(id) }
    }

    fn volume(id: &str, owner: &str, attached_to: Option<&str>) -> Volume {
        let attached = |i| fixtures::attachment(i, crate::aws::AttachmentState::Attached);
        Volume {
            attachments: attached_to.map(attached).into_iter().collect(),
            tags: tags(owner),
            ..fixtures::volume(id)
        }
    }

    #[test]
    fn a_snapshot_serves_until_it_is_old_or_older_than_the_databases_last_change() {
        let t0 = Instant::now();
        let age = Duration::from_secs(1);
        assert!(is_fresh(t0, t0 + Duration::from_millis(500), age, None));
        assert!(!is_fresh(t0, t0 + Duration::from_secs(1), age, None), "too old");
        // Changed before the snapshot began: the snapshot shows the change.
        assert!(is_fresh(t0 + Duration::from_millis(10), t0 + Duration::from_millis(20), age, Some(t0)));
        // Changed after it began (even while it was being fetched): it may not.
        assert!(!is_fresh(t0, t0 + Duration::from_millis(20), age, Some(t0 + Duration::from_millis(10))));
        assert!(!is_fresh(t0, t0 + Duration::from_millis(20), age, Some(t0)), "same instant is not after");
    }

    #[tokio::test]
    async fn reads_queued_behind_a_slow_listing_share_one_begun_after_they_asked() {
        let inventory = Inventory::new("c");
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        // Each listing takes longer than the age the reads allow.
        let max_age = Duration::from_millis(10);
        let read = || {
            inventory.shared(Instant::now(), max_age, None, |started| {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Snapshot { started: Some(started), ..Snapshot::default() })
                }
            })
        };
        let reads = futures::future::join_all((0..8).map(|_| read())).await;
        assert!(reads.iter().all(Result::is_ok));
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1, "eight reads asked at once");
        // A read asked for after that listing's age ran out gets a new one.
        tokio::time::sleep(max_age).await;
        read().await.expect("read");
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn listings_are_grouped_by_owner_like_the_lookups_by_owner_and_kept_whole_for_the_sweep() {
        let sg = |id: &str| SecurityGroup {
            id: id.into(),
            rules: vec![],
            foreign: vec![],
            tags: Default::default(),
        };
        let s = Snapshot::from_listings(
            Instant::now(),
            vec![("a".into(), sg("sg-a")), ("".into(), sg("sg-foreign")), ("a".into(), sg("sg-a2"))],
            vec![
                (Some(1), volume("vol-a-old", "a", None)),
                (Some(2), volume("vol-a-attached", "a", Some("i-a2"))),
                (Some(3), volume("vol-b", "b", None)),
            ],
            vec![instance("i-a2", "a", 20), instance("i-a1", "a", 10), instance("i-b", "b", 5)],
        );
        let (a, b) = (s.found("a"), s.found("b"));
        assert_eq!(a.security_group.map(|g| g.id), Some("sg-a".into()));
        assert_eq!(b.security_group, None);
        assert_eq!(a.volume.map(|v| v.id), Some("vol-a-attached".into()), "the attached one wins");
        assert_eq!(b.volume.map(|v| v.id), Some("vol-b".into()));
        let ids: Vec<_> = a.instances.into_iter().map(|i| i.id).collect();
        assert_eq!(ids, ["i-a1", "i-a2"], "oldest launch first");
        assert_eq!(s.found("c"), Found { security_group: None, volume: None, instances: vec![] });
        // The sweep's view keeps what grouping by owner drops: the foreign and second group, the
        // volume not picked.
        let l = &s.listing;
        assert_eq!((l.groups.len(), l.volumes.len(), l.instances.len()), (3, 3, 3));
    }

    #[test]
    fn a_namespace_scoped_sweep_sees_only_what_carries_its_namespace_tag() {
        let in_ns = |ns: Option<&str>| {
            let mut t = tags("a");
            match ns {
                Some(ns) => t.insert(keys::NAMESPACE.into(), ns.into()),
                None => t.remove(keys::NAMESPACE),
            };
            t
        };
        let sg =
            |id: &str, ns| SecurityGroup { id: id.into(), rules: vec![], foreign: vec![], tags: in_ns(ns) };
        let vol = |id: &str, ns| Volume { tags: in_ns(ns), ..fixtures::volume(id) };
        let inst = |id: &str, ns| Instance { tags: in_ns(ns), ..fixtures::instance(id) };
        let listing = Listing {
            groups: vec![("a".into(), sg("sg-1", Some("one"))), ("a".into(), sg("sg-2", Some("two")))],
            volumes: vec![vol("vol-1", Some("one")), vol("vol-none", None)],
            instances: vec![inst("i-2", Some("two")), inst("i-1", Some("one"))],
        };
        let one = listing.in_namespace("one");
        let ids: Vec<&str> = one.groups.iter().map(|(_, g)| g.id.as_str()).collect();
        assert_eq!(ids, ["sg-1"]);
        let ids: Vec<&str> = one.volumes.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(ids, ["vol-1"], "a resource without the namespace tag is nobody's namespace's");
        let ids: Vec<&str> = one.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["i-1"]);
    }
}
