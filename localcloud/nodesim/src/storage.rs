//! EBS volumes' storage on this machine. The emulator keeps no data, so the node plays the block
//! device: where the machine allows loop devices and XFS, a volume is a sparse image of the
//! volume's size, formatted XFS and loop-mounted at `<volumes dir>/<volume id>`; when EC2 says the
//! volume grew, the image grows (EBS growing the device) and the filesystem is grown online
//! (what the EBS CSI node plugin's NodeExpandVolume does on a real node). Elsewhere a volume is a
//! plain directory and growth changes nothing on disk.
//!
//! A volume created from an EBS snapshot finds its storage made already: the AWS emulator copied
//! the snapshot's (localcloud/aws/ebs_data.py), and it is mounted as it is, not formatted.
//!
//! XFS, not ext4: growing ext4 online needs CAP_SYS_RESOURCE, which this machine kind does not
//! grant (resize2fs: "Permission denied to resize filesystem"); xfs_growfs needs CAP_SYS_ADMIN,
//! which mounting needs anyway.
//!
//! A mount outlives its pod, as the directory did: a volume's storage is one place on this one
//! machine whichever node holds it, and fencing (one process at a time) is the operator's to
//! prove, not the mount's. The simulator unmounts what it mounted when it shuts down; a killed
//! one's mounts are reused by the next and removed by `localcloud reset`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;
use tokio::process::Command;
use tracing::{info, warn};

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A directory per volume: no size, no growth.
    Directory,
    /// A loop-mounted XFS image per volume, of the volume's size, grown online.
    XfsImage,
    /// XFS images if a trial mount and growth work here, directories otherwise.
    Auto,
}

pub struct Storage {
    kind: Kind,
    /// `<dir>/<volume id>` is what a pod mounts.
    mounts_dir: PathBuf,
    /// `<dir>/<volume id>.img` is the volume's block device.
    images_dir: PathBuf,
    /// Volumes this simulator mounted (or found mounted and used), unmounted at shutdown.
    mine: Mutex<BTreeSet<String>>,
}

/// XFS refuses filesystems under 300 MiB.
const XFS_MIN_BYTES: u64 = 300 << 20;

impl Storage {
    /// Settles `Auto` by trying what a volume will need: make, mount and grow an image.
    pub async fn new(kind: Kind, mounts_dir: PathBuf, images_dir: PathBuf) -> Result<Self, StorageError> {
        // As mountinfo spells them: absolute, no symbolic links.
        let canonical = |p: PathBuf| {
            mkdir(&p)?;
            std::fs::canonicalize(&p).map_err(|source| StorageError::Io { path: p, source })
        };
        let mut s = Self {
            kind,
            mounts_dir: canonical(mounts_dir)?,
            images_dir: canonical(images_dir)?,
            mine: Mutex::default(),
        };
        if kind == Kind::Auto {
            s.kind = match s.trial().await {
                Ok(()) => Kind::XfsImage,
                Err(e) => {
                    warn!(error = %e, "volumes are directories: this machine cannot loop-mount and grow XFS");
                    Kind::Directory
                }
            };
        }
        info!(kind = ?s.kind, dir = %s.mounts_dir.display(), "volume storage");
        Ok(s)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The volume's filesystem, ready for a pod: made on first use, mounted if it is not.
    pub async fn ensure(&self, volume_id: &str, size_bytes: u64) -> Result<PathBuf, StorageError> {
        let root = self.root(volume_id);
        mkdir(&root)?;
        if self.kind != Kind::XfsImage {
            return Ok(root);
        }
        let image = self.image(volume_id);
        if !image.exists() {
            mkdir(&self.images_dir)?;
            // Formatted under another name, so a crash mid-way leaves no half-made volume.
            let tmp = image.with_extension("img.new");
            make_image(&tmp, size_bytes.max(XFS_MIN_BYTES)).await?;
            std::fs::rename(&tmp, &image)
                .map_err(|source| StorageError::Io { path: image.clone(), source })?;
            info!(volume = volume_id, size_bytes, "volume formatted (xfs)");
        }
        if !is_mounted(&root)? {
            // nouuid: a volume restored from a snapshot has its source's filesystem UUID, and on
            // this one machine the source may still be mounted (on EC2 they are other machines).
            run("mount", &["-o", "loop,nouuid", path_str(&image), path_str(&root)]).await?;
            info!(volume = volume_id, at = %root.display(), "volume mounted");
        }
        self.mine.lock().expect("storage lock").insert(volume_id.to_string());
        Ok(root)
    }

    /// Grows a mounted volume to `size_bytes` if EC2 says it is larger than its device: returns
    /// the new size, or None when there was nothing to do.
    pub async fn grow(&self, volume_id: &str, size_bytes: u64) -> Result<Option<u64>, StorageError> {
        let root = self.root(volume_id);
        if self.kind != Kind::XfsImage || !is_mounted(&root)? {
            return Ok(None);
        }
        let image = self.image(volume_id);
        let current =
            std::fs::metadata(&image).map_err(|source| StorageError::Io { path: image.clone(), source })?;
        if size_bytes <= current.len() {
            return Ok(None);
        }
        grow_image(&image, &root, size_bytes).await?;
        info!(volume = volume_id, from = current.len(), to = size_bytes, "volume grown online (xfs_growfs)");
        Ok(Some(size_bytes))
    }

    /// Unmounts the volumes this simulator used (their containers are stopped by now).
    pub async fn release(&self) {
        let mine: Vec<String> =
            std::mem::take(&mut *self.mine.lock().expect("storage lock")).into_iter().collect();
        for volume_id in mine {
            let root = self.root(&volume_id);
            if let Err(e) = unmount(&root).await {
                warn!(volume = volume_id, error = %e, "unmounting a volume failed");
            }
        }
    }

    /// Where pods see the volume.
    fn root(&self, volume_id: &str) -> PathBuf {
        self.mounts_dir.join(volume_id)
    }

    fn image(&self, volume_id: &str) -> PathBuf {
        self.images_dir.join(format!("{volume_id}.img"))
    }

    async fn trial(&self) -> Result<(), StorageError> {
        let dir = self.images_dir.join(format!("trial-{}", std::process::id()));
        mkdir(&dir)?;
        let image = dir.join("trial.img");
        let mnt = dir.join("mnt");
        mkdir(&mnt)?;
        let result = async {
            make_image(&image, XFS_MIN_BYTES).await?;
            run("mount", &["-o", "loop", path_str(&image), path_str(&mnt)]).await?;
            let grown = grow_image(&image, &mnt, 2 * XFS_MIN_BYTES).await;
            unmount(&mnt).await?;
            grown
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

async fn make_image(path: &Path, size_bytes: u64) -> Result<(), StorageError> {
    let f = std::fs::File::create(path).map_err(|source| StorageError::Io { path: path.into(), source })?;
    f.set_len(size_bytes).map_err(|source| StorageError::Io { path: path.into(), source })?;
    // -K: no discard pass over a sparse file's blocks.
    run("mkfs.xfs", &["-q", "-K", "-f", path_str(path)]).await
}

/// The device grows (the image, then the loop device's idea of it), then the filesystem.
async fn grow_image(image: &Path, mountpoint: &Path, size_bytes: u64) -> Result<(), StorageError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|source| StorageError::Io { path: image.into(), source })?;
    f.set_len(size_bytes).map_err(|source| StorageError::Io { path: image.into(), source })?;
    let listed = output("losetup", &["-j", path_str(image)]).await?;
    let device = loop_device(&listed).ok_or_else(|| StorageError::Command {
        command: format!("losetup -j {}", image.display()),
        stderr: format!("no loop device backs the image (got {listed:?})"),
    })?;
    run("losetup", &["-c", &device]).await?;
    run("xfs_growfs", &["-d", path_str(mountpoint)]).await
}

async fn unmount(path: &Path) -> Result<(), StorageError> {
    if !is_mounted(path)? {
        return Ok(());
    }
    // Lazy: a process still holding a file (a partitioned pod's server) keeps its view.
    run("umount", &["-l", path_str(path)]).await
}

fn mkdir(path: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(path).map_err(|source| StorageError::Io { path: path.into(), source })
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn is_mounted(path: &Path) -> Result<bool, StorageError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| StorageError::Io { path: "/proc/self/mountinfo".into(), source })?;
    Ok(mounted_at(&info, path))
}

/// Whether mountinfo lists a mount at `path` (its fifth field, with spaces and the like escaped
/// as octal).
pub fn mounted_at(mountinfo: &str, path: &Path) -> bool {
    let want = path_str(path).replace('\\', "\\134").replace(' ', "\\040");
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// The device of `losetup -j` output (`/dev/loop3: [..]:.. (/path)`).
pub fn loop_device(listed: &str) -> Option<String> {
    listed
        .lines()
        .next()?
        .split_once(':')
        .map(|(d, _)| d.trim().to_string())
        .filter(|d| d.starts_with("/dev/"))
}

async fn output(program: &str, args: &[&str]) -> Result<String, StorageError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| StorageError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(StorageError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn run(program: &str, args: &[&str]) -> Result<(), StorageError> {
    output(program, args).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_is_found_by_its_mount_point() {
        let info = "36 35 98:0 / /mnt/a\\040b rw,noatime shared:1 - xfs /dev/loop0 rw\n\
                    37 35 98:1 / /run/ebs/vol-1 rw - xfs /dev/loop1 rw\n";
        assert!(mounted_at(info, Path::new("/run/ebs/vol-1")));
        assert!(mounted_at(info, Path::new("/mnt/a b")));
        assert!(!mounted_at(info, Path::new("/run/ebs/vol-2")));
        assert!(!mounted_at(info, Path::new("/run/ebs")));
    }

    #[test]
    fn the_loop_device_is_read_from_losetup() {
        assert_eq!(
            loop_device("/dev/loop3: [2049]:1234 (/r/ebs-images/vol-1.img)\n").as_deref(),
            Some("/dev/loop3")
        );
        assert_eq!(loop_device(""), None);
        assert_eq!(loop_device("garbage"), None);
    }
}
