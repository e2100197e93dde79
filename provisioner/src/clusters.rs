//! The cluster registry: one Kubernetes client per regional cluster named in the config file.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use qdb_crd::QuestDB;

use crate::config::FileConfig;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cluster {cluster}: reading kubeconfig {path}")]
    Kubeconfig { cluster: String, path: String, source: kube::config::KubeconfigError },
    #[error("cluster {cluster}: building client")]
    Client { cluster: String, source: Box<dyn std::error::Error + Send + Sync> },
}

/// One regional cluster: where its QuestDB resources live.
#[derive(Clone)]
pub struct Cluster {
    pub name: String,
    pub namespace: String,
    /// Requests: a dead apiserver fails them within seconds.
    pub client: kube::Client,
    /// The watch: a quiet one sends nothing for up to [`qdb_crd::WATCH_SECS`], which the
    /// request client's read timeout would take for a dead connection.
    watch_client: kube::Client,
}

impl Cluster {
    pub fn questdbs(&self) -> Api<QuestDB> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The resources as the tracker's watch reads them (see `watch_client`).
    pub fn watched_questdbs(&self) -> Api<QuestDB> {
        Api::namespaced(self.watch_client.clone(), &self.namespace)
    }

    /// Whether the apiserver says it is ready to serve (`/readyz`, which every identity may read),
    /// and if not, why: the checks it failed, or the error that kept it from answering.
    pub async fn readiness(&self) -> Result<(), String> {
        let request = http::Request::get("/readyz?verbose").body(Vec::new()).map_err(|e| e.to_string())?;
        match self.client.request_text(request).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) => {
                let failed = failed_checks(&status.message);
                Err(if failed.is_empty() {
                    format!("readyz answered {}", status.code)
                } else {
                    format!("readyz failed {}", failed.join(", "))
                })
            }
            Err(e) => Err(format!("readyz: {e}")),
        }
    }
}

/// The checks a verbose `/readyz` answer lists as failed (`[-]poststarthook/rbac/bootstrap-roles
/// failed: reason withheld` gives `poststarthook/rbac/bootstrap-roles`).
pub fn failed_checks(readyz: &str) -> Vec<&str> {
    readyz
        .lines()
        .filter_map(|line| line.trim().strip_prefix("[-]"))
        .map(|rest| rest.split_once(' ').map_or(rest, |(check, _)| check))
        .collect()
}

#[derive(Clone, Default)]
pub struct Registry {
    clusters: BTreeMap<String, Cluster>,
}

impl Registry {
    /// Builds a client per cluster. Nothing is contacted here: a cluster that is down at start-up
    /// only delays its own databases.
    pub async fn connect(file: &FileConfig) -> Result<Self, RegistryError> {
        let mut clusters = BTreeMap::new();
        for (name, c) in &file.clusters {
            let kc = Kubeconfig::read_from(&c.kubeconfig).map_err(|source| RegistryError::Kubeconfig {
                cluster: name.clone(),
                path: c.kubeconfig.display().to_string(),
                source,
            })?;
            let options = KubeConfigOptions { context: c.context.clone(), ..Default::default() };
            let mut config = kube::Config::from_custom_kubeconfig(kc, &options).await.map_err(|source| {
                RegistryError::Kubeconfig {
                    cluster: name.clone(),
                    path: c.kubeconfig.display().to_string(),
                    source,
                }
            })?;
            // A dead apiserver must fail a request quickly so the instruction is retried later
            // instead of holding a worker for the default five minutes.
            config.connect_timeout = Some(Duration::from_secs(5));
            config.write_timeout = Some(Duration::from_secs(15));
            let build = |read_timeout: Duration| {
                let mut config = config.clone();
                config.read_timeout = Some(read_timeout);
                kube::Client::try_from(config).map_err(|source| RegistryError::Client {
                    cluster: name.clone(),
                    source: Box::new(source),
                })
            };
            let client = build(Duration::from_secs(15))?;
            let watch_client = build(qdb_crd::watch_read_timeout())?;
            clusters.insert(
                name.clone(),
                Cluster { name: name.clone(), namespace: c.namespace.clone(), client, watch_client },
            );
        }
        Ok(Registry { clusters })
    }

    pub fn get(&self, name: &str) -> Option<&Cluster> {
        self.clusters.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.clusters.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Cluster> {
        self.clusters.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_readyz_checks_are_named() {
        // As kube-apiserver 1.37 answered a second after a restart, while it answered 403s.
        let body = "[+]ping ok\n[+]informer-sync ok\n[-]poststarthook/rbac/bootstrap-roles failed: reason \
                    withheld\n[-]poststarthook/scheduling/bootstrap-system-priority-classes failed: reason \
                    withheld\n[+]shutdown ok\nreadyz check failed";
        assert_eq!(
            failed_checks(body),
            [
                "poststarthook/rbac/bootstrap-roles",
                "poststarthook/scheduling/bootstrap-system-priority-classes"
            ]
        );
        assert!(failed_checks("[+]ping ok\nreadyz check passed").is_empty());
    }
}
