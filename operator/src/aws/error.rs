//! One error type for every AWS call, carrying the operation's name and, for a service error, the
//! error code that callers branch on ("already gone", "throttled").

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// AWS answered with an error.
    #[error("{operation}: {code}: {message} (HTTP {status})")]
    Service {
        operation: &'static str,
        code: String,
        message: String,
        status: u16,
        #[source]
        source: BoxError,
    },
    /// No answer: connection, timeout, credentials or a response that did not parse.
    #[error("{operation}: request failed")]
    Request {
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    /// AWS answered, but not with what the call needs (e.g. no instance in a RunInstances reply),
    /// or the request could not be built.
    #[error("{operation}: {detail}")]
    Unexpected { operation: &'static str, detail: String },
    /// Not sent: this replica's leader lease is not confirmed.
    #[error("{operation}: not sent")]
    NotLeader {
        operation: &'static str,
        #[source]
        source: crate::leader::NotLeader,
    },
}

/// Codes AWS uses for "slow down" (EC2, Route53) and for transient unavailability.
const THROTTLING: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "PriorRequestNotComplete",
    "ServiceUnavailable",
];

/// Server-side failures that a retry may cure.
const SERVER_ERRORS: &[&str] = &["InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"];

impl AwsError {
    pub(crate) fn from_sdk<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        match (&err, status) {
            (SdkError::ServiceError(_), Some(status)) => {
                let code = err.code().unwrap_or("Unknown").to_string();
                let message = err.message().unwrap_or_default().to_string();
                AwsError::Service { operation, code, message, status, source: Box::new(err) }
            }
            // A response whose body was no AWS error (e.g. a proxy's 503 page) still tells
            // whether it was throttling or a server error through its status.
            (_, Some(status)) if status >= 400 => AwsError::Service {
                operation,
                code: String::new(),
                message: String::new(),
                status,
                source: Box::new(err),
            },
            _ => AwsError::Request { operation, source: Box::new(err) },
        }
    }

    pub(crate) fn unexpected(operation: &'static str, detail: impl Into<String>) -> Self {
        AwsError::Unexpected { operation, detail: detail.into() }
    }

    pub fn operation(&self) -> &'static str {
        match self {
            AwsError::Service { operation, .. }
            | AwsError::Request { operation, .. }
            | AwsError::Unexpected { operation, .. }
            | AwsError::NotLeader { operation, .. } => operation,
        }
    }

    /// The AWS error code, e.g. `InvalidInstanceID.NotFound`.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Service { code, .. } if !code.is_empty() => Some(code),
            _ => None,
        }
    }

    /// The resource is already gone (or never was): deletes count this as done.
    pub fn is_not_found(&self) -> bool {
        let AwsError::Service { code, message, .. } = self else { return false };
        code.ends_with(".NotFound") // InvalidInstanceID, InvalidVolume, InvalidGroup, InvalidAttachment, ...
            || matches!(code.as_str(), "NoSuchHostedZone" | "InvalidGroupId.NotFound")
            // Route53 refuses to DELETE a record that does not exist (anymore) this way.
            || (code == "InvalidChangeBatch" && message.to_ascii_lowercase().contains("not found"))
    }

    pub fn is_throttling(&self) -> bool {
        match self {
            AwsError::Service { code, status, .. } => THROTTLING.contains(&code.as_str()) || *status == 429,
            _ => false,
        }
    }

    /// Throttling and server errors: worth another attempt after a pause. Client errors are not
    /// (they would fail the same way), nor are transport errors, which may have reached AWS
    /// already: the reconcile's next round re-reads the state instead of guessing.
    pub fn is_retryable(&self) -> bool {
        match self {
            AwsError::Service { code, status, .. } => {
                self.is_throttling() || SERVER_ERRORS.contains(&code.as_str()) || matches!(status, 500 | 503)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(code: &str, message: &str, status: u16) -> AwsError {
        AwsError::Service {
            operation: "Op",
            code: code.into(),
            message: message.into(),
            status,
            source: "test".into(),
        }
    }

    #[test]
    fn throttling_is_retried() {
        for code in ["RequestLimitExceeded", "Throttling", "ThrottlingException", "PriorRequestNotComplete"] {
            let e = service(code, "slow down", 400);
            assert!(e.is_throttling() && e.is_retryable(), "{code}");
        }
        assert!(service("", "", 429).is_throttling());
    }

    #[test]
    fn server_errors_are_retried_but_are_not_throttling() {
        for (code, status) in [("InternalError", 500), ("", 503), ("", 500), ("ServiceUnavailable", 503)] {
            assert!(service(code, "", status).is_retryable(), "{code} {status}");
        }
        assert!(!service("InternalError", "", 500).is_throttling());
    }

    #[test]
    fn client_errors_and_transport_errors_are_not_retried() {
        assert!(!service("InvalidParameterValue", "bad", 400).is_retryable());
        assert!(!service("InvalidInstanceID.NotFound", "", 400).is_retryable());
        assert!(!AwsError::Request { operation: "Op", source: "timeout".into() }.is_retryable());
        assert!(!AwsError::unexpected("Op", "no id").is_retryable());
    }

    #[test]
    fn not_found_codes() {
        for code in [
            "InvalidInstanceID.NotFound",
            "InvalidVolume.NotFound",
            "InvalidGroup.NotFound",
            "InvalidAttachment.NotFound",
            "NoSuchHostedZone",
        ] {
            assert!(service(code, "", 400).is_not_found(), "{code}");
        }
        let gone = "Tried to delete resource record set [name='a.example.', type='A'] but it was not found";
        assert!(service("InvalidChangeBatch", gone, 400).is_not_found());
        assert!(!service("InvalidChangeBatch", "RRSet already exists", 400).is_not_found());
        assert!(!service("DependencyViolation", "in use", 400).is_not_found());
        assert!(!AwsError::unexpected("Op", "not found").is_not_found());
    }

    #[test]
    fn message_names_the_operation_and_code() {
        let e = service("InvalidVolume.NotFound", "The volume 'vol-1' does not exist.", 400);
        assert_eq!(
            e.to_string(),
            "Op: InvalidVolume.NotFound: The volume 'vol-1' does not exist. (HTTP 400)"
        );
        assert_eq!((e.operation(), e.code()), ("Op", Some("InvalidVolume.NotFound")));
    }
}
