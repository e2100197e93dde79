//! A regional Kubernetes cluster: its own etcd, kube-apiserver (token auth, RBAC),
//! kube-controller-manager and kube-scheduler; a kubeconfig per identity; the Traefik CRDs and
//! roles and the project's own CRDs and roles applied with kubectl.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::process::{self, Proc, need_port};
use crate::settings::{Cluster, K8S_BINS, Settings};
use crate::tokens::token;
use crate::{Cloud, probe};

/// The controllers that need what the local cloud has not: pod IPs, volume expansion through a
/// storage class, certificate signing. The attach/detach controller runs: the EBS CSI driver the
/// node simulator plays attaches what it asks for.
const CONTROLLERS: &str = "*,-node-ipam-controller,-persistentvolume-expander-controller,\
-certificatesigningrequest-signing-controller";

/// The kubeconfig identities; Traefik's token is passed on its command line.
pub const KUBECONFIG_IDENTITIES: [&str; 3] = ["admin", "operator", "provisioner"];

/// Name and pattern of a cluster's processes, in stop order (dependents first), with
/// `traefik` and `nodesim` added by their modules.
pub fn procs(s: &Settings, c: &Cluster) -> [Proc; 4] {
    let dir = s.cluster_dir(c);
    [
        Proc::new(format!("{}-scheduler", c.name), "kube-scheduler", dir.join("scheduler.log")),
        Proc::new(
            format!("{}-controller-manager", c.name),
            "kube-controller-manager",
            dir.join("controller-manager.log"),
        ),
        apiserver(s, c),
        Proc::new(format!("{}-etcd", c.name), "etcd", dir.join("etcd.log")),
    ]
}

/// The cluster's Service CIDR.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

pub fn apiserver(s: &Settings, c: &Cluster) -> Proc {
    Proc::new(format!("{}-apiserver", c.name), "kube-apiserver", s.cluster_dir(c).join("apiserver.log"))
}

pub fn kubeconfig(s: &Settings, c: &Cluster, identity: &str) -> PathBuf {
    s.cluster_dir(c).join(format!("{identity}.kubeconfig"))
}

/// The apiserver's self-signed serving certificate (it writes it into --cert-dir).
pub fn ca_file(s: &Settings, c: &Cluster) -> PathBuf {
    s.cluster_dir(c).join("pki/apiserver.crt")
}

pub fn server(s: &Settings, c: &Cluster) -> String {
    format!("https://127.0.0.1:{}", s.ports.apiserver(c))
}

/// A kubeconfig with the CA inline and a bearer token.
pub fn render_kubeconfig(server: &str, token: &str, ca_pem: &[u8], user: &str) -> String {
    let ca = STANDARD.encode(ca_pem);
    format!(
        "\
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: local
  context: {{cluster: local, user: {user}}}
current-context: local
"
    )
}

/// The apiserver's static token file. Identities: admin for people, tests and the control
/// plane's own controllers; the operator and the provisioner get their own users so their RBAC
/// can be proven; Traefik reads routes.
pub fn render_tokens_csv(token: impl Fn(&str) -> Result<String>) -> Result<String> {
    Ok(format!(
        "{},admin,admin,\"system:masters\"\n\
         {},qdb-operator,qdb-operator,\"qdb:operators\"\n\
         {},qdb-provisioner,qdb-provisioner,\"qdb:provisioners\"\n\
         {},traefik,traefik,\"qdb:traefik\"\n",
        token("admin")?,
        token("operator")?,
        token("provisioner")?,
        token("traefik")?,
    ))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Starts whatever of the cluster is not alive, then applies the CRDs and roles (every time:
/// server-side apply is idempotent, and a restarted apiserver gets them checked).
pub fn start(cloud: &Cloud, c: &Cluster) -> Result<()> {
    let s = &cloud.settings;
    let bin = &s.tools.k8s_bin;
    for b in K8S_BINS {
        if !process::executable(&bin.join(b)) {
            bail!("{b} not found in {}; run: localcloud install", bin.display());
        }
    }
    let dir = s.cluster_dir(c);
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    let [scheduler, controller_manager, apiserver, etcd] = procs(s, c);
    let (etcd_port, peer_port) = (s.ports.etcd(c), s.ports.etcd_peer(c));
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");

    if !process::alive(cloud, &etcd.name, &etcd.pattern) {
        need_port(etcd_port, &format!("{} etcd", c.name))?;
        need_port(peer_port, &format!("{} etcd peer", c.name))?;
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(&s.tools.etcd);
        cmd.args(["--name", &c.name, "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{}={peer_url}", c.name)]);
        process::start(cloud, &etcd, cmd)?;
        process::wait_for(cloud, &etcd, &format!("{} etcd", c.name), 60, || {
            probe::http(etcd_port, "/health")
        })?;
    }

    let (sa_key, sa_pub) = (pki.join("sa.key"), pki.join("sa.pub"));
    if !sa_key.is_file() {
        process::run(Command::new("openssl").arg("genrsa").arg("-out").arg(&sa_key).arg("2048"))?;
        process::run(
            Command::new("openssl")
                .arg("rsa")
                .arg("-in")
                .arg(&sa_key)
                .arg("-pubout")
                .arg("-out")
                .arg(&sa_pub),
        )?;
    }
    let tokens_csv = pki.join("tokens.csv");
    write(&tokens_csv, &render_tokens_csv(|id| token(cloud, id))?)?;
    let server = server(s, c);
    let admin_token = token(cloud, "admin")?;
    if !process::alive(cloud, &apiserver.name, &apiserver.pattern) {
        let api_port = s.ports.apiserver(c);
        need_port(api_port, &format!("{} kube-apiserver", c.name))?;
        let mut cmd = Command::new(bin.join("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--token-auth-file={}", tokens_csv.display()))
            .args([
                "--authorization-mode=RBAC",
                &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--allow-privileged=true",
            ])
            .args(["--endpoint-reconciler-type=none", "--profiling=false"]);
        process::start(cloud, &apiserver, cmd)?;
        let readyz = format!("{server}/readyz");
        process::wait_for(cloud, &apiserver, &format!("{} kube-apiserver", c.name), 120, || {
            probe::https(&readyz, Some(&admin_token))
        })?;
    }
    let ca_pem = fs::read(ca_file(s, c)).with_context(|| format!("reading {}", ca_file(s, c).display()))?;
    for id in KUBECONFIG_IDENTITIES {
        write(&kubeconfig(s, c, id), &render_kubeconfig(&server, &token(cloud, id)?, &ca_pem, id))?;
    }
    let kc = kubeconfig(s, c, "admin");
    let kc_flags = ["--kubeconfig=", "--authentication-kubeconfig=", "--authorization-kubeconfig="]
        .map(|flag| format!("{flag}{}", kc.display()));

    let (kcm_port, sched_port) = (s.ports.controller_manager(c), s.ports.scheduler(c));
    if !process::alive(cloud, &controller_manager.name, &controller_manager.pattern) {
        need_port(kcm_port, &format!("{} kube-controller-manager", c.name))?;
        let mut cmd = Command::new(bin.join("kube-controller-manager"));
        cmd.args(&kc_flags)
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={kcm_port}"))
            .arg("--leader-elect=false")
            .arg(format!("--service-account-private-key-file={}", sa_key.display()))
            .arg("--use-service-account-credentials=false")
            .arg(format!("--controllers={CONTROLLERS}"))
            .arg("--node-monitor-grace-period=20s");
        process::start(cloud, &controller_manager, cmd)?;
    }
    if !process::alive(cloud, &scheduler.name, &scheduler.pattern) {
        need_port(sched_port, &format!("{} kube-scheduler", c.name))?;
        let mut cmd = Command::new(bin.join("kube-scheduler"));
        cmd.args(&kc_flags)
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={sched_port}"))
            .arg("--leader-elect=false");
        process::start(cloud, &scheduler, cmd)?;
    }
    let kcm_healthz = format!("https://127.0.0.1:{kcm_port}/healthz");
    process::wait_for(cloud, &controller_manager, &format!("{} controller-manager", c.name), 60, || {
        probe::https(&kcm_healthz, None)
    })?;
    let sched_healthz = format!("https://127.0.0.1:{sched_port}/healthz");
    process::wait_for(cloud, &scheduler, &format!("{} scheduler", c.name), 60, || {
        probe::https(&sched_healthz, None)
    })?;
    // The default namespace appears a few seconds after /readyz.
    let default_ns = format!("{server}/api/v1/namespaces/default");
    process::wait_for(cloud, &apiserver, &format!("{} default namespace", c.name), 60, || {
        probe::https(&default_ns, Some(&admin_token))
    })?;
    apply(s, c)
}

fn kubectl(s: &Settings, c: &Cluster) -> Command {
    let mut cmd = Command::new(s.tools.k8s_bin.join("kubectl"));
    cmd.arg(format!("--kubeconfig={}", kubeconfig(s, c, "admin").display()));
    cmd
}

/// kubectl's own stderr says what went wrong; the script let it through too.
fn kubectl_ok(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).status().is_ok_and(|st| st.success())
}

fn apply_files(s: &Settings, c: &Cluster, files: &[PathBuf]) -> bool {
    let mut cmd = kubectl(s, c);
    cmd.args(["apply", "--server-side", "--field-manager=localcloud"]);
    for f in files {
        cmd.arg("-f").arg(f);
    }
    kubectl_ok(&mut cmd)
}

/// Traefik's CRDs and roles; the project's own CRDs and roles as a deployment would have them,
/// with the token identities bound to the roles.
fn apply(s: &Settings, c: &Cluster) -> Result<()> {
    let traefik = &s.tools.traefik_home;
    if !apply_files(s, c, &[traefik.join("crds.yaml"), traefik.join("rbac.yaml")]) {
        bail!("applying the Traefik CRDs to {} failed", c.name);
    }
    let repo = s.repo();
    let ours = [
        repo.join("deploy/crd/questdb.yaml"),
        repo.join("deploy/crd/sequence-policy.yaml"),
        repo.join("deploy/provisioner/rbac.yaml"),
        repo.join("deploy/operator/rbac.yaml"),
        s.localcloud_dir.join("rbac-bindings.yaml"),
        s.localcloud_dir.join("ebs-csi-driver.yaml"),
    ];
    if !apply_files(s, c, &ours) {
        bail!("applying the QuestDB CRD and roles to {} failed", c.name);
    }
    // The ingress of every database node, as production runs it (the node simulator runs its
    // pods with the real Traefik).
    let mut ingress = kubectl(s, c);
    ingress
        .args(["apply", "--server-side", "--field-manager=localcloud", "-k"])
        .arg(repo.join("deploy/ingress"));
    if !kubectl_ok(&mut ingress) {
        bail!("applying deploy/ingress to {} failed", c.name);
    }
    let established = kubectl_ok(kubectl(s, c).args([
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/questdbs.cloud.questdb.io",
    ]));
    if !established {
        bail!("the QuestDB CRD did not become established in {}", c.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_as_the_script_wrote_it() {
        let text = render_kubeconfig("https://127.0.0.1:18003", "tok", b"PEM\n", "operator");
        assert_eq!(
            text,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:18003\n    \
             certificate-authority-data: UEVNCg==\nusers:\n- name: operator\n  user:\n    token: tok\ncontexts:\n\
             - name: local\n  context: {cluster: local, user: operator}\ncurrent-context: local\n"
        );
    }

    #[test]
    fn tokens_csv_has_one_line_per_identity() {
        let text = render_tokens_csv(|id| Ok(format!("t-{id}"))).expect("render");
        assert_eq!(
            text,
            "t-admin,admin,admin,\"system:masters\"\nt-operator,qdb-operator,qdb-operator,\"qdb:operators\"\n\
             t-provisioner,qdb-provisioner,qdb-provisioner,\"qdb:provisioners\"\nt-traefik,traefik,traefik,\"qdb:traefik\"\n"
        );
    }

    #[test]
    fn controllers_flag_is_one_word() {
        assert!(!CONTROLLERS.contains(char::is_whitespace));
        assert!(CONTROLLERS.ends_with("-certificatesigningrequest-signing-controller"));
    }
}
