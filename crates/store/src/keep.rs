//! `vm delete --keep-disks`: the disks in a VM's folder move to `$KVMBOX_HOME/kept-disks/NAME/`
//! (`NAME-2`, `NAME-3`, ... when that exists) before the folder goes, so they outlive the VM.
//! A disk that is a single file is moved (one rename: its qcow2 internal snapshots stay in it);
//! a disk with a backing chain (an overlay, e.g. either side of a linked clone) is flattened into
//! a standalone qcow2 image, so it stays readable whatever happens to its backing files. Disks
//! outside the folder (`--disk`) are left where they are, as `delete` always does.

use crate::clone::flatten;
use crate::{io_err, Error, Result, Store, Vm};
use std::path::PathBuf;

/// Where the disks of a deleted VM are kept.
pub const KEPT_DISKS: &str = "kept-disks";

impl Store {
    /// Take the disks out of `vm`'s folder (the VM is stopped and the caller holds its lock)
    /// into a new folder under `kept-disks/`; return every disk that outlives the VM, kept or
    /// left outside the folder. On an error nothing of the VM has moved.
    pub fn keep_disks(&self, vm: &Vm) -> Result<Vec<PathBuf>> {
        let root = self.home().join(KEPT_DISKS);
        std::fs::create_dir_all(&root)
            .map_err(|e| io_err(format_args!("creating {}", root.display()), e))?;
        let mut k = 1;
        let dest = loop {
            let p = match k {
                1 => root.join(vm.name()),
                k => root.join(format!("{}-{k}", vm.name())),
            };
            match std::fs::create_dir(&p) {
                Ok(()) => break p,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => k += 1,
                Err(e) => return Err(io_err(format_args!("creating {}", p.display()), e)),
            }
        };
        let mut outside = Vec::new();
        let mut moves: Vec<(PathBuf, PathBuf)> = Vec::new();
        let undo = |moves: &[(PathBuf, PathBuf)]| {
            for (from, to) in moves.iter().rev() {
                let _ = std::fs::rename(to, from);
            }
            let _ = std::fs::remove_dir_all(&dest);
        };
        let mut flattened = Vec::new();
        for d in vm.config()?.disks {
            let inside = d.path.strip_prefix(vm.dir()).ok().filter(|rel| {
                rel.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            });
            let Some(rel) = inside else {
                outside.push(d.path);
                continue;
            };
            // A disk in a subfolder keeps its place under the new folder.
            let to = dest.join(rel);
            if let Some(parent) = to.parent().filter(|p| !p.exists()) {
                if let Err(e) = std::fs::create_dir_all(parent) {
                    undo(&moves);
                    return Err(io_err(format_args!("creating {}", parent.display()), e));
                }
            }
            let layers = kvmbox_block::image::info(&d.path)
                .map_err(|e| Error::Failed(format!("reading {}: {e}", d.path.display())));
            let layers = match layers {
                Ok(l) => l,
                Err(e) => {
                    undo(&moves);
                    return Err(e);
                }
            };
            if layers.len() > 1 {
                // Flatten now, while every backing file is still there.
                if let Err(e) = flatten(&d.path, &to) {
                    undo(&moves);
                    return Err(e);
                }
                flattened.push(to);
            } else {
                moves.push((d.path, to));
            }
        }
        for i in 0..moves.len() {
            let (from, to) = &moves[i];
            if let Err(e) = std::fs::rename(from, to) {
                undo(&moves[..i]);
                return Err(io_err(
                    format_args!("moving {} to {}", from.display(), to.display()),
                    e,
                ));
            }
        }
        let mut kept: Vec<PathBuf> = moves.into_iter().map(|(_, to)| to).collect();
        kept.extend(flattened);
        kept.sort();
        if kept.is_empty() {
            let _ = std::fs::remove_dir(&dest);
        }
        kept.extend(outside);
        Ok(kept)
    }
}
