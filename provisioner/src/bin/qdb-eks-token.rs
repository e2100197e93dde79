//! A kubeconfig exec plugin that gives an EKS bearer token, in place of `aws eks get-token`, so
//! the provisioner's image needs no AWS CLI: a kubeconfig user
//! `exec: {apiVersion: client.authentication.k8s.io/v1beta1, command: qdb-eks-token,
//! args: [--cluster, <name>, --region, <region>]}` (docs/provisioner.md). Credentials come from
//! the standard AWS chain (IRSA, EKS Pod Identity, environment).

use anyhow::{Context, Result};
use aws_credential_types::provider::ProvideCredentials;
use clap::Parser;
use qdb_provisioner::aws_auth::{default_chain, eks_token, exec_credential};

#[derive(Parser)]
#[command(name = "qdb-eks-token", about = "EKS bearer token for a kubeconfig exec plugin")]
struct Args {
    /// The EKS cluster's name.
    #[arg(long)]
    cluster: String,
    /// The cluster's region (STS is called there).
    #[arg(long, env = "AWS_REGION")]
    region: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let provider = default_chain(&args.region).await?;
    let credentials = provider.provide_credentials().await.context("loading AWS credentials")?;
    let now = jiff::Timestamp::now();
    let token = eks_token(&credentials, &args.region, &args.cluster, now.into())?;
    println!("{}", exec_credential(&token, now));
    Ok(())
}
