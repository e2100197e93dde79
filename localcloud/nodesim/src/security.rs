//! Who a container's process is, as the kubelet and the container runtime make it from the pod's
//! and the container's `securityContext`: its user and groups, the capabilities it keeps, no new
//! privileges; and the group ownership `fsGroup` gives the volume. Played with util-linux's
//! `setpriv` between `ip netns exec` and the program, so a database started as user 10001 meets
//! the same file permissions on its volume as on a real node.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: `fsGroup` and `supplementalGroups`.
    pub groups: Vec<u32>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    /// Capabilities kept for a non-root process (`capabilities.add`, lower case, no `CAP_`).
    pub ambient: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The kubelet's CreateContainerConfigError for an image that would run as root.
    #[error("container has runAsNonRoot and image will run as root")]
    WouldRunAsRoot,
    #[error("{field} {value} is not a user or group id")]
    Id { field: &'static str, value: i64 },
}

fn id(field: &'static str, value: i64) -> Result<u32, IdentityError> {
    u32::try_from(value).map_err(|_| IdentityError::Id { field, value })
}

/// The first container's identity; `None` runs it as the image's default user, root here (the
/// images played have no USER of their own).
pub fn identity(pod: &Pod) -> Result<Option<Identity>, IdentityError> {
    let Some(spec) = pod.spec.as_ref() else { return Ok(None) };
    let pod_ctx = spec.security_context.clone().unwrap_or_default();
    let ctx = spec.containers.first().and_then(|c| c.security_context.clone()).unwrap_or_default();
    let uid = ctx.run_as_user.or(pod_ctx.run_as_user);
    let non_root = ctx.run_as_non_root.or(pod_ctx.run_as_non_root).unwrap_or(false);
    let uid = match uid {
        None | Some(0) if non_root => return Err(IdentityError::WouldRunAsRoot),
        None | Some(0) => return Ok(None),
        Some(u) => id("runAsUser", u)?,
    };
    // Without runAsGroup the runtime uses the image's group: root's, 0.
    let gid = match ctx.run_as_group.or(pod_ctx.run_as_group) {
        Some(g) => id("runAsGroup", g)?,
        None => 0,
    };
    let mut groups = Vec::new();
    for g in pod_ctx.fs_group.into_iter().chain(pod_ctx.supplemental_groups.into_iter().flatten()) {
        let g = id("supplementalGroups", g)?;
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let ambient = ctx
        .capabilities
        .and_then(|c| c.add)
        .unwrap_or_default()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    Ok(Some(Identity {
        uid,
        gid,
        groups,
        no_new_privs: ctx.allow_privilege_escalation == Some(false),
        ambient,
    }))
}

/// `setpriv` and its arguments, to put before the program. The parent-death signal is set again
/// after the user changes, since the kernel clears it with the credentials.
pub fn setpriv_args(i: &Identity) -> Vec<String> {
    let caps = std::iter::once("-all".to_string()).chain(i.ambient.iter().map(|c| format!("+{c}")));
    let caps = caps.collect::<Vec<_>>().join(",");
    let mut args = vec!["setpriv".to_string(), format!("--reuid={}", i.uid), format!("--regid={}", i.gid)];
    if i.groups.is_empty() {
        args.push("--clear-groups".into());
    } else {
        let groups: Vec<String> = i.groups.iter().map(u32::to_string).collect();
        args.push(format!("--groups={}", groups.join(",")));
    }
    args.extend([
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set={caps}"),
    ]);
    if i.no_new_privs {
        args.push("--nnp".into());
    }
    args.extend(["--pdeathsig=SIGKILL".to_string(), "--".to_string()]);
    args
}

/// The pod's `fsGroup`, and whether it is applied only when the volume's root does not have it
/// yet (`fsGroupChangePolicy: OnRootMismatch`).
pub fn fs_group(pod: &Pod) -> Result<Option<(u32, bool)>, IdentityError> {
    let Some(ctx) = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()) else { return Ok(None) };
    let Some(g) = ctx.fs_group else { return Ok(None) };
    let on_mismatch = ctx.fs_group_change_policy.as_deref() == Some("OnRootMismatch");
    Ok(Some((id("fsGroup", g)?, on_mismatch)))
}

#[derive(Debug, thiserror::Error)]
#[error("giving {path} to group {gid}")]
pub struct OwnershipError {
    path: PathBuf,
    gid: u32,
    source: std::io::Error,
}

/// What the kubelet does for `fsGroup` before a container starts: every file and directory of
/// the volume gets the group, read and write for it, and directories the set-group-id bit so
/// what the database creates later keeps the group. Skipped when the root already has the group
/// and the bits and the policy is OnRootMismatch.
pub fn apply_fs_group(root: &Path, gid: u32, on_root_mismatch: bool) -> Result<(), OwnershipError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OwnershipError { path, gid, source }
    };
    let meta = std::fs::symlink_metadata(root).map_err(err(root))?;
    const DIR_BITS: u32 = 0o2070;
    if on_root_mismatch && meta.gid() == gid && meta.mode() & DIR_BITS == DIR_BITS {
        return Ok(());
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(err(&path))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&path, None, Some(gid)).map_err(err(&path))?;
        let mode = meta.mode() & 0o7777;
        let wanted = if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(err(&path))? {
                stack.push(entry.map_err(err(&path))?.path());
            }
            mode | DIR_BITS
        } else {
            // Group execute only where the owner had it.
            mode | 0o060 | ((mode & 0o100) >> 3)
        };
        if wanted != mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted)).map_err(err(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn questdb_pod() -> Pod {
        pod(serde_json::json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001,
                                "fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch",
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "questdb", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
        }))
    }

    #[test]
    fn the_database_runs_as_its_user_with_the_volumes_group_and_no_capabilities() {
        let i = identity(&questdb_pod()).unwrap().unwrap();
        assert_eq!(
            i,
            Identity { uid: 10001, gid: 10001, groups: vec![10001], no_new_privs: true, ambient: vec![] }
        );
        assert_eq!(
            setpriv_args(&i).join(" "),
            "setpriv --reuid=10001 --regid=10001 --groups=10001 --inh-caps=-all --ambient-caps=-all \
             --bounding-set=-all --nnp --pdeathsig=SIGKILL --"
        );
        assert_eq!(fs_group(&questdb_pod()).unwrap(), Some((10001, true)));
    }

    #[test]
    fn a_non_root_ingress_keeps_only_the_capability_it_adds() {
        let p = pod(serde_json::json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
            "containers": [{"name": "traefik", "securityContext": {
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
        }));
        let i = identity(&p).unwrap().unwrap();
        assert_eq!((i.uid, i.gid, i.groups.clone(), i.no_new_privs), (65532, 0, vec![], false));
        let args = setpriv_args(&i).join(" ");
        assert!(args.contains("--clear-groups --inh-caps=-all,+net_bind_service"), "{args}");
        assert!(args.contains("--bounding-set=-all,+net_bind_service --pdeathsig"), "{args}");
    }

    #[test]
    fn root_is_refused_where_the_pod_asks_for_non_root_and_kept_otherwise() {
        let p = pod(
            serde_json::json!({"securityContext": {"runAsNonRoot": true}, "containers": [{"name": "c"}]}),
        );
        assert_eq!(identity(&p), Err(IdentityError::WouldRunAsRoot));
        let p = pod(serde_json::json!({"containers": [{"name": "c", "securityContext": {"runAsUser": 0}}]}));
        assert_eq!(identity(&p), Ok(None));
        // The container's setting wins over the pod's.
        let p = pod(serde_json::json!({"securityContext": {"runAsUser": 5},
                                       "containers": [{"name": "c", "securityContext": {"runAsUser": 7}}]}));
        assert_eq!(identity(&p).unwrap().unwrap().uid, 7);
    }

    #[test]
    fn fs_group_gives_the_tree_to_the_group_and_skips_a_root_that_has_it() {
        let dir = std::env::temp_dir().join(format!("nodesim-fsgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::write(dir.join("conf/server.conf"), "a=b").unwrap();
        std::fs::set_permissions(dir.join("conf/server.conf"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        apply_fs_group(&dir, 10001, true).unwrap();
        for (path, mode) in
            [(dir.clone(), 0o2070), (dir.join("conf"), 0o2070), (dir.join("conf/server.conf"), 0o060)]
        {
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.gid(), 10001, "{path:?}");
            assert_eq!(m.mode() & mode, mode, "{path:?} {:o}", m.mode());
        }
        // OnRootMismatch: a root with the group is left alone, so its tree is not walked.
        std::os::unix::fs::lchown(dir.join("conf"), None, Some(0)).unwrap();
        apply_fs_group(&dir, 10001, true).unwrap();
        assert_eq!(std::fs::metadata(dir.join("conf")).unwrap().gid(), 0);
        apply_fs_group(&dir, 10001, false).unwrap();
        assert_eq!(std::fs::metadata(dir.join("conf")).unwrap().gid(), 10001);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
