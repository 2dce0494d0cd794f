//! A VM's networks as `vm show` reports them (the `--net` specs of its settings, parsed by
//! `kvmbox run`'s parser), and the check `vm start` makes that a user-mode network's helper,
//! passt, can be run on this host.

use crate::{Error, Result, Vm};
use kvmbox_virtio::net::{NetBackendConfig, NetConfig, Proto};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One forwarded port of a user-mode network.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PortForward {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// The host address passt listens on.
    pub host_addr: String,
    /// The host port.
    pub host_port: u16,
    /// The guest port (on the guest's DHCP address, 10.0.2.15).
    pub guest_port: u16,
}

/// One network interface of a VM.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NetInfo {
    /// The spec as written in `vm.toml`.
    pub spec: String,
    /// `user` (NAT through passt) or `tap`.
    pub kind: &'static str,
    /// The TAP interface, for `tap`.
    pub tap: Option<String>,
    /// The fixed MAC, when the spec gives one (otherwise a random one at each start).
    pub mac: Option<String>,
    /// The forwarded ports, for `user`.
    pub forwards: Vec<PortForward>,
}

impl NetInfo {
    fn of(spec: &str, n: &NetConfig) -> Self {
        let (kind, tap, forwards) = match &n.backend {
            NetBackendConfig::Tap(t) => ("tap", Some(t.clone()), Vec::new()),
            NetBackendConfig::User(u) => (
                "user",
                None,
                u.hostfwd
                    .iter()
                    .map(|f| PortForward {
                        proto: match f.proto {
                            Proto::Tcp => "tcp",
                            Proto::Udp => "udp",
                        },
                        host_addr: f.host_addr.to_string(),
                        host_port: f.host_port,
                        guest_port: f.guest_port,
                    })
                    .collect(),
            ),
        };
        Self {
            spec: spec.to_string(),
            kind,
            tap,
            mac: n.mac.map(|m| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            forwards,
        }
    }

    /// One line for people: `user (NAT), tcp 127.0.0.1:2222 -> guest port 22` or `tap kb0`.
    pub fn describe(&self) -> String {
        let mut s = match &self.tap {
            Some(t) => format!("tap {t}"),
            None => "user (NAT through passt)".to_string(),
        };
        if let Some(m) = &self.mac {
            s.push_str(&format!(", mac {m}"));
        }
        for f in &self.forwards {
            s.push_str(&format!(
                ", {} {}:{} -> guest port {}",
                f.proto, f.host_addr, f.host_port, f.guest_port
            ));
        }
        s
    }
}

/// Where the passt binary is: `$KVMBOX_PASST` (as the VM process runs it) or `passt` on `$PATH`.
pub fn find_passt() -> std::result::Result<PathBuf, String> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(p) = std::env::var_os("KVMBOX_PASST").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        // A bare name is looked up on $PATH, as Command does.
        if p.components().count() > 1 {
            return if executable(&p) {
                Ok(p)
            } else {
                Err(format!(
                    "KVMBOX_PASST names {}, which is not an executable file",
                    p.display()
                ))
            };
        }
        return search_path(&p, executable);
    }
    search_path(Path::new("passt"), executable)
}

fn search_path(
    name: &Path,
    executable: impl Fn(&Path) -> bool,
) -> std::result::Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{} is not found on $PATH", name.display()))
}

impl Vm {
    /// The VM's network interfaces, from its settings (checked by `kvmbox run`'s parser).
    pub fn networks(&self) -> Result<Vec<NetInfo>> {
        let cfg = self.config()?;
        Ok(self
            .net_specs()
            .iter()
            .zip(&cfg.nets)
            .map(|(s, n)| NetInfo::of(s, n))
            .collect())
    }

    /// Refuse to start a VM with a user-mode network when passt cannot be run here, before
    /// anything starts, naming the ways out.
    pub fn check_net_helpers(&self) -> Result<()> {
        // Settings that do not load are the VM process's to report.
        let Ok(cfg) = self.config() else {
            return Ok(());
        };
        if !cfg.nets.iter().any(NetConfig::starts_a_helper) {
            return Ok(());
        }
        find_passt().map(drop).map_err(|why| {
            Error::Failed(format!(
                "VM '{}' has a user-mode network (NAT, the default of `kvmbox vm create`), which needs passt: {why}. Install Debian's package passt (scripts/setup.sh does), or take the network out: `kvmbox vm modify {} --net none`",
                self.name(),
                self.name()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_described_with_their_forwarded_ports() {
        let spec = "user,hostfwd=tcp::2222-:22,hostfwd=udp:0.0.0.0:5353-:53,mac=52:54:00:12:34:56";
        let n: NetConfig = spec.parse().unwrap();
        let i = NetInfo::of(spec, &n);
        assert_eq!(i.kind, "user");
        assert_eq!(i.mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(
            i.forwards,
            [
                PortForward {
                    proto: "tcp",
                    host_addr: "127.0.0.1".into(),
                    host_port: 2222,
                    guest_port: 22
                },
                PortForward {
                    proto: "udp",
                    host_addr: "0.0.0.0".into(),
                    host_port: 5353,
                    guest_port: 53
                }
            ]
        );
        assert_eq!(
            i.describe(),
            "user (NAT through passt), mac 52:54:00:12:34:56, tcp 127.0.0.1:2222 -> guest port 22, udp 0.0.0.0:5353 -> guest port 53"
        );
        let t = NetInfo::of("tap=kb0", &"tap=kb0".parse().unwrap());
        assert_eq!(
            (t.kind, t.tap.as_deref(), t.describe().as_str()),
            ("tap", Some("kb0"), "tap kb0")
        );
    }
}
