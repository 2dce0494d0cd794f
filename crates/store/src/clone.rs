//! Clones: a new VM with the source's settings, new MAC addresses (a `mac=` is dropped, so the
//! clone's interfaces get random ones) and no saved state. A full clone copies every disk
//! (flattened into a standalone qcow2 image in the new folder). A linked clone shares them: each
//! of the source's qcow2 disks (which must be in its folder) is frozen into a read-only base
//! `diskN.base-K.qcow2` beside it, and the source and the clone each get a new qcow2 overlay
//! on that base (the source's keeps the disk's name, so its settings do not change). The clone
//! records its source in `linked-to`; the source cannot be deleted while such a clone exists.

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

/// Freeze the source's disk `from` into a read-only base beside it, put a new overlay on the base
/// at `from` for the source, and create `to` as the clone's overlay on the same base.
fn link_disk(src: &Vm, from: &Path, to: &Path) -> Result<()> {
    let usage = |why: String| {
        Error::Usage(format!(
            "cannot make a linked clone of '{}': {why}; a full clone (without --linked) copies it",
            src.name()
        ))
    };
    if from.parent() != Some(src.dir()) {
        return Err(usage(format!(
            "disk {} is not in the VM's folder",
            from.display()
        )));
    }
    let layers = kvmbox_block::image::info(from)
        .map_err(|e| Error::Failed(format!("reading {}: {e}", from.display())))?;
    if layers.first().map(|l| l.format.as_str()) != Some("qcow2") {
        return Err(usage(format!(
            "disk {} is not a qcow2 image",
            from.display()
        )));
    }
    let stem = from
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = (1..)
        .map(|k| src.dir().join(format!("{stem}.base-{k}.qcow2")))
        .find(|p| !p.exists())
        .unwrap_or_default();
    let base_name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let failed = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        Error::Failed(format!("{what} {}: {e}", p.display()))
    };
    std::fs::rename(from, &base).map_err(|e| failed("freezing", from, &e))?;
    if let Err(e) =
        kvmbox_block::image::create(from, 0, kvmbox_block::Format::Qcow2, Some(&base_name))
    {
        // Put the source's disk back as it was.
        let _ = std::fs::remove_file(from);
        let _ = std::fs::rename(&base, from);
        return Err(failed("creating the overlay", from, &e));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| failed("making read-only", &base, &e))?;
    kvmbox_block::image::create(
        to,
        0,
        kvmbox_block::Format::Qcow2,
        Some(&base.display().to_string()),
    )
    .map_err(|e| failed("creating the overlay", to, &e))
}

/// Write the clone's settings and disks into `dir` (new, empty).
fn build(src: &Vm, dir: &Path, linked: bool) -> Result<()> {
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
    let strings = |v: Option<&toml::Value>| -> Vec<String> {
        v.and_then(|v| v.clone().try_into::<Vec<String>>().ok())
            .unwrap_or_default()
    };
    let mut disks = Vec::new();
    for (i, spec) in strings(table.get("disks")).iter().enumerate() {
        let parsed =
            kvmbox_vmm::config::parse_disk_spec(spec).map_err(|e| Error::Usage(e.to_string()))?;
        let from = anchored(src, &parsed.path.display().to_string());
        let file = format!("disk{i}.qcow2");
        if linked {
            link_disk(src, &from, &dir.join(&file))?;
        } else {
            flatten(&from, &dir.join(&file))?;
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
    std::fs::write(
        &out,
        format!(
            "# kvmbox VM settings (a {kind} clone of '{}'): the format of `kvmbox run --config`.\n{body}",
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
    /// A clone of `src` (stopped; the caller holds its lock) named `name`: full, or `linked`.
    pub fn clone_vm(&self, src: &Vm, name: &str, linked: bool) -> Result<Vm> {
        self.create_with(name, |dir| build(src, dir, linked))
    }

    /// The linked clones whose disks have `vm`'s as their base.
    pub fn linked_clones_of(&self, vm: &Vm) -> Result<Vec<String>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(c.dir().join(LINKED_TO))
                    .is_ok_and(|t| t.trim() == vm.name())
            })
            .map(|c| c.name().to_string())
            .collect())
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
