//! What `up` writes for the clients: $QDB_RUN/env (sourced by people, read by the tests) and
//! the provisioner's cluster registry. Both are written whole or not at all (tmp, then rename).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::settings::Settings;
use crate::tokens::token;
use crate::{Cloud, aws, cluster, kafka, nodesim, postgres, prometheus};

/// The env file. `sasl_password` is the `kafka-provisioner` token.
pub fn render_env(s: &Settings, sasl_password: &str) -> String {
    let run = s.run.display();
    let ports = &s.ports;
    let mut lines = vec![
        "# written by localcloud up; source it to reach the local cloud".to_string(),
        format!("export QDB_RUN={run}"),
        format!("export QDB_CACHE={}", s.cache.display()),
        format!("export QDB_PORT_BASE={}", ports.base()),
        format!("export QDB_LOCALCLOUD={}", s.localcloud_dir.join("localcloud").display()),
        format!("export QDB_MOTO_PID_FILE={}", s.pid_file(aws::NAME).display()),
        format!("export QDB_AWS_CALL_LOG={}", aws::call_log(s).display()),
        format!("export QDB_AWS_TIMING={}", s.aws_timing),
        format!("export DATABASE_URL={}", postgres::url(s)),
        format!("export KAFKA_BROKERS=127.0.0.1:{}", ports.kafka()),
        // Not QDB_KAFKA_*: those are librdkafka properties to the provisioner.
        format!("export QDB_SASL_SSL_BROKERS=127.0.0.1:{}", ports.kafka_sasl()),
        format!("export QDB_SASL_SSL_CA={}", kafka::ca_file(s).display()),
        format!("export QDB_SASL_USER={}", kafka::SASL_USER),
        format!("export QDB_SASL_PASSWORD={sasl_password}"),
        format!("export QDB_K8S_VERSION={}", s.k8s_version),
        format!("export QDB_PROMETHEUS=http://127.0.0.1:{}", ports.prometheus()),
        format!("export QDB_PROMETHEUS_TARGETS={}", prometheus::targets_dir(s).display()),
        format!("export PATH={}:$PATH", s.tools.k8s_bin.display()),
        format!("export AWS_ENDPOINT_URL={}", aws::endpoint(s)),
        "export AWS_ACCESS_KEY_ID=testing".to_string(),
        "export AWS_SECRET_ACCESS_KEY=testing".to_string(),
        format!(
            "export QDB_CLUSTERS={}",
            s.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(",")
        ),
        format!("export QDB_PROVISIONER_CONFIG={}", s.run.join("provisioner.yaml").display()),
        format!("export QDB_BIN_DIR={}", s.bin_dir().display()),
        format!("export QDB_EBS_DIR={}", nodesim::volumes_dir(s).display()),
        format!("export QDB_EBS_CSI_DRIVER_KEY={}", nodesim::EBS_CSI_DRIVER_KEY),
    ];
    for c in &s.clusters {
        let up = c.env_name();
        lines.extend([
            format!("export QDB_{up}_KUBECONFIG={}", cluster::kubeconfig(s, c, "admin").display()),
            format!(
                "export QDB_{up}_OPERATOR_KUBECONFIG={}",
                cluster::kubeconfig(s, c, "operator").display()
            ),
            format!(
                "export QDB_{up}_PROVISIONER_KUBECONFIG={}",
                cluster::kubeconfig(s, c, "provisioner").display()
            ),
            format!("export QDB_{up}_AWS_REGION={}", c.aws_region().unwrap_or_default()),
            format!("export QDB_{up}_NODESIM=http://127.0.0.1:{}", ports.nodesim(c)),
            format!("export QDB_{up}_TRAEFIK_API=http://127.0.0.1:{}", ports.traefik_api(c)),
            format!(
                "export QDB_{up}_APISERVER_PID_FILE={}",
                s.pid_file(&cluster::apiserver(s, c).name).display()
            ),
        ]);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The provisioner's cluster registry for the local cloud.
pub fn render_provisioner_config(s: &Settings) -> String {
    let mut text = String::from(
        "# written by localcloud up: the local cloud's clusters as the provisioner sees them\nclusters:\n",
    );
    for c in &s.clusters {
        text.push_str(&format!(
            "  {}:\n    kubeconfig: {}\n    namespace: questdb\n",
            c.name,
            cluster::kubeconfig(s, c, "provisioner").display()
        ));
    }
    text
}

fn write_whole(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

pub fn write_env(cloud: &Cloud) -> Result<()> {
    let s = &cloud.settings;
    let mut text = render_env(s, &token(cloud, "kafka-provisioner")?);
    for c in &s.clusters {
        let path = aws::network_env(s, c);
        text.push_str(&fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    write_whole(&s.env_file(), &text)
}

pub fn write_provisioner_config(s: &Settings) -> Result<()> {
    write_whole(&s.run.join("provisioner.yaml"), &render_provisioner_config(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::tests::settings;

    /// The script's write_env for QDB_RUN=/r QDB_CACHE=/cache QDB_PORT_BASE=27000, both clusters.
    const ENV: &str = "\
# written by localcloud up; source it to reach the local cloud
export QDB_RUN=/r
export QDB_CACHE=/cache
export QDB_PORT_BASE=27000
export QDB_LOCALCLOUD=/repo/localcloud/localcloud
export QDB_MOTO_PID_FILE=/r/pids/moto.pid
export QDB_AWS_CALL_LOG=/r/moto/ec2-calls.jsonl
export QDB_AWS_TIMING=realistic
export DATABASE_URL=postgres://postgres@127.0.0.1:27432/qdb
export KAFKA_BROKERS=127.0.0.1:27092
export QDB_SASL_SSL_BROKERS=127.0.0.1:27093
export QDB_SASL_SSL_CA=/r/kafka/pki/ca.crt
export QDB_SASL_USER=qdb-provisioner
export QDB_SASL_PASSWORD=secret
export QDB_K8S_VERSION=1.37.2
export QDB_PROMETHEUS=http://127.0.0.1:27090
export QDB_PROMETHEUS_TARGETS=/r/prometheus/targets
export PATH=/cache/k8s-1.37.2/bin:$PATH
export AWS_ENDPOINT_URL=http://127.0.0.1:27500
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export QDB_CLUSTERS=region-a,region-b
export QDB_PROVISIONER_CONFIG=/r/provisioner.yaml
export QDB_BIN_DIR=/cache/target/debug
export QDB_EBS_DIR=/r/ebs
export QDB_EBS_CSI_DRIVER_KEY=ebs-csi-driver
export QDB_REGION_A_KUBECONFIG=/r/region-a/admin.kubeconfig
export QDB_REGION_A_OPERATOR_KUBECONFIG=/r/region-a/operator.kubeconfig
export QDB_REGION_A_PROVISIONER_KUBECONFIG=/r/region-a/provisioner.kubeconfig
export QDB_REGION_A_AWS_REGION=us-east-1
export QDB_REGION_A_NODESIM=http://127.0.0.1:28006
export QDB_REGION_A_TRAEFIK_API=http://127.0.0.1:28023
export QDB_REGION_A_APISERVER_PID_FILE=/r/pids/region-a-apiserver.pid
export QDB_REGION_B_KUBECONFIG=/r/region-b/admin.kubeconfig
export QDB_REGION_B_OPERATOR_KUBECONFIG=/r/region-b/operator.kubeconfig
export QDB_REGION_B_PROVISIONER_KUBECONFIG=/r/region-b/provisioner.kubeconfig
export QDB_REGION_B_AWS_REGION=eu-west-1
export QDB_REGION_B_NODESIM=http://127.0.0.1:28106
export QDB_REGION_B_TRAEFIK_API=http://127.0.0.1:28123
export QDB_REGION_B_APISERVER_PID_FILE=/r/pids/region-b-apiserver.pid
";

    #[test]
    fn env_file_as_the_script_wrote_it() {
        let s = settings(&[("QDB_RUN", "/r"), ("QDB_PORT_BASE", "27000")]);
        assert_eq!(render_env(&s, "secret"), ENV);
    }

    #[test]
    fn provisioner_config_lists_each_cluster() {
        let s = settings(&[("QDB_RUN", "/r"), ("QDB_CLUSTERS", "region-b")]);
        assert_eq!(
            render_provisioner_config(&s),
            "# written by localcloud up: the local cloud's clusters as the provisioner sees them\nclusters:\n  \
             region-b:\n    kubeconfig: /r/region-b/provisioner.kubeconfig\n    namespace: questdb\n"
        );
    }
}
