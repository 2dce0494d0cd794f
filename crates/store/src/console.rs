//! The console socket of a running VM (`run/NAME/console.sock`), served by its keeper: one
//! attached client at a time. A client sends one hello line, [`HELLO`] or [`HELLO_FORCE`]; the
//! keeper answers [`OK`] (then the stream carries the console both ways) or [`BUSY`] (another
//! client is attached; `HELLO_FORCE` takes over, and the previous client is told and cut off).
//!
//! The client side ([`attach`]) puts the terminal in raw mode and reads QEMU-style escapes:
//! `Ctrl-A d` detaches (the VM keeps running), `Ctrl-A Ctrl-A` sends one Ctrl-A to the guest.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Attach.
pub const HELLO: &[u8] = b"KVMBOX-CONSOLE attach\n";
/// Attach, taking over from an attached client.
pub const HELLO_FORCE: &[u8] = b"KVMBOX-CONSOLE attach force\n";
/// Attached.
pub const OK: &[u8] = b"ok\n";
/// Another client is attached.
pub const BUSY: &[u8] = b"busy\n";
/// What a client that was taken over from reads last.
pub const TAKEN_OVER: &str = "\r\n[kvmbox: another client took over this console]\r\n";
/// Longest the hello exchange may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

const CTRL_A: u8 = 0x01;

/// Read one `\n`-terminated line of at most 64 bytes.
pub fn read_line(s: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    Ok(line)
}

/// What the user's keys mean on an attached console.
#[derive(Default)]
pub struct ClientEscapes {
    pending: bool,
}

impl ClientEscapes {
    /// Bytes to send to the guest, and whether the user asked to detach (bytes before the
    /// escape still go). The VM process's own `Ctrl-A x` never reaches it from here: a lone
    /// Ctrl-A is held, `Ctrl-A Ctrl-A` is passed on as both bytes (which the VM process turns
    /// into one Ctrl-A), other escapes are swallowed.
    pub fn filter(&mut self, bytes: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.pending {
                self.pending = false;
                match b {
                    b'd' | b'D' => return (out, true),
                    CTRL_A => out.extend_from_slice(&[CTRL_A, CTRL_A]),
                    _ => {}
                }
            } else if b == CTRL_A {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Connect to the console at `sock` (of VM `vm`), taking over with `force`.
pub fn connect(vm: &str, sock: &Path, force: bool) -> Result<UnixStream> {
    let mut s = UnixStream::connect(sock).map_err(|e| {
        Error::State(format!(
            "VM '{vm}' has no console to attach to ({e}): is it running?"
        ))
    })?;
    let fail = |e: std::io::Error| Error::Failed(format!("VM '{vm}': console: {e}"));
    s.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(fail)?;
    s.write_all(if force { HELLO_FORCE } else { HELLO })
        .map_err(fail)?;
    let answer = read_line(&mut s).map_err(fail)?;
    s.set_read_timeout(None).map_err(fail)?;
    match answer.as_slice() {
        a if a == OK => Ok(s),
        a if a == BUSY => Err(Error::Busy(format!(
            "VM '{vm}': another client is attached to the console (kvmbox vm console --force {vm} takes it over)"
        ))),
        a => Err(Error::Failed(format!(
            "VM '{vm}': unexpected console answer {:?}",
            String::from_utf8_lossy(a)
        ))),
    }
}

/// Attached console: the guest's output to stdout, stdin (raw mode on a terminal) to the guest,
/// until `Ctrl-A d` (returns true) or the VM ends or another client takes over (false).
pub fn attach(stream: UnixStream) -> Result<bool> {
    let fail = |e: std::io::Error| Error::Failed(format!("console: {e}"));
    let raw = kvmbox_vmm::console::RawTerminal::enable(libc::STDIN_FILENO);
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let mut from_vm = stream.try_clone().map_err(fail)?;
    let done = tx.clone();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        let _ = done.send(false);
    });
    let mut to_vm = stream;
    // Not joined: a read of stdin cannot be interrupted; the process ends after `attach`.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut esc = ClientEscapes::default();
        let mut buf = [0u8; 256];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let (data, detach) = esc.filter(&buf[..n]);
            if to_vm.write_all(&data).is_err() {
                break;
            }
            if detach {
                let _ = tx.send(true);
                return;
            }
        }
        // End of input (a script's stdin): stay attached until the VM ends.
    });
    let detached = rx.recv().unwrap_or(false);
    drop(raw);
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut e = ClientEscapes::default();
        assert_eq!(e.filter(b"ls\n"), (b"ls\n".to_vec(), false));
        assert_eq!(e.filter(b"a\x01\x01b"), (b"a\x01\x01b".to_vec(), false));
        assert_eq!(
            e.filter(b"\x01x"),
            (vec![], false),
            "Ctrl-A x never reaches the VM"
        );
        assert_eq!(e.filter(b"q\x01"), (b"q".to_vec(), false));
        assert_eq!(
            e.filter(b"dzz"),
            (vec![], true),
            "escape split across reads"
        );
    }
}
