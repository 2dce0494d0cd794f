//! Clones: a new VM with the source's settings, new MAC addresses (a `mac=` is dropped, so the
//! clone's interfaces get random ones) and no saved state. A full clone copies every disk
//! (flattened into a standalone qcow2 image in the new folder). A linked clone shares them: each
//! of the source's qcow2 disks (which must be in its folder) is frozen into a read-only base
//! `diskN.base-K.qcow2` beside it, and the source and the clone each get a new qcow2 overlay
//! on that base (the source's keeps the disk's name, so its settings do not change). A disk that
//! holds internal snapshots is not frozen (its snapshots would go with it, out of the source's
//! reach): its present state is copied into a read-only base of its own instead.
//!
//! A clone `--snapshot SNAP` starts from the disks' state at the VM snapshot SNAP (qcow2
//! internal snapshot `vm-SNAP`): a full clone gets that state as standalone images without
//! snapshots; a linked clone gets an overlay on a read-only standalone copy of that state in
//! the source's folder, `diskN.snap-SNAP-SECS.NSECS.qcow2` (named after when the snapshot was
//! taken), which every linked clone of that snapshot shares and which nothing writes again, so
//! whatever the source later does with its disks or that snapshot leaves the clones' contents
//! as they were. The clone records its source in `linked-to`; the source (whose folder holds the
//! bases) cannot be deleted while such a clone exists. Free space is checked before any disk is
//! written ([`crate::space`]). When a linked clone is deleted, the bases in its source's folder
//! that no image of the store uses any more go ([`Store::drop_unused_bases`]).

use crate::{io_err, Error, Result, Store, Vm};
use std::path::{Path, PathBuf};

/// Make `p` (from the source's settings) independent of the source's folder.
fn anchored(src: &Vm, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        src.dir().join(p)
    }
}

/// A `--net` spec without its `mac=` option.
fn without_mac(spec: &str) -> String {
    spec.split(',')
        .filter(|part| !part.starts_with("mac="))
        .collect::<Vec<_>>()
        .join(",")
}

/// The file in a linked clone's folder that names the VM whose disks it shares.
pub(crate) const LINKED_TO: &str = "linked-to";

/// Refuse a linked clone of `src` because of its disk `from`.
fn link_usage(src: &Vm, why: String) -> Error {
    Error::Usage(format!(
        "cannot make a linked clone of '{}': {why}; a full clone (without --linked) copies it",
        src.name()
    ))
}

fn failed(what: &str, p: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Failed(format!("{what} {}: {e}", p.display()))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn make_read_only(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| failed("making read-only", p, &e))
}

/// A new qcow2 overlay at `to` on the base `base` (named by absolute path).
fn overlay(base: &Path, to: &Path) -> Result<()> {
    kvmbox_block::image::create(
        to,
        0,
        kvmbox_block::Format::Qcow2,
        Some(&base.display().to_string()),
    )
    .map_err(|e| failed("creating the overlay", to, &e))
}

/// Freeze the source's disk `from` into a read-only base beside it, put a new overlay on the base
/// at `from` for the source, and create `to` as the clone's overlay on the same base.
fn link_disk(src: &Vm, from: &Path, to: &Path) -> Result<()> {
    let stem = from
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = (1..)
        .map(|k| src.dir().join(format!("{stem}.base-{k}.qcow2")))
        .find(|p| !p.exists())
        .unwrap_or_default();
    let base_name = file_name(&base);
    std::fs::rename(from, &base).map_err(|e| failed("freezing", from, &e))?;
    if let Err(e) =
        kvmbox_block::image::create(from, 0, kvmbox_block::Format::Qcow2, Some(&base_name))
    {
        // Put the source's disk back as it was.
        let _ = std::fs::remove_file(from);
        let _ = std::fs::rename(&base, from);
        return Err(failed("creating the overlay", from, &e));
    }
    make_read_only(&base)?;
    overlay(&base, to)
}

/// The qcow2 internal snapshot that holds VM snapshot `snap` on a disk.
fn disk_snapshot(snap: &str) -> String {
    format!("vm-{snap}")
}

/// Copy the state of `from` at its internal snapshot `snap` (or its present state) into `to`,
/// a new standalone qcow2 image without snapshots. For a snapshot the file is copied beside
/// `from` (so a relative backing file still resolves), the snapshot applied in the copy, the
/// copy flattened into `to` and removed: `from` itself is only read.
fn export(from: &Path, snap: Option<&str>, to: &Path) -> Result<()> {
    let Some(snap) = snap else {
        return flatten(from, to);
    };
    let tmp = from.with_file_name(format!(
        ".{}.export-{}",
        file_name(from),
        std::process::id()
    ));
    let done = std::fs::copy(from, &tmp)
        .map_err(|e| failed("copying", from, &e))
        .and_then(|_| {
            kvmbox_block::snapshot::apply(&tmp, &disk_snapshot(snap)).map_err(|e| {
                failed(
                    &format!("applying snapshot '{snap}' to a copy of"),
                    from,
                    &e,
                )
            })
        })
        .and_then(|()| flatten(&tmp, to));
    let _ = std::fs::remove_file(&tmp);
    done
}

/// What a clone does with one of the source's disks.
enum Plan {
    /// Copy its state (at the snapshot, if any) into the clone's folder.
    Copy { snap: Option<String> },
    /// Freeze the disk into a base shared by the source's and the clone's new overlays.
    Link,
    /// Put the clone's overlay on `base`, a read-only standalone copy of the disk's state at
    /// the snapshot (or its present state) in the source's folder; made unless it exists
    /// (a base of one snapshot is shared by all linked clones made from it).
    LinkTo { base: PathBuf, snap: Option<String> },
}

/// Decide what to do with the source's disk `from` (read-only or not) and what that needs in
/// disk space.
fn plan(
    src: &Vm,
    dir: &Path,
    from: &Path,
    read_only: bool,
    linked: bool,
    snap: Option<&str>,
    needs: &mut Vec<crate::space::Need>,
) -> Result<Plan> {
    // A snapshot covers the writable disks only (`vm snapshot take`); read-only ones are as now.
    let snap = snap.filter(|_| !read_only);
    let layers = kvmbox_block::image::info(from)
        .map_err(|e| Error::Failed(format!("reading {}: {e}", from.display())))?;
    let qcow2 = layers.first().map(|l| l.format.as_str()) == Some("qcow2");
    let mut snap_info = None;
    if let Some(s) = snap {
        let on_disk = if qcow2 {
            kvmbox_block::snapshot::list(from)
                .map_err(|e| Error::Failed(format!("reading {}: {e}", from.display())))?
                .into_iter()
                .find(|d| d.name == disk_snapshot(s))
        } else {
            None
        };
        let Some(d) = on_disk else {
            return Err(Error::State(format!(
                "VM '{}': disk {} has no snapshot '{s}' (added after it was taken?)",
                src.name(),
                from.display()
            )));
        };
        snap_info = Some(d);
    }
    let copy_need = |needs: &mut Vec<crate::space::Need>, dir: &Path, what: &str| -> Result<()> {
        if snap.is_some() {
            // The temporary copy beside the disk.
            let len = std::fs::metadata(from)
                .map_err(|e| Error::Failed(format!("reading {}: {e}", from.display())))?
                .len();
            needs.push(crate::space::Need {
                dir: from.parent().unwrap_or(src.dir()).to_path_buf(),
                bytes: len,
                what: format!("a temporary copy of {}", file_name(from)),
            });
        }
        needs.push(crate::space::Need {
            dir: dir.to_path_buf(),
            bytes: crate::space::flatten_bytes(from)?,
            what: what.to_string(),
        });
        Ok(())
    };
    if !linked {
        // The clone's folder, named by the store's folder of VMs that holds it (the clone's
        // own is still a temporary one).
        let vms = dir.parent().unwrap_or(dir);
        copy_need(needs, vms, &format!("the copy of {}", file_name(from)))?;
        return Ok(Plan::Copy {
            snap: snap.map(str::to_string),
        });
    }
    if from.parent() != Some(src.dir()) {
        return Err(link_usage(
            src,
            format!("disk {} is not in the VM's folder", from.display()),
        ));
    }
    if !qcow2 {
        return Err(link_usage(
            src,
            format!("disk {} is not a qcow2 image", from.display()),
        ));
    }
    let stem = from
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let (Some(s), Some(d)) = (snap, &snap_info) {
        // Named after the snapshot and when it was taken: a snapshot deleted and taken again
        // under the same name gets a new base, never the old one's contents.
        let base = src.dir().join(format!(
            "{stem}.snap-{s}-{}.{:09}.qcow2",
            d.date_sec, d.date_nsec
        ));
        if !base.exists() {
            copy_need(needs, src.dir(), &format!("the base {}", file_name(&base)))?;
        }
        return Ok(Plan::LinkTo {
            base,
            snap: Some(s.to_string()),
        });
    }
    if layers.first().is_some_and(|l| l.snapshots > 0) {
        // Freezing this disk would freeze its internal snapshots with it, out of the source's
        // reach: copy its present state into a base of its own instead, and leave it as it is.
        let base = (1..)
            .map(|k| src.dir().join(format!("{stem}.base-{k}.qcow2")))
            .find(|p| !p.exists())
            .unwrap_or_default();
        copy_need(needs, src.dir(), &format!("the base {}", file_name(&base)))?;
        return Ok(Plan::LinkTo { base, snap: None });
    }
    Ok(Plan::Link)
}

/// Carry out `plan` for the source's disk `from`, the clone's disk being `to`. A base this
/// makes is pushed on `made` (removed again if the clone fails later).
fn carry_out(src: &Vm, plan: &Plan, from: &Path, to: &Path, made: &mut Vec<PathBuf>) -> Result<()> {
    match plan {
        Plan::Copy { snap } => export(from, snap.as_deref(), to),
        Plan::Link => link_disk(src, from, to),
        Plan::LinkTo { base, snap } => {
            if !base.exists() {
                // Written under a temporary name, so a base is there complete or not at all.
                let tmp = base.with_file_name(format!(
                    ".{}.partial-{}",
                    file_name(base),
                    std::process::id()
                ));
                let done = export(from, snap.as_deref(), &tmp)
                    .and_then(|()| make_read_only(&tmp))
                    .and_then(|()| {
                        std::fs::rename(&tmp, base).map_err(|e| failed("creating", base, &e))
                    });
                if let Err(e) = done {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                made.push(base.clone());
            }
            overlay(base, to)
        }
    }
}

fn strings(v: Option<&toml::Value>) -> Vec<String> {
    v.and_then(|v| v.clone().try_into::<Vec<String>>().ok())
        .unwrap_or_default()
}

/// The disks of `vm`'s settings `table`: each spec as written, its file (absolute) and
/// whether it is read-only.
fn disk_entries(vm: &Vm, table: &toml::Table) -> Result<Vec<(String, PathBuf, bool)>> {
    strings(table.get("disks"))
        .into_iter()
        .map(|spec| {
            let parsed = kvmbox_vmm::config::parse_disk_spec(&spec)
                .map_err(|e| Error::Usage(e.to_string()))?;
            let from = anchored(vm, &parsed.path.display().to_string());
            Ok((spec, from, parsed.read_only))
        })
        .collect()
}

/// The disks in `vm`'s settings file (see [`disk_entries`]).
fn configured_disks(vm: &Vm) -> Result<Vec<(String, PathBuf, bool)>> {
    let path = vm.settings_path();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| io_err(format_args!("reading {}", path.display()), e))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    disk_entries(vm, &table)
}

/// Write the clone's settings and disks into `dir` (new, empty).
fn build(src: &Vm, dir: &Path, linked: bool, snap: Option<&str>) -> Result<()> {
    let path = src.settings_path();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| io_err(format_args!("reading {}", path.display()), e))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    for key in ["kernel", "initrd"] {
        if let Some(toml::Value::String(p)) = table.get(key) {
            let p = anchored(src, p).display().to_string();
            table.insert(key.into(), toml::Value::String(p));
        }
    }
    let specs = disk_entries(src, &table)?;
    // Everything is decided, and the space checked, before anything is written.
    let mut needs = Vec::new();
    let mut plans = Vec::new();
    for (_, from, read_only) in &specs {
        let p = plan(src, dir, from, *read_only, linked, snap, &mut needs)?;
        plans.push((from.clone(), p));
    }
    crate::space::check(&needs)?;
    let mut made = Vec::new();
    let mut disks = Vec::new();
    for (i, ((spec, _, _), (from, plan))) in specs.iter().zip(&plans).enumerate() {
        let file = format!("disk{i}.qcow2");
        if let Err(e) = carry_out(src, plan, from, &dir.join(&file), &mut made) {
            // Bases made for this clone only; nothing uses them yet.
            for b in &made {
                let _ = std::fs::remove_file(b);
            }
            return Err(e);
        }
        // The copy is qcow2 whatever the original was: keep every option but the format.
        let opts: Vec<&str> = spec
            .split(',')
            .skip(1)
            .filter(|o| !o.starts_with("format="))
            .collect();
        disks.push(
            std::iter::once(file.as_str())
                .chain(opts)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    table.insert("disks".into(), disks.into());
    let nets: Vec<String> = strings(table.get("nets"))
        .iter()
        .map(|n| without_mac(n))
        .collect();
    table.insert("nets".into(), nets.into());
    let body =
        toml::to_string(&table).map_err(|e| Error::Failed(format!("writing the settings: {e}")))?;
    let out = dir.join("vm.toml");
    let kind = if linked { "linked" } else { "full" };
    let from_snap = snap.map_or(String::new(), |s| format!(" at its snapshot '{s}'"));
    std::fs::write(
        &out,
        format!(
            "# kvmbox VM settings (a {kind} clone of '{}'{from_snap}): the format of `kvmbox run --config`.\n{body}",
            src.name()
        ),
    )
    .map_err(|e| io_err(format_args!("writing {}", out.display()), e))?;
    if linked {
        let to = dir.join(LINKED_TO);
        std::fs::write(&to, format!("{}\n", src.name()))
            .map_err(|e| io_err(format_args!("writing {}", to.display()), e))?;
    }
    let loaded = kvmbox_vmm::FileConfig::load(&out).map_err(|e| Error::Usage(e.to_string()))?;
    kvmbox_vmm::VmConfig::build(Some(loaded), kvmbox_vmm::Overrides::default())
        .map_err(|e| Error::Usage(e.to_string()))?;
    Ok(())
}

impl Store {
    /// A clone of `src` (stopped; the caller holds its lock) named `name`: full, or `linked`;
    /// of its disks' present state, or of their state at its snapshot `snap`.
    pub fn clone_vm(&self, src: &Vm, name: &str, linked: bool, snap: Option<&str>) -> Result<Vm> {
        if let Some(s) = snap {
            let tree = src.snapshot_tree()?;
            if !tree.snapshots.iter().any(|i| i.name == s) {
                return Err(Error::Usage(format!(
                    "VM '{}' has no snapshot named '{s}' (kvmbox vm snapshot {} list)",
                    src.name(),
                    src.name()
                )));
            }
        }
        self.create_with(name, |dir| build(src, dir, linked, snap))
    }

    /// After a linked clone of `source` was deleted: remove the clone bases in `source`'s folder
    /// (read-only `diskN.base-K.qcow2`, `diskN.snap-SNAP-....qcow2`) that no image uses any more, and
    /// return them. A base is in use while it is in the backing chain of a disk in any VM's
    /// settings or of any other file in any folder under `vms/` (a detached disk, a clone being
    /// made, another base: a frozen disk's base backs on the one before). Done under
    /// `source`'s lock (a clone of it may be about to use a base); when that lock is taken, or
    /// an image or a VM's settings cannot be read, nothing is removed: a base is never removed
    /// while it might be used, and the next delete (or the source's own) takes it.
    pub fn drop_unused_bases(&self, source: &str) -> Result<Vec<PathBuf>> {
        let src = match self.vm(source) {
            Ok(v) => v,
            Err(Error::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let Ok(_lock) = src.lock("kvmbox vm delete (removing unused clone bases)") else {
            return Ok(Vec::new());
        };
        let files = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        // kvmbox's bases are read-only (0444) and named so; nothing else in the folder goes.
        let is_base = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(p).map_or(true, |m| m.permissions().mode() & 0o222 != 0) {
                return false;
            }
            let n = file_name(p);
            let Some(stem) = n.strip_suffix(".qcow2") else {
                return false;
            };
            !n.starts_with('.')
                && (stem.contains(".snap-")
                    || stem.rsplit_once(".base-").is_some_and(|(_, k)| {
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())
                    }))
        };
        let bases: Vec<PathBuf> = files(src.dir())
            .into_iter()
            .filter(|p| is_base(p))
            .collect();
        if bases.is_empty() {
            return Ok(Vec::new());
        }
        let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut used = std::collections::HashSet::new();
        // Every layer of a chain: (path, whether the top counts as a user of itself).
        let mut add_chain = |p: &Path, with_top: bool| -> bool {
            match kvmbox_block::image::info(p) {
                Ok(layers) => {
                    let skip = usize::from(!with_top);
                    used.extend(layers.iter().skip(skip).map(|l| key(&l.path)));
                    true
                }
                // Gone meanwhile (a folder being deleted): it uses nothing.
                Err(_) if !p.exists() => true,
                Err(_) => false,
            }
        };
        let vms = self.home.join("vms");
        let dirs: Vec<PathBuf> = std::fs::read_dir(&vms)
            .map_err(|e| io_err(format_args!("reading {}", vms.display()), e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        for dir in &dirs {
            for f in files(dir) {
                if (dir.as_path() == src.dir() && bases.contains(&f)) || add_chain(&f, false) {
                    continue;
                }
                return Ok(Vec::new());
            }
        }
        for vm in self.list()? {
            let Ok(disks) = configured_disks(&vm) else {
                return Ok(Vec::new());
            };
            for (_, d, _) in disks {
                if !add_chain(&d, true) {
                    return Ok(Vec::new());
                }
            }
        }
        let mut removed = Vec::new();
        for b in bases {
            if !used.contains(&key(&b)) {
                std::fs::remove_file(&b).map_err(|e| failed("removing", &b, &e))?;
                removed.push(b);
            }
        }
        Ok(removed)
    }

    /// The linked clones whose disks have `vm`'s as their base.
    pub fn linked_clones_of(&self, vm: &Vm) -> Result<Vec<String>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|c| c.linked_source().as_deref() == Some(vm.name()))
            .map(|c| c.name().to_string())
            .collect())
    }
}

impl Vm {
    /// The VM whose folder holds this linked clone's bases (its `linked-to`), if it is one.
    pub fn linked_source(&self) -> Option<String> {
        std::fs::read_to_string(self.dir().join(LINKED_TO))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }
}

/// Copy the disk `from` (with its whole backing chain) into `to`, a new standalone qcow2 image:
/// a full clone's disks, and the overlays `vm delete --keep-disks` keeps.
pub(crate) fn flatten(from: &Path, to: &Path) -> Result<()> {
    kvmbox_block::image::convert(from, to, kvmbox_block::Format::Qcow2, &mut |_, _| {}).map_err(
        |e| {
            Error::Failed(format!(
                "copying {} to {}: {e}",
                from.display(),
                to.display()
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::without_mac;

    #[test]
    fn clones_get_new_macs() {
        assert_eq!(without_mac("tap=t0,mac=02:00:00:00:00:01"), "tap=t0");
        assert_eq!(without_mac("tap=t0"), "tap=t0");
    }
}
