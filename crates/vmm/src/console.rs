//! The serial console on the user's terminal: raw mode while the VM runs, input forwarded
//! to the guest's UART, and QEMU's escape `Ctrl-A x` to quit (`Ctrl-A Ctrl-A` sends one Ctrl-A).

use kvmbox_devices::legacy::serial::SerialPort;
use kvmbox_devices::{ExitRequest, VmControl};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CTRL_A: u8 = 0x01;

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawTerminal {
    restore: TerminalRestore,
}

/// A terminal's settings from before raw mode, to put back.
#[derive(Clone, Copy)]
pub struct TerminalRestore {
    fd: libc::c_int,
    saved: libc::termios,
}

impl TerminalRestore {
    /// Put the saved settings back.
    pub fn restore(&self) {
        // SAFETY: restores attributes read from this fd by tcgetattr in `RawTerminal::enable`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; `None` otherwise.
    pub fn enable(fd: libc::c_int) -> Option<Self> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so host-side messages still start at column 0.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self {
            restore: TerminalRestore { fd, saved },
        })
    }

    /// What puts the terminal back, for a path that cannot wait for the drop.
    pub fn restorer(&self) -> TerminalRestore {
        self.restore
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore.restore();
    }
}

/// Decodes the escape sequence in what the user types.
#[derive(Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

/// What one chunk of input means.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the guest.
    Data(Vec<u8>),
    /// The user asked to quit (`Ctrl-A x`); bytes before it still go to the guest.
    Quit(Vec<u8>),
}

impl EscapeFilter {
    /// Filter one chunk of keyboard input.
    pub fn filter(&mut self, bytes: &[u8]) -> Input {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => return Input::Quit(out),
                    CTRL_A => out.push(CTRL_A),
                    // Unknown escapes are swallowed, as in QEMU.
                    _ => {}
                }
            } else if b == CTRL_A {
                self.pending_escape = true;
            } else {
                out.push(b);
            }
        }
        Input::Data(out)
    }
}

/// Forward stdin to the UART in `serial` (swapped on every boot) until EOF or `Ctrl-A x`. Runs on its own thread; it is not
/// joined (a blocking read of stdin cannot be interrupted portably), so it holds only
/// shared handles. Stdin from /dev/null (scripts, benchmarks) has nothing to forward: no
/// thread then.
pub fn spawn_stdin_forwarder(
    serial: Arc<Mutex<Option<Arc<Mutex<SerialPort>>>>>,
    control: Arc<VmControl>,
) {
    if stdin_is_dev_null() {
        return;
    }
    let spawn = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            kvmbox_seccomp::apply_or_exit(kvmbox_seccomp::ThreadKind::Console);
            let mut stdin = std::io::stdin().lock();
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let (data, quit) = match filter.filter(&buf[..n]) {
                    Input::Data(d) => (d, false),
                    Input::Quit(d) => (d, true),
                };
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let target = serial.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let taken = match target {
                        Some(port) => port
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .enqueue_input(rest),
                        // Between boots (reset with --on-reboot restart): wait for the new UART.
                        None => 0,
                    };
                    rest = &rest[taken..];
                    if taken == 0 {
                        if control.pending().is_some() {
                            return;
                        }
                        // The guest has not drained its receive FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                if quit {
                    control.request(ExitRequest::UserQuit);
                    return;
                }
            }
        });
    if let Err(e) = spawn {
        eprintln!("kvmbox: warning: no console input: {e}");
    }
}

/// Whether stdin is the null device (character device 1:3), which only ever reads EOF.
fn stdin_is_dev_null() -> bool {
    // SAFETY: stat is plain data; fstat fills it and the result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on fd 0 with a valid out-param.
    if unsafe { libc::fstat(libc::STDIN_FILENO, &mut st) } != 0 {
        return false;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ls\n"), Input::Data(b"ls\n".to_vec()));
        assert_eq!(f.filter(b"a\x01\x01b"), Input::Data(b"a\x01b".to_vec()));
        assert_eq!(f.filter(b"q\x01"), Input::Data(b"q".to_vec()));
        assert_eq!(
            f.filter(b"x"),
            Input::Quit(vec![]),
            "escape split across reads"
        );
        assert_eq!(f.filter(b"\x01zy"), Input::Data(b"y".to_vec()));
    }
}
