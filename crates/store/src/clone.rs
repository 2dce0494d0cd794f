//! Full clones: a new VM with the source's settings and a copy of every disk (each flattened
//! into a standalone qcow2 image in the new folder), new MAC addresses (a `mac=` is dropped, so
//! the clone's interfaces get random ones) and no saved state.

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

/// Write the clone's settings and disks into `dir` (new, empty).
fn build(src: &Vm, dir: &Path) -> Result<()> {
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
        kvmbox_block::image::convert(
            &from,
            &dir.join(&file),
            kvmbox_block::Format::Qcow2,
            &mut |_, _| {},
        )
        .map_err(|e| Error::Failed(format!("copying {}: {e}", from.display())))?;
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
    std::fs::write(
        &out,
        format!(
            "# kvmbox VM settings (a full clone of '{}'): the format of `kvmbox run --config`.\n{body}",
            src.name()
        ),
    )
    .map_err(|e| io_err(format_args!("writing {}", out.display()), e))?;
    let loaded = kvmbox_vmm::FileConfig::load(&out).map_err(|e| Error::Usage(e.to_string()))?;
    kvmbox_vmm::VmConfig::build(Some(loaded), kvmbox_vmm::Overrides::default())
        .map_err(|e| Error::Usage(e.to_string()))?;
    Ok(())
}

impl Store {
    /// A full clone of `src` (stopped; the caller holds its lock) named `name`.
    pub fn clone_vm(&self, src: &Vm, name: &str) -> Result<Vm> {
        self.create_with(name, |dir| build(src, dir))
    }
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
