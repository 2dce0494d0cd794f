//! A VM's snapshot tree (`snapshots.json` in its folder). Each
//! snapshot is a qcow2 internal snapshot `vm-SNAP` on every writable disk (QEMU's format, through
//! kvmbox-block: taking one shares clusters copy-on-write, deleting one frees only what it alone
//! used, so no data is lost), plus, when the VM was saved, hard links to its saved state in
//! `snapshots/SNAP/` (the state and memory files are never written in place: a new save writes
//! new files), so restoring such a snapshot brings back the running guest too. The tree records
//! each snapshot's parent and which one is current (the next snapshot's parent).

use crate::{check_name, io_err, now_secs, Error, Result, Vm};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// The snapshot that was current when it was taken.
    pub parent: Option<String>,
    /// When it was taken (seconds since the Unix epoch).
    pub created_at: u64,
    /// What the user said about it.
    pub description: String,
    /// Whether it holds a saved state (memory and devices), not only disks.
    pub with_state: bool,
}

/// A VM's snapshots, in the order they were taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotTree {
    /// The snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// The snapshot the VM's present state descends from.
    pub current: Option<String>,
}

impl SnapshotTree {
    fn get(&self, vm: &str, snap: &str) -> Result<&SnapshotInfo> {
        self.snapshots
            .iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| Error::Usage(format!("VM '{vm}' has no snapshot named '{snap}'")))
    }

    /// The tree as indented lines: children under their parent, `*` marking the current one.
    pub fn render(&self) -> String {
        fn walk(t: &SnapshotTree, parent: Option<&str>, depth: usize, out: &mut String) {
            for s in t.snapshots.iter().filter(|s| s.parent.as_deref() == parent) {
                let mark = if t.current.as_deref() == Some(&s.name) {
                    "*"
                } else {
                    " "
                };
                let state = if s.with_state { " [saved state]" } else { "" };
                let desc = if s.description.is_empty() {
                    String::new()
                } else {
                    format!(" - {}", s.description)
                };
                out.push_str(&format!(
                    "{mark} {}{}{state}{desc}\n",
                    "  ".repeat(depth),
                    s.name
                ));
                walk(t, Some(&s.name), depth + 1, out);
            }
        }
        let mut out = String::new();
        walk(self, None, 0, &mut out);
        out
    }
}

/// The internal snapshot name on the disks.
pub(crate) fn disk_name(snap: &str) -> String {
    format!("vm-{snap}")
}

fn block_err(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Failed(format!("disk {}: {e}", path.display()))
}

impl Vm {
    fn tree_path(&self) -> PathBuf {
        self.dir().join("snapshots.json")
    }

    fn snapshot_dir(&self, snap: &str) -> PathBuf {
        self.dir().join("snapshots").join(snap)
    }

    /// The snapshot tree (empty when none was taken).
    pub fn snapshot_tree(&self) -> Result<SnapshotTree> {
        match std::fs::read_to_string(self.tree_path()) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| Error::Failed(format!("{}: {e}", self.tree_path().display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SnapshotTree::default()),
            Err(e) => Err(io_err(
                format_args!("reading {}", self.tree_path().display()),
                e,
            )),
        }
    }

    fn write_tree(&self, t: &SnapshotTree) -> Result<()> {
        let path = self.tree_path();
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(t).unwrap_or_default();
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io_err(format_args!("writing {}", path.display()), e))
    }

    /// The disks a snapshot covers: every writable one, which must be qcow2.
    fn snapshot_disks(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for d in self.config()?.disks {
            if d.read_only {
                continue;
            }
            let layers = kvmbox_block::image::info(&d.path).map_err(|e| block_err(&d.path, e))?;
            if layers.first().map(|l| l.format.as_str()) != Some("qcow2") {
                return Err(Error::Usage(format!(
                    "VM '{}': disk {} is not qcow2, so it cannot hold snapshots (kvmbox disk convert makes a qcow2 copy)",
                    self.name(),
                    d.path.display()
                )));
            }
            out.push(d.path);
        }
        Ok(out)
    }

    /// Refuse ([`Error::NoSpace`]) when a disk's filesystem cannot hold one more qcow2
    /// metadata change of every disk of it (`what`: the operation, for the message).
    fn check_metadata_space(&self, disks: &[PathBuf], what: &str) -> Result<()> {
        let mut needs = Vec::new();
        for d in disks {
            needs.push(crate::space::Need {
                dir: d.parent().unwrap_or(self.dir()).to_path_buf(),
                bytes: crate::space::metadata_change_bytes(d)?,
                what: format!(
                    "{what} on {}",
                    d.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
        crate::space::check(&needs)
    }

    /// Take snapshot `snap` of this stopped or saved VM (the caller holds its lock).
    pub fn snapshot_take(&self, snap: &str, description: &str) -> Result<()> {
        check_name(snap)?;
        let mut tree = self.snapshot_tree()?;
        if tree.snapshots.iter().any(|s| s.name == snap) {
            return Err(Error::Usage(format!(
                "VM '{}' has a snapshot named '{snap}' already",
                self.name()
            )));
        }
        let disks = self.snapshot_disks()?;
        self.check_metadata_space(&disks, "the snapshot's tables")?;
        let mut done: Vec<PathBuf> = Vec::new();
        for d in &disks {
            if let Err(e) = kvmbox_block::snapshot::create(d, &disk_name(snap)) {
                for undo in &done {
                    let _ = kvmbox_block::snapshot::delete(undo, &disk_name(snap));
                }
                return Err(block_err(d, e));
            }
            done.push(d.clone());
        }
        let with_state = self.has_saved_state();
        if with_state {
            let dir = self.snapshot_dir(snap);
            let (state, mem) = self.saved_state();
            let linked = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::hard_link(&state, dir.join("state")))
                .and_then(|()| std::fs::hard_link(&mem, dir.join("mem")));
            if let Err(e) = linked {
                let _ = std::fs::remove_dir_all(&dir);
                for d in &done {
                    let _ = kvmbox_block::snapshot::delete(d, &disk_name(snap));
                }
                return Err(io_err(
                    format_args!("keeping the saved state in {}", dir.display()),
                    e,
                ));
            }
        }
        tree.snapshots.push(SnapshotInfo {
            name: snap.to_string(),
            parent: tree.current.clone(),
            created_at: now_secs(),
            description: description.to_string(),
            with_state,
        });
        tree.current = Some(snap.to_string());
        self.write_tree(&tree)
    }

    /// Take snapshot `snap` of this running (`running`) or paused VM without stopping it, as
    /// VirtualBox does (the caller holds its lock): the guest is paused (if it runs), and one
    /// `PUT /snapshot/create` with the kvmbox field `disk_snapshot` makes the VM process take
    /// the internal snapshot `vm-SNAP` on every writable disk through its open images (no
    /// second open of a disk in use) and write the memory and device state (Full) into
    /// `snapshots/SNAP/`; then the guest runs on. The snapshot holds the running state, so
    /// restoring it and starting resumes the guest from that moment. On any failure nothing
    /// is left: the VM process deletes the disk snapshots it took, the folder goes, and the
    /// guest runs on as before.
    pub fn snapshot_take_live(&self, snap: &str, description: &str, running: bool) -> Result<()> {
        check_name(snap)?;
        let mut tree = self.snapshot_tree()?;
        if tree.snapshots.iter().any(|s| s.name == snap) {
            return Err(Error::Usage(format!(
                "VM '{}' has a snapshot named '{snap}' already",
                self.name()
            )));
        }
        let disks = self.snapshot_disks()?;
        self.check_metadata_space(&disks, "the snapshot's tables")?;
        let dir = self.snapshot_dir(snap);
        let (state, mem) = (dir.join("state"), dir.join("mem"));
        let partial = |p: &PathBuf| p.with_extension("partial");
        if dir.exists() {
            // Left by a take that was interrupted: the tree does not name it.
            std::fs::remove_dir_all(&dir)
                .map_err(|e| io_err(format_args!("removing {}", dir.display()), e))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(format_args!("creating {}", dir.display()), e))?;
        let body = serde_json::json!({
            "snapshot_path": self.api_output_path(&partial(&state)),
            "mem_file_path": self.api_output_path(&partial(&mem)),
            "snapshot_type": "Full",
            "disk_snapshot": disk_name(snap),
        });
        let (made, resumed) = match self.put_while_paused(running, "/snapshot/create", &body) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let kept = made.and_then(|_| {
            for p in [&state, &mem] {
                self.take_api_output(&partial(p))?;
                std::fs::rename(partial(p), p)
                    .map_err(|e| io_err(format_args!("keeping {}", p.display()), e))?;
            }
            Ok(())
        });
        if let Err(e) = kept {
            let _ = std::fs::remove_dir_all(&dir);
            for p in [&state, &mem] {
                let out = self.api_output_path(&partial(p));
                if out != partial(p) {
                    let _ = std::fs::remove_file(out);
                }
            }
            return Err(e);
        }
        tree.snapshots.push(SnapshotInfo {
            name: snap.to_string(),
            parent: tree.current.clone(),
            created_at: now_secs(),
            description: description.to_string(),
            with_state: true,
        });
        tree.current = Some(snap.to_string());
        self.write_tree(&tree)?;
        resumed
    }

    /// Check that snapshot `snap` can be restored, changing nothing: the tree has it, every
    /// disk holds it, and each disk's filesystem has room for the restored tables. The
    /// disks are read without their lock, so this works while the VM runs (`vm snapshot
    /// restore` of a running VM checks before it powers the VM off). The snapshot.
    pub fn snapshot_restore_check(&self, snap: &str) -> Result<SnapshotInfo> {
        let info = self.snapshot_tree()?.get(self.name(), snap)?.clone();
        let disks = self.snapshot_disks()?;
        for d in &disks {
            let names = kvmbox_block::snapshot::names_unlocked(d).map_err(|e| block_err(d, e))?;
            if !names.iter().any(|n| *n == disk_name(snap)) {
                return Err(Error::State(format!(
                    "VM '{}': disk {} has no snapshot '{snap}' (added after it was taken?)",
                    self.name(),
                    d.display()
                )));
            }
        }
        self.check_metadata_space(&disks, "the restored tables")?;
        Ok(info)
    }

    /// Bring the disks (and the saved state, if the snapshot has one; otherwise none) back to
    /// snapshot `snap` (of a stopped or saved VM). The present state is lost unless a
    /// snapshot holds it.
    pub fn snapshot_restore(&self, snap: &str) -> Result<()> {
        // Every disk must have it before any is changed.
        let info = self.snapshot_restore_check(snap)?;
        let mut tree = self.snapshot_tree()?;
        let disks = self.snapshot_disks()?;
        for d in &disks {
            kvmbox_block::snapshot::apply(d, &disk_name(snap)).map_err(|e| block_err(d, e))?;
        }
        let (state, mem) = self.saved_state();
        if let Some(saved) = state.parent() {
            match std::fs::remove_dir_all(saved) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format_args!("removing {}", saved.display()), e)),
            }
            if info.with_state {
                let dir = self.snapshot_dir(snap);
                std::fs::create_dir_all(saved)
                    .and_then(|()| std::fs::hard_link(dir.join("state"), &state))
                    .and_then(|()| std::fs::hard_link(dir.join("mem"), &mem))
                    .map_err(|e| {
                        io_err(
                            format_args!("restoring the saved state from {}", dir.display()),
                            e,
                        )
                    })?;
            }
        }
        tree.current = Some(snap.to_string());
        self.write_tree(&tree)
    }

    /// Delete snapshot `snap` of this stopped or saved VM: its children take its parent; the
    /// disks keep every byte the present state or another snapshot uses.
    pub fn snapshot_delete(&self, snap: &str) -> Result<()> {
        let tree = self.snapshot_tree()?;
        let info = tree.get(self.name(), snap)?.clone();
        for d in self.snapshot_disks()? {
            let list = kvmbox_block::snapshot::list(&d).map_err(|e| block_err(&d, e))?;
            if list.iter().any(|s| s.name == disk_name(snap)) {
                kvmbox_block::snapshot::delete(&d, &disk_name(snap))
                    .map_err(|e| block_err(&d, e))?;
            }
        }
        self.forget_snapshot(tree, &info)
    }

    /// Delete snapshot `snap` of this running (`running`) or paused VM without stopping it
    /// (the caller holds its lock): the guest is paused (if it runs), and one `PUT
    /// /snapshot/delete` (kvmbox extension) makes the VM process delete `vm-SNAP` on every
    /// writable disk that holds it, through its open images; then the guest runs on, and the
    /// snapshot's saved state and its place in the tree go as [`Self::snapshot_delete`]'s do.
    /// When the VM process cannot do it, nothing changes in the tree.
    pub fn snapshot_delete_live(&self, snap: &str, running: bool) -> Result<()> {
        let tree = self.snapshot_tree()?;
        let info = tree.get(self.name(), snap)?.clone();
        let body = serde_json::json!({ "disk_snapshot": disk_name(snap) });
        let (deleted, resumed) = self.put_while_paused(running, "/snapshot/delete", &body)?;
        deleted.map_err(|e| match e {
            Error::State(m) => Error::State(format!(
                "{m} (the VM process cannot delete its disk snapshots: stop the VM, then delete '{snap}')"
            )),
            e => e,
        })?;
        self.forget_snapshot(tree, &info)?;
        resumed
    }

    /// `PUT path` with `body` to this VM's process with its guest paused: a running VM
    /// (`running`) is paused first (an error here: nothing was asked) and resumed after,
    /// whatever the call answered, so the guest runs on. The call's answer and the resume's.
    fn put_while_paused(
        &self,
        running: bool,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(Result<String>, Result<()>)> {
        let (name, sock) = (self.name(), self.api_sock());
        if running {
            crate::api::call(name, &sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#))?;
        }
        let answer = crate::api::call(name, &sock, "PUT", path, Some(&body.to_string()));
        let resumed = if running {
            crate::api::call(name, &sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)).map(drop)
        } else {
            Ok(())
        };
        Ok((answer, resumed))
    }

    /// Drop snapshot `info` (gone from the disks) from the folder and from `tree`: its saved
    /// state goes, its children take its parent, and so does `current` if it was current.
    fn forget_snapshot(&self, mut tree: SnapshotTree, info: &SnapshotInfo) -> Result<()> {
        let snap = info.name.as_str();
        let dir = self.snapshot_dir(snap);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| io_err(format_args!("removing {}", dir.display()), e))?;
        }
        for s in &mut tree.snapshots {
            if s.parent.as_deref() == Some(snap) {
                s.parent = info.parent.clone();
            }
        }
        if tree.current.as_deref() == Some(snap) {
            tree.current = info.parent.clone();
        }
        tree.snapshots.retain(|s| s.name != snap);
        self.write_tree(&tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_renders_children_under_parents() {
        let s = |name: &str, parent: Option<&str>| SnapshotInfo {
            name: name.into(),
            parent: parent.map(Into::into),
            created_at: 0,
            description: String::new(),
            with_state: false,
        };
        let t = SnapshotTree {
            snapshots: vec![
                s("a", None),
                s("b", Some("a")),
                s("c", Some("a")),
                s("d", Some("b")),
            ],
            current: Some("c".into()),
        };
        assert_eq!(t.render(), "  a\n    b\n      d\n*   c\n");
    }
}
