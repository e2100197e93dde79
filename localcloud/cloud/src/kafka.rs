//! Apache Kafka: one KRaft node (broker and controller) with a PLAINTEXT and a SASL_SSL
//! (SCRAM-SHA-512) listener, its certificate from a local CA, and the project's topics.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{Context, Result, bail};

use crate::process::{self, Proc, need_port};
use crate::settings::{Ports, Settings};
use crate::tokens::token;
use crate::{Cloud, log, probe};

pub const NAME: &str = "kafka";
pub const PATTERN: &str = "kafka.Kafka";
/// The SASL user the provisioner connects as; its password is the `kafka-provisioner` token.
pub const SASL_USER: &str = "qdb-provisioner";

fn dir(s: &Settings) -> PathBuf {
    s.run.join("kafka")
}

pub fn ca_file(s: &Settings) -> PathBuf {
    dir(s).join("pki/ca.crt")
}

pub fn proc(s: &Settings) -> Proc {
    Proc::new(NAME, PATTERN, dir(s).join("kafka.log"))
}

/// A JVM on the broker's classpath, for its tools.
fn java(s: &Settings) -> Command {
    let mut cmd = Command::new("java");
    cmd.arg("-Xmx256m")
        .arg(format!("-Dlog4j2.configurationFile={}", s.kafka_log_config().display()))
        .arg("-cp")
        .arg(classpath(s));
    cmd
}

/// The JVM expands the `*` itself.
fn classpath(s: &Settings) -> String {
    format!("{}/lib/*", s.tools.kafka_home.display())
}

fn openssl(what: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running openssl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).context("writing to openssl")?;
    }
    let out = child.wait_with_output().context("running openssl")?;
    if !out.status.success() {
        bail!("openssl failed making {what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A local CA and the broker's certificate (127.0.0.1 and localhost), for the SASL_SSL listener.
fn pki(s: &Settings) -> Result<()> {
    let d = dir(s).join("pki");
    if d.join("broker.pem").is_file() {
        return Ok(());
    }
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let p = |f: &str| d.join(f).display().to_string();
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    let (key, csr, crt) = (p("broker.key"), p("broker.csr"), p("broker.crt"));
    let ca_args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &ca_key, "-out", &ca_crt];
    openssl("the CA", &[&ca_args[..], &["-days", "30", "-subj", "/CN=qdb-localcloud-ca"]].concat(), None)?;
    let key_args =
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"];
    openssl("the broker's key", &key_args, None)?;
    // The extension file is stdin, as the script's process substitution: nothing left behind.
    let crt_args = ["x509", "-req", "-in", &csr, "-CA", &ca_crt, "-CAkey", &ca_key, "-CAcreateserial"];
    openssl(
        "the broker's certificate",
        &[&crt_args[..], &["-days", "30", "-extfile", "/dev/stdin", "-out", &crt]].concat(),
        Some("subjectAltName=IP:127.0.0.1,DNS:localhost"),
    )?;
    // Kafka's PEM key store: an unencrypted PKCS#8 key followed by the certificate chain.
    let mut pem = Vec::new();
    for f in ["broker.key", "broker.crt", "ca.crt"] {
        pem.extend(fs::read(d.join(f)).with_context(|| format!("reading {}", p(f)))?);
    }
    fs::write(d.join("broker.pem"), pem).with_context(|| format!("writing {}", p("broker.pem")))
}

/// server.properties for the one node, its data and PKI under `dir`.
pub fn server_properties(dir: &Path, ports: &Ports) -> String {
    let d = dir.display();
    let (plain, sasl, controller) = (ports.kafka(), ports.kafka_sasl(), ports.kafka_controller());
    format!(
        "\
# written by localcloud up: one KRaft node that is both controller and broker
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={d}/pki/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location={d}/pki/ca.crt
log.dirs={d}/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
"
    )
}

/// The SCRAM user is part of the cluster's bootstrap metadata, so it exists before any client.
fn format_storage(cloud: &Cloud) -> Result<()> {
    let s = &cloud.settings;
    let d = dir(s);
    let out = process::output(java(s).args(["kafka.tools.StorageTool", "random-uuid"]))?;
    let cluster_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let log_path = d.join("format.log");
    let log_file = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let scram = format!("SCRAM-SHA-512=[name={SASL_USER},password={}]", token(cloud, "kafka-provisioner")?);
    let ok = java(s)
        .args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
        .arg(d.join("server.properties"))
        .args(["--add-scram", &scram])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .is_ok_and(|st| st.success());
    if !ok {
        eprint!("{}", fs::read_to_string(&log_path).unwrap_or_default());
        bail!("formatting Kafka's storage failed");
    }
    Ok(())
}

pub fn start(cloud: &Cloud) -> Result<()> {
    let s = &cloud.settings;
    if !s.tools.kafka_home.join(".complete").is_file() {
        bail!("Apache Kafka not found at {}; run: localcloud install", s.tools.kafka_home.display());
    }
    if process::alive(cloud, NAME, PATTERN) {
        return Ok(());
    }
    need_port(s.ports.kafka(), "Kafka")?;
    need_port(s.ports.kafka_sasl(), "Kafka SASL_SSL")?;
    need_port(s.ports.kafka_controller(), "Kafka controller")?;
    let d = dir(s);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    pki(s)?;
    let config = d.join("server.properties");
    fs::write(&config, server_properties(&d, &s.ports))
        .with_context(|| format!("writing {}", config.display()))?;
    if !d.join("data/meta.properties").is_file() {
        format_storage(cloud)?;
    }
    let p = proc(s);
    let mut cmd = Command::new("java");
    cmd.args(["-Xms256m", "-Xmx512m"])
        .arg(format!("-Dlog4j2.configurationFile={}", s.kafka_log_config().display()))
        .arg("-cp")
        .arg(classpath(s))
        .arg("kafka.Kafka")
        .arg(&config);
    process::start(cloud, &p, cmd)?;
    let port = s.ports.kafka();
    process::wait_for(cloud, &p, "Kafka broker", 90, || probe::tcp(port))?;
    create_topics(s)
}

/// One JVM per topic, side by side: each takes seconds to start.
fn create_topics(s: &Settings) -> Result<()> {
    let topics = [
        ("instructions", s.instruction_partitions),
        ("gossip", s.gossip_partitions),
        ("instructions-dlq", 1),
    ];
    let all_ok = thread::scope(|scope| {
        let creating: Vec<_> = topics
            .iter()
            .map(|&(topic, partitions)| scope.spawn(move || create_topic(s, topic, partitions)))
            .collect();
        // Every one is waited for, so none is left running when this fails.
        let results: Vec<bool> = creating.into_iter().map(|t| t.join().is_ok_and(|ok| ok)).collect();
        results.into_iter().all(|ok| ok)
    });
    if !all_ok {
        bail!("creating the Kafka topics failed");
    }
    Ok(())
}

fn create_topic(s: &Settings, topic: &str, partitions: u32) -> bool {
    let out = process::output(
        java(s)
            .arg("org.apache.kafka.tools.TopicCommand")
            .args(["--bootstrap-server", &format!("127.0.0.1:{}", s.ports.kafka())])
            .args(["--create", "--if-not-exists", "--topic", topic])
            .args(["--partitions", &partitions.to_string(), "--replication-factor", "1"]),
    );
    match out {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            log(format!("creating topic {topic} failed: {}", text.trim_end()));
            false
        }
        Err(e) => {
            log(format!("creating topic {topic} failed: {e:#}"));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::tests::settings;

    #[test]
    fn server_properties_name_the_ports_and_the_run_dir() {
        let s = settings(&[("QDB_PORT_BASE", "27000"), ("QDB_RUN", "/r")]);
        let text = server_properties(&dir(&s), &s.ports);
        assert!(text.starts_with("# written by localcloud up: one KRaft node"));
        assert!(text.contains("\ncontroller.quorum.voters=1@127.0.0.1:27094\n"));
        assert!(text.contains(
            "\nlisteners=PLAINTEXT://127.0.0.1:27092,SASL_SSL://127.0.0.1:27093,CONTROLLER://127.0.0.1:27094\n"
        ));
        assert!(
            text.contains("\nadvertised.listeners=PLAINTEXT://127.0.0.1:27092,SASL_SSL://127.0.0.1:27093\n")
        );
        assert!(text.contains("\nssl.keystore.location=/r/kafka/pki/broker.pem\n"));
        assert!(text.contains("\nlog.dirs=/r/kafka/data\n"));
        assert!(text.ends_with("group.initial.rebalance.delay.ms=0\n"));
        assert_eq!(text.lines().count(), 25);
    }
}
