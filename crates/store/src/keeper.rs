//! The keeper: the detached process `kvmbox vm start` leaves behind for a running VM. It holds
//! `run/NAME/keeper.lock` for its whole life (so "is it running" is a lock probe), starts the VM
//! process (`kvmbox run` with the VM's settings, or its saved state, and the API socket) with
//! its console on a pipe, appends everything the VM process prints to `console.log`, serves the
//! console socket ([`crate::console`]), and when the VM process ends records how
//! (`last-run.json`) and removes the runtime folder. The VM process gets `SIGKILL` if the
//! keeper dies (`PR_SET_PDEATHSIG`), so no VM outlives its keeper unseen.

use crate::console::{read_line, BUSY, HELLO, HELLO_FORCE, OK, TAKEN_OVER};
use crate::{io_err, now_secs, Error, LastRun, Result, Vm};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The attached console client, with a number that tells one attachment from the next.
type Client = Arc<Mutex<Option<(u64, UnixStream)>>>;

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCK_PATH: usize = 107;

/// Check that the VM's sockets fit in a Unix socket address.
pub fn check_socket_paths(vm: &Vm) -> Result<()> {
    for p in [vm.api_sock(), vm.console_sock()] {
        if p.as_os_str().len() > MAX_SOCK_PATH {
            return Err(Error::Usage(format!(
                "the socket path {} is longer than {MAX_SOCK_PATH} bytes: use a shorter KVMBOX_HOME",
                p.display()
            )));
        }
    }
    Ok(())
}

fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Write `text` to `path` through a temporary file and a rename, so a reader sees all or none.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| io_err(format_args!("writing {}", path.display()), e))
}

/// Run the keeper of `vm` until its VM process ends. `exe` is the kvmbox binary; with
/// `restore` the VM process resumes the saved state instead of booting (and leaves it paused
/// with `paused`); with `jail` it runs through `kvmbox jail` (see [`crate::jail`]).
pub fn keep(vm: &Vm, exe: &Path, restore: bool, paused: bool, jail: bool) -> Result<()> {
    let run_dir = vm.run_dir();
    std::fs::create_dir_all(run_dir)
        .map_err(|e| io_err(format_args!("creating {}", run_dir.display()), e))?;
    let lock_path = vm.keeper_lock_path();
    let lock = crate::lock::lock_wait(&lock_path)?;
    write_atomic(
        &run_dir.join("keeper.pid"),
        &format!("{}\n", std::process::id()),
    )?;
    let sock = vm.console_sock();
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| io_err(format_args!("binding {}", sock.display()), e))?;
    let log_path = vm.console_log();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_err(format_args!("opening {}", log_path.display()), e))?;

    let (mut output, out_w) = pipe().map_err(|e| io_err("creating the console pipe", e))?;
    let err_w = out_w
        .try_clone()
        .map_err(|e| io_err("creating the console pipe", e))?;
    let api = vm.api_sock();
    let _ = std::fs::remove_file(&api);
    let mut cmd = Command::new(exe);
    let (state, mem) = vm.saved_state();
    let jailed = if jail {
        // A refusal here leaves no runtime folder (the VM did not run).
        let gone = |e: Error| {
            let _ = std::fs::remove_dir_all(run_dir);
            e
        };
        let info = vm.allocate_jail().map_err(gone)?;
        if restore {
            vm.check_saved_disks(&state).map_err(gone)?;
            // Lent to the VM's user for the restore; given back when it ends.
            crate::jail::chown_all(&[&state, &mem], info.uid, info.gid).map_err(gone)?;
        }
        let share = vm.jail_share_dir();
        std::fs::create_dir_all(&share)
            .map_err(|e| io_err(format_args!("creating {}", share.display()), e))?;
        cmd.arg("jail")
            .arg("--id")
            .arg(&info.id)
            .arg("--uid")
            .arg(info.uid.to_string())
            .arg("--gid")
            .arg(info.gid.to_string())
            .arg("--chroot-base")
            .arg(vm.jail_base())
            .arg("--share")
            .arg(&share)
            .arg("--pid-file")
            .arg(vm.vm_pid_path())
            .arg("--")
            // Paths are absolute; "/" is the working directory the jail makes.
            .current_dir("/");
        Some(info)
    } else {
        cmd.arg("run");
        None
    };
    if restore {
        cmd.arg("--restore")
            .arg(&state)
            .arg("--restore-mem")
            .arg(&mem);
        if paused {
            cmd.arg("--restore-paused");
        }
        // The settings' resource limits hold for the resumed VM too.
        cmd.args(vm.config()?.limits.to_flags());
    } else {
        cmd.arg("--config").arg(vm.settings_path());
    }
    cmd.arg("--api-sock")
        .arg(&api)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    // A jailed VM's TAP devices: attached here (root) and inherited by the VM process.
    let taps = if jailed.is_some() {
        vm.attach_taps().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(run_dir);
        })?
    } else {
        Vec::new()
    };
    let tap_fds: Vec<RawFd> = taps.iter().map(|(_, f)| f.as_raw_fd()).collect();
    if !taps.is_empty() {
        let list: Vec<String> = taps
            .iter()
            .map(|(name, f)| format!("{name}={}", f.as_raw_fd()))
            .collect();
        cmd.env(kvmbox_virtio::net::TAP_FDS_ENV, list.join(","));
    }
    // SAFETY: the closure only calls prctl and fcntl, which are async-signal-safe, between
    // fork and exec, on descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The TAP descriptors are the only ones the VM process inherits beyond stdio.
            for &fd in &tap_fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // The VM process holds the TAPs now (a TAP made here goes when it ends).
    drop(taps);
    let mut child = spawned.map_err(|e| io_err(format_args!("starting {}", exe.display()), e))?;
    // The pipe's write ends live on only in the VM process (and its children).
    drop(cmd);
    if jailed.is_none() {
        write_atomic(&vm.vm_pid_path(), &format!("{}\n", child.id()))?;
    }

    let client: Client = Arc::new(Mutex::new(None));
    let stdin = Arc::new(Mutex::new(child.stdin.take()));
    let out_client = client.clone();
    let mut log_w = log;
    let relay = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match output.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let _ = log_w.write_all(&buf[..n]);
            let mut c = out_client.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, s)) = c.as_mut() {
                if s.write_all(&buf[..n]).is_err() {
                    *c = None;
                }
            }
        }
    });
    let accept_client = client.clone();
    std::thread::spawn(move || serve_console(listener, accept_client, stdin));

    let status = child
        .wait()
        .map_err(|e| io_err("waiting for the VM process", e))?;
    let _ = relay.join();
    if jailed.is_some() && restore {
        // SAFETY: geteuid/getegid have no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let _ = crate::jail::chown_all(&[&state, &mem], uid, gid);
    }
    // `kvmbox jail` exits 128+N when signal N ended the VM process, as a shell does.
    let (exit_status, signal) = match (status.code(), &jailed) {
        (Some(c @ 129..=192), Some(_)) => (None, Some(c - 128)),
        (c, _) => (c, status.signal()),
    };
    let last = LastRun {
        ended_at: now_secs(),
        exit_status,
        signal,
    };
    let text = serde_json::to_string(&last).unwrap_or_default();
    let recorded = write_atomic(&vm.last_run_path(), &text);
    if let Some((_, s)) = client.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    // The runtime folder goes while the lock is still held; the lock goes with the process.
    let removed = std::fs::remove_dir_all(run_dir)
        .map_err(|e| io_err(format_args!("removing {}", run_dir.display()), e));
    drop(lock);
    recorded.and(removed)
}

/// Accept console clients: one at a time; [`HELLO_FORCE`] takes over.
fn serve_console(listener: UnixListener, client: Client, stdin: Arc<Mutex<Option<ChildStdin>>>) {
    let mut generation = 0u64;
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let _ = s.set_read_timeout(Some(crate::console::HELLO_TIMEOUT));
        let hello = read_line(&mut s).unwrap_or_default();
        let force = match hello.as_slice() {
            h if h == HELLO => false,
            h if h == HELLO_FORCE => true,
            _ => continue,
        };
        let _ = s.set_read_timeout(None);
        let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_some() && !force {
            let _ = s.write_all(BUSY);
            continue;
        }
        if let Some((_, mut old)) = c.take() {
            let _ = old.write_all(TAKEN_OVER.as_bytes());
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        if s.write_all(OK).is_err() {
            continue;
        }
        let Ok(mut input) = s.try_clone() else {
            continue;
        };
        generation += 1;
        let id = generation;
        *c = Some((id, s));
        drop(c);
        let client = client.clone();
        let stdin = stdin.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut w = stdin.lock().unwrap_or_else(|e| e.into_inner());
                if w.as_mut().is_none_or(|w| w.write_all(&buf[..n]).is_err()) {
                    break;
                }
            }
            // Detached (or cut off): free the console unless another client has it now.
            let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
            if c.as_ref().is_some_and(|(g, _)| *g == id) {
                *c = None;
            }
        });
    }
}
