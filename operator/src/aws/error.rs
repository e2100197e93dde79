//! One error type for every AWS call, carrying the operation's name and, for a service error, the
//! error code that callers branch on ("already gone", "throttled").

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use qdb_crd::DegradedReason;

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

/// Whether a failed call is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Retried with backoff: throttling, server errors, timeouts, a state EC2 is still moving
    /// through, and anything not known to be permanent.
    Transient,
    /// Only a change (of the spec, the account, the operator's permissions) can cure it.
    Permanent(DegradedReason),
}

/// Codes that say the same request will fail the same way again.
fn permanent_reason(operation: &str, code: &str) -> Option<DegradedReason> {
    let creates = matches!(operation, "RunInstances" | "CreateVolume" | "CreateSecurityGroup");
    Some(match code {
        c if c.starts_with("InvalidAMIID.") => DegradedReason::ImageNotFound,
        "UnauthorizedOperation"
        | "AuthFailure"
        | "OptInRequired"
        | "Blocked"
        | "AccessDenied"
        | "AccessDeniedException"
        | "SignatureDoesNotMatch"
        | "InvalidClientTokenId" => DegradedReason::Unauthorized,
        "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "VolumeLimitExceeded"
        | "MaxIOPSLimitExceeded"
        | "SecurityGroupLimitExceeded"
        | "RulesPerSecurityGroupLimitExceeded"
        | "ResourceLimitExceeded" => DegradedReason::QuotaExceeded,
        // A launch or create refused as asked (an instance type the region lacks, a parameter
        // it does not take). Elsewhere the same codes may come from a state in flux.
        "InvalidParameterValue"
        | "InvalidParameterCombination"
        | "InvalidInstanceType"
        | "Unsupported"
        | "InvalidBlockDeviceMapping"
            if creates =>
        {
            DegradedReason::InvalidRequest
        }
        _ => return None,
    })
}

/// How a failed call bears on the database, as the `attempts`-th failure in a row. EC2 being out
/// of capacity for an instance type is often over in minutes: it counts as permanent only after
/// `capacity_retries` tries.
pub fn classify(operation: &str, code: Option<&str>, attempts: u32, capacity_retries: u32) -> Outcome {
    let Some(code) = code else { return Outcome::Transient };
    if matches!(code, "InsufficientInstanceCapacity" | "InsufficientCapacity" | "InsufficientVolumeCapacity")
    {
        return if attempts > capacity_retries {
            Outcome::Permanent(DegradedReason::InsufficientCapacity)
        } else {
            Outcome::Transient
        };
    }
    permanent_reason(operation, code).map_or(Outcome::Transient, Outcome::Permanent)
}

impl AwsError {
    /// [`classify`] for this error.
    pub fn outcome(&self, attempts: u32, capacity_retries: u32) -> Outcome {
        classify(self.operation(), self.code(), attempts, capacity_retries)
    }

    /// AWS answered and refused (a client error): nothing was made. Anything else (no answer, a
    /// timeout, a server error) may have been carried out.
    pub fn was_refused(&self) -> bool {
        matches!(self, AwsError::Service { status, .. } if (400..500).contains(status) && !self.is_throttling())
    }

    /// What AWS said, for the condition: its code and message.
    pub fn aws_message(&self) -> String {
        match self {
            AwsError::Service { operation, code, message, .. } => format!("{operation}: {code}: {message}"),
            other => other.to_string(),
        }
    }

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
    fn permanent_errors_are_told_from_transient_ones() {
        use DegradedReason as R;
        let cases = [
            ("RunInstances", "InvalidAMIID.NotFound", R::ImageNotFound),
            ("RunInstances", "InvalidAMIID.Malformed", R::ImageNotFound),
            ("RunInstances", "UnauthorizedOperation", R::Unauthorized),
            ("CreateVolume", "UnauthorizedOperation", R::Unauthorized),
            ("DescribeInstances", "AuthFailure", R::Unauthorized),
            ("RunInstances", "VcpuLimitExceeded", R::QuotaExceeded),
            ("RunInstances", "InstanceLimitExceeded", R::QuotaExceeded),
            ("RunInstances", "InvalidParameterValue", R::InvalidRequest),
            ("RunInstances", "Unsupported", R::InvalidRequest),
        ];
        for (op, code, reason) in cases {
            assert_eq!(classify(op, Some(code), 1, 5), Outcome::Permanent(reason), "{op} {code}");
        }
        for (op, code) in [
            ("RunInstances", "RequestLimitExceeded"),
            ("RunInstances", "InternalError"),
            ("AttachVolume", "IncorrectState"),
            ("AttachVolume", "InvalidParameterValue"),
            ("RunInstances", "IdempotentParameterMismatch"),
            ("DescribeVolumes", "InvalidVolume.NotFound"),
        ] {
            assert_eq!(classify(op, Some(code), 1, 5), Outcome::Transient, "{op} {code}");
        }
        assert_eq!(classify("RunInstances", None, 100, 5), Outcome::Transient, "no answer: try again");
    }

    #[test]
    fn no_capacity_is_permanent_only_after_the_retries() {
        for attempts in 1..=5 {
            assert_eq!(
                classify("RunInstances", Some("InsufficientInstanceCapacity"), attempts, 5),
                Outcome::Transient
            );
        }
        assert_eq!(
            classify("RunInstances", Some("InsufficientInstanceCapacity"), 6, 5),
            Outcome::Permanent(DegradedReason::InsufficientCapacity)
        );
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
