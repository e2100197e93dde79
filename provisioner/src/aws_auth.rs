//! Tokens signed with AWS credentials, made here so the image needs no `aws` binary and no
//! signer library of another language:
//! - Amazon MSK's IAM authentication: SASL/OAUTHBEARER with a presigned
//!   `kafka-cluster:Connect` URL as the token, exactly as AWS's MSK IAM SASL signer libraries
//!   make it (base64url without padding, valid 900 s);
//! - Amazon EKS's bearer token: `k8s-aws-v1.` and a presigned STS `GetCallerIdentity` URL that
//!   names the cluster in the signed `x-k8s-aws-id` header, as `aws eks get-token` makes it.
//!
//! Both are SigV4 query signatures ([`presign`]); the unit tests compare them byte for byte
//! with what AWS's own signers produce for the same credentials and time.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// MSK refuses a token older than this; its signers use 900 s as well.
pub const MSK_TOKEN_SECS: u64 = 900;
/// `aws eks get-token`'s presigned URL lifetime; the token itself is good for 15 minutes.
pub const EKS_URL_SECS: u64 = 60;
/// The user agent this signer adds to its MSK tokens (unsigned, as the official signers do).
pub const USER_AGENT: &str = concat!("qdb-provisioner-msk-iam/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("signing the {service} request: {message}")]
    Sign { service: &'static str, message: String },
    #[error("no AWS credentials from the default chain (environment, web identity, pod identity, profile)")]
    Credentials(#[source] aws_credential_types::provider::error::CredentialsError),
    #[error("no AWS credentials yet")]
    NotYet,
}

/// AWS's URI encoding: everything but the unreserved characters, in upper-case hex.
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A GET to presign: `https://<host>/?<query>` for `service` in `region`, with `headers`
/// (besides host) signed too.
pub struct Presign<'a> {
    pub service: &'static str,
    pub region: &'a str,
    pub host: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub headers: &'a [(&'a str, &'a str)],
}

/// The request's URL signed in its query for `expires`; the query keeps its order, then the
/// signature's parameters.
pub fn presign(
    credentials: &Credentials,
    req: &Presign<'_>,
    expires: Duration,
    time: SystemTime,
) -> Result<String, AuthError> {
    let Presign { service, region, host, query, headers } = *req;
    let err = |message: String| AuthError::Sign { service, message };
    let mut url = format!("https://{host}/");
    for (i, (k, v)) in query.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(&format!("{}={}", uri_encode(k), uri_encode(v)));
    }
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(expires);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| err(e.to_string()))?
        .into();
    let signed_headers = std::iter::once(("host", host)).chain(headers.iter().copied());
    let request = SignableRequest::new("GET", url.clone(), signed_headers, SignableBody::Bytes(&[]))
        .map_err(|e| err(e.to_string()))?;
    let (instructions, _) = sign(request, &params).map_err(|e| err(e.to_string()))?.into_parts();
    // The signature last, as botocore orders it (the SDK adds the session token after it).
    let mut params = instructions.params().to_vec();
    params.sort_by_key(|(k, _)| *k == "X-Amz-Signature");
    for (k, v) in params {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("{}={}", uri_encode(k), uri_encode(&v)));
    }
    Ok(url)
}

/// An MSK IAM token and when it expires (milliseconds since the epoch), as librdkafka takes them.
pub fn msk_token(
    credentials: &Credentials,
    region: &str,
    user_agent: &str,
    time: SystemTime,
) -> Result<(String, i64), AuthError> {
    let host = format!("kafka.{region}.amazonaws.com");
    let expires = Duration::from_secs(MSK_TOKEN_SECS);
    let query = [("Action", "kafka-cluster:Connect")];
    let req = Presign { service: "kafka-cluster", region, host: &host, query: &query, headers: &[] };
    let mut url = presign(credentials, &req, expires, time)?;
    url.push_str(&format!("&User-Agent={}", uri_encode(user_agent)));
    let signed_at = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let expiry_ms = i64::try_from((signed_at + MSK_TOKEN_SECS) * 1000).unwrap_or(i64::MAX);
    Ok((URL_SAFE_NO_PAD.encode(url), expiry_ms))
}

/// An EKS bearer token for `cluster` (its name), signed for STS in `region`.
pub fn eks_token(
    credentials: &Credentials,
    region: &str,
    cluster: &str,
    time: SystemTime,
) -> Result<String, AuthError> {
    let host = format!("sts.{region}.amazonaws.com");
    let query = [("Action", "GetCallerIdentity"), ("Version", "2011-06-15")];
    let headers = [("x-k8s-aws-id", cluster)];
    let expires = Duration::from_secs(EKS_URL_SECS);
    let req = Presign { service: "sts", region, host: &host, query: &query, headers: &headers };
    let url = presign(credentials, &req, expires, time)?;
    Ok(format!("k8s-aws-v1.{}", URL_SAFE_NO_PAD.encode(url)))
}

/// How long a client may keep an EKS token: EKS accepts one for 15 minutes after signing;
/// `aws eks get-token` says 14, leaving a minute for clock skew.
pub const EKS_TOKEN_REUSE_SECS: i64 = 14 * 60;

/// The kubeconfig exec plugin's answer (`client.authentication.k8s.io/v1beta1` ExecCredential)
/// for an EKS token signed at `signed_at`: the client caches it until the expiry it names.
pub fn exec_credential(token: &str, signed_at: jiff::Timestamp) -> serde_json::Value {
    let expiry = signed_at + jiff::SignedDuration::from_secs(EKS_TOKEN_REUSE_SECS);
    serde_json::json!({
        "kind": "ExecCredential",
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "spec": {},
        "status": {"expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(), "token": token},
    })
}

/// The AWS SDK's default credential chain for `region`.
pub async fn default_chain(
    region: &str,
) -> Result<aws_credential_types::provider::SharedCredentialsProvider, AuthError> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .load()
        .await;
    config.credentials_provider().ok_or(AuthError::NotYet)
}

/// Credentials from the standard chain (IRSA's web identity, EKS Pod Identity, environment,
/// profile), kept fresh by a task, so a token is signed at once and without blocking: librdkafka
/// asks for one from the thread that polls the client, which may be a runtime's.
#[derive(Clone)]
pub struct CredentialCache {
    current: Arc<RwLock<Option<Credentials>>>,
}

impl CredentialCache {
    /// Loads the first credentials (an error names the chain) and refreshes them every 5
    /// minutes, well within the hour temporary credentials last.
    pub async fn load(region: &str) -> Result<Self, AuthError> {
        let provider = default_chain(region).await?;
        let first = provider.provide_credentials().await.map_err(AuthError::Credentials)?;
        let cache = Self { current: Arc::new(RwLock::new(Some(first))) };
        let current = Arc::downgrade(&cache.current);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(300)).await;
                let Some(current) = current.upgrade() else { return };
                match provider.provide_credentials().await {
                    Ok(c) => *current.write().unwrap_or_else(|e| e.into_inner()) = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "refreshing AWS credentials failed; keeping the last")
                    }
                }
            }
        });
        Ok(cache)
    }

    pub fn get(&self) -> Result<Credentials, AuthError> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or(AuthError::NotYet)
    }
}

/// What a Kafka client needs to answer librdkafka's OAUTHBEARER refresh with an MSK IAM token.
#[derive(Clone)]
pub struct MskIam {
    pub region: String,
    pub credentials: CredentialCache,
}

impl MskIam {
    pub fn token(&self) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        let credentials = self.credentials.get()?;
        let (token, lifetime_ms) = msk_token(&credentials, &self.region, USER_AGENT, SystemTime::now())?;
        // MSK's principal is the IAM identity inside the signature; the name is only a label.
        Ok(rdkafka::client::OAuthToken { token, principal_name: "msk-iam".into(), lifetime_ms })
    }
}

/// A Kafka client's context that answers librdkafka's OAUTHBEARER refresh (for a producer or a
/// plain consumer; the provisioner's intake consumer has its own context and does the same).
pub struct KafkaAuth(pub Option<MskIam>);

impl rdkafka::client::ClientContext for KafkaAuth {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        oauth_token(self.0.as_ref())
    }
}

impl rdkafka::consumer::ConsumerContext for KafkaAuth {}

impl rdkafka::producer::ProducerContext for KafkaAuth {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// librdkafka's answer for a client: an MSK IAM token, or why OAUTHBEARER cannot be used.
pub fn oauth_token(iam: Option<&MskIam>) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
    match iam {
        Some(iam) => iam.token(),
        None => Err("sasl.mechanisms=OAUTHBEARER is only supported with --msk-iam-region (MSK IAM)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed credentials with a session token that needs encoding, at 2026-12-06T12:00:00Z.
    fn fixed() -> (Credentials, SystemTime) {
        let c = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("session/token+=".into()),
            None,
            "test",
        );
        (c, SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_558_400))
    }

    fn decoded(token: &str) -> String {
        String::from_utf8(URL_SAFE_NO_PAD.decode(token).unwrap()).unwrap()
    }

    /// The reference is what AWS's own signer, aws-msk-iam-sasl-signer-python 1.0.2 (botocore
    /// 1.44.18's SigV4QueryAuth), returned for the same credentials, region and frozen time.
    #[test]
    fn the_msk_token_is_byte_for_byte_the_official_signers() {
        let (c, t) = fixed();
        let (token, expiry) = msk_token(&c, "us-east-1", "aws-msk-iam-sasl-signer-python/1.0.2", t).unwrap();
        assert_eq!(
            decoded(&token),
            "https://kafka.us-east-1.amazonaws.com/?Action=kafka-cluster%3AConnect\
             &X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIDEXAMPLE%2F20261206%2Fus-east-1%2Fkafka-cluster%2Faws4_request\
             &X-Amz-Date=20261206T120000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Security-Token=session%2Ftoken%2B%3D\
             &X-Amz-Signature=99bcffcebd551e959cc9e707bc0b057c7ad3926319a5f5c2d3e448aa62c083dc\
             &User-Agent=aws-msk-iam-sasl-signer-python%2F1.0.2"
        );
        assert_eq!(
            token,
            "aHR0cHM6Ly9rYWZrYS51cy1lYXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0Jlgt\
             QW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI2MTIwNiUy\
             RnVzLWVhc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MTIwNlQxMjAwMDBaJlgt\
             QW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1zZXNzaW9uJTJG\
             dG9rZW4lMkIlM0QmWC1BbXotU2lnbmF0dXJlPTk5YmNmZmNlYmQ1NTFlOTU5Y2M5ZTcwN2JjMGIwNTdjN2FkMzkyNjMxOWE1\
             ZjVjMmQzZTQ0OGFhNjJjMDgzZGMmVXNlci1BZ2VudD1hd3MtbXNrLWlhbS1zYXNsLXNpZ25lci1weXRob24lMkYxLjAuMg"
        );
        // librdkafka's lifetime: the signing time plus 900 s, in milliseconds.
        assert_eq!(expiry, 1_796_559_300_000);
        assert!(!token.contains('=') && !token.contains('+') && !token.contains('/'));
    }

    /// The reference is `aws eks get-token`'s construction (awscli's get_token.py: botocore's
    /// presigned GetCallerIdentity with the cluster in x-k8s-aws-id, 60 s), frozen in time.
    #[test]
    fn the_eks_token_is_what_aws_eks_get_token_makes() {
        let (c, t) = fixed();
        let token = eks_token(&c, "eu-west-1", "qdb-eu", t).unwrap();
        let url = decoded(token.strip_prefix("k8s-aws-v1.").unwrap());
        assert_eq!(
            url,
            "https://sts.eu-west-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15\
             &X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIDEXAMPLE%2F20261206%2Feu-west-1%2Fsts%2Faws4_request\
             &X-Amz-Date=20261206T120000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host%3Bx-k8s-aws-id\
             &X-Amz-Security-Token=session%2Ftoken%2B%3D\
             &X-Amz-Signature=22e1c7a3347d8235eaabf80422340edcfa7064d57545e3efab370f1c08c49ff0"
        );
        // The cluster is signed: another cluster's token differs in its signature.
        assert_ne!(eks_token(&c, "eu-west-1", "other", t).unwrap(), token);
    }

    #[test]
    fn the_exec_plugin_answer_names_the_token_and_when_to_ask_again() {
        let at: jiff::Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let v = exec_credential("k8s-aws-v1.abc", at);
        assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1beta1");
        assert_eq!(v["status"]["token"], "k8s-aws-v1.abc");
        assert_eq!(v["status"]["expirationTimestamp"], "2026-12-06T12:14:00Z");
    }

    #[test]
    fn oauthbearer_without_msk_iam_says_what_is_missing() {
        let Err(e) = oauth_token(None) else { panic!("a token without MSK IAM") };
        let e = e.to_string();
        assert!(e.contains("--msk-iam-region"), "{e}");
    }
}
