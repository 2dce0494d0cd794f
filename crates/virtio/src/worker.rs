//! One thread per active device: waits on its queue eventfds and backend descriptors.

use kvmbox_seccomp::ThreadKind;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{os, Result};

const KILL_TOKEN: u64 = u64::MAX;

/// What a device's worker does when one of its descriptors is ready.
pub(crate) trait EventHandler: Send + 'static {
    /// `token` fired. Return false to end the worker (the device is broken).
    fn handle(&mut self, token: u64, epoll: &Epoll) -> bool;

    /// The worker is about to end (stopped, or `handle` returned false): finish whatever is
    /// still in flight, so the device is still when the worker has ended.
    fn finish(&mut self) {}
}

/// A running device worker; stopping or dropping it joins the thread.
pub(crate) struct Worker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

/// Add `fd` to `epoll` for input with `token`.
pub(crate) fn watch(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// Watch `fd` (already added with `token`) for exactly `events`.
pub(crate) fn set_events(
    epoll: &Epoll,
    fd: RawFd,
    token: u64,
    events: EventSet,
) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
}

/// Stop watching `fd` altogether (an error or hang-up would still be reported otherwise).
pub(crate) fn unwatch(epoll: &Epoll, fd: RawFd) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
}

impl Worker {
    /// Start the thread of `kind` (named after it, under its seccomp filter) watching `fds`
    /// (descriptor, token) and calling `handler`.
    pub(crate) fn spawn<H: EventHandler>(
        kind: ThreadKind,
        fds: &[(RawFd, u64)],
        mut handler: H,
    ) -> Result<Self> {
        let epoll = Epoll::new().map_err(os("epoll_create"))?;
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?;
        watch(&epoll, kill.as_raw_fd(), KILL_TOKEN).map_err(os("epoll_ctl"))?;
        for &(fd, token) in fds {
            watch(&epoll, fd, token).map_err(os("epoll_ctl"))?;
        }
        let handle = std::thread::Builder::new()
            .name(kind.name().to_string())
            .spawn(move || {
                kvmbox_seccomp::apply_or_exit(kind);
                let mut events = vec![EpollEvent::default(); 16];
                'serve: loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    for ev in &events[..n] {
                        if ev.data() == KILL_TOKEN || !handler.handle(ev.data(), &epoll) {
                            break 'serve;
                        }
                    }
                }
                handler.finish();
            })
            .map_err(os("spawning device worker"))?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }

    /// Stop the thread and wait for it.
    pub(crate) fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            // If the write fails the thread may linger; joining would then hang, so don't.
            if self.kill.write(1).is_ok() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read (and so clear) an eventfd that fired; a spurious wakeup is harmless.
pub(crate) fn drain(evt: &EventFd) {
    let _ = evt.read();
}
