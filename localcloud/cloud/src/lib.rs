//! The local cloud's servers on 127.0.0.1: one module per component starts it (idempotently:
//! what is alive stays), waits until it is healthy and knows how to stop it; `commands` puts
//! them together for `up`, `down`, `status`, `restart` and `reset`.

pub mod aws;
pub mod cluster;
pub mod commands;
pub mod envfile;
pub mod kafka;
pub mod nodesim;
pub mod postgres;
pub mod probe;
pub mod process;
pub mod prometheus;
pub mod services;
pub mod settings;
pub mod tokens;
pub mod traefik;

use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use settings::Settings;

/// What every component's start and stop needs: the settings, and the state the components
/// started side by side share.
pub struct Cloud {
    pub settings: Settings,
    /// Set when one component failed, so the others stop waiting for theirs.
    failed: AtomicBool,
    /// Two components may ask for the same token at once; only one may create it.
    tokens: Mutex<()>,
    /// What this command started (not what was already up), so a failed `up` can stop it again.
    started: Mutex<Vec<process::Proc>>,
}

/// A component gave up because another one failed first; that one's error is the one to show.
#[derive(Debug, thiserror::Error)]
#[error("stopped waiting: another component failed")]
pub struct Aborted;

impl Cloud {
    pub fn new(settings: Settings) -> Cloud {
        Cloud {
            settings,
            failed: AtomicBool::new(false),
            tokens: Mutex::new(()),
            started: Mutex::new(Vec::new()),
        }
    }

    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn record_started(&self, p: &process::Proc) {
        self.started.lock().unwrap_or_else(|e| e.into_inner()).push(p.clone());
    }

    /// What this command started, last first.
    pub fn take_started(&self) -> Vec<process::Proc> {
        let mut started = std::mem::take(&mut *self.started.lock().unwrap_or_else(|e| e.into_inner()));
        started.reverse();
        started
    }
}

pub fn log(msg: impl Display) {
    eprintln!("[localcloud] {msg}");
}
