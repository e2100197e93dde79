//! The operator's one conversation with a database: a statement over pgwire (port 8812), as
//! QuestDB's own tools send `CHECKPOINT CREATE` / `CHECKPOINT RELEASE`. A new connection per
//! statement: a snapshot is rare, and a kept connection would have to survive pod restarts.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::build::PGWIRE_PORT;

/// A statement that has not answered by then is taken as failed (the next pass retries it).
const TIMEOUT: Duration = Duration::from_secs(15);

/// pgwire's credentials, as QuestDB ships them unless the database's server.conf sets its own.
const DEFAULT_USER: &str = "admin";
const DEFAULT_PASSWORD: &str = "quest";

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{statement} on {address}: no answer within {}s", TIMEOUT.as_secs())]
    Timeout { address: String, statement: String },
    #[error("{statement} on {address}")]
    Failed {
        address: String,
        statement: String,
        #[source]
        source: sqlx::Error,
    },
}

impl SqlError {
    /// QuestDB's own words (an error it answered with), for telling its answers apart.
    pub fn message(&self) -> String {
        match self {
            SqlError::Failed { source: sqlx::Error::Database(e), .. } => e.message().to_string(),
            _ => String::new(),
        }
    }
}

/// The pgwire user and password of a database: `pg.user` / `pg.password` from its server.conf,
/// else QuestDB's defaults.
pub fn credentials(server_config: &std::collections::BTreeMap<String, String>) -> (String, String) {
    let get =
        |key: &str, default: &str| server_config.get(key).cloned().unwrap_or_else(|| default.to_string());
    (get("pg.user", DEFAULT_USER), get("pg.password", DEFAULT_PASSWORD))
}

/// Runs one statement on the database at `ip` (its pod's address).
pub async fn execute(
    ip: &str,
    (user, password): &(String, String),
    statement: &'static str,
) -> Result<(), SqlError> {
    let address = format!("{ip}:{PGWIRE_PORT}");
    let failed =
        |source| SqlError::Failed { address: address.clone(), statement: statement.to_string(), source };
    let run = async {
        let options = PgConnectOptions::new()
            .host(ip)
            .port(PGWIRE_PORT)
            .username(user)
            .password(password)
            .database("qdb");
        let mut conn = PgConnection::connect_with(&options).await.map_err(failed)?;
        sqlx::raw_sql(statement).execute(&mut conn).await.map_err(failed)?;
        // A failed close leaves nothing behind that matters: the statement already ran.
        let _ = conn.close().await;
        Ok(())
    };
    tokio::time::timeout(TIMEOUT, run).await.unwrap_or_else(|_| {
        Err(SqlError::Timeout { address: address.clone(), statement: statement.to_string() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_server_config_else_questdbs_defaults() {
        assert_eq!(credentials(&Default::default()), ("admin".to_string(), "quest".to_string()));
        let conf =
            [("pg.user".to_string(), "ops".to_string()), ("pg.password".to_string(), "s3cret".to_string())];
        assert_eq!(credentials(&conf.into()), ("ops".to_string(), "s3cret".to_string()));
    }
}
