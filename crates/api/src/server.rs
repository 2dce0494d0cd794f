//! A small synchronous HTTP/1.1 server on a Unix socket: one thread accepts, one short-lived
//! thread serves each connection (requests on a connection in order, keep-alive). Requests
//! reach the VMM one at a time through a channel; the eventfd wakes the VMM's poll.

use crate::{parse_request, ApiError, ApiReply, ApiRequest, ApiResult, FaultKind};
use crate::{routes::MAX_BODY, types::ErrorBody};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 8192;
/// Connections served at once; more are closed right after accept.
const MAX_CONNECTIONS: usize = 16;
/// How long the end of the VMM waits for answers still being written (see `ApiServer`'s drop).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// A decoded request waiting for the VMM's answer.
pub struct PendingRequest {
    /// What is asked.
    pub request: ApiRequest,
    reply: Sender<ApiResult>,
}

impl PendingRequest {
    /// Send the answer back to the HTTP connection.
    pub fn respond(self, result: ApiResult) {
        // The client may have gone away: nobody to tell.
        let _ = self.reply.send(result);
    }
}

/// The VMM's end of the API server.
pub struct ApiServer {
    requests: Receiver<PendingRequest>,
    event: Arc<EventFd>,
    path: PathBuf,
    unwritten: Arc<Unwritten>,
}

struct Shared {
    requests: Sender<PendingRequest>,
    event: Arc<EventFd>,
    connections: AtomicUsize,
    unwritten: Arc<Unwritten>,
}

/// Requests handed to the VMM whose HTTP answer is not written yet. A request the VMM carries
/// out can end the VM (a power button or an action whose guest then exits at once): its
/// client still gets the answer, as the end of the VMM waits for this to fall to zero.
#[derive(Default)]
struct Unwritten {
    count: Mutex<usize>,
    written: Condvar,
}

impl Unwritten {
    fn add(&self, n: isize) {
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *c = c.saturating_add_signed(n);
        if *c == 0 {
            self.written.notify_all();
        }
    }

    /// Wait until every answer is written, or `grace` has passed.
    fn wait(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut c = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *c > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            c = match self.written.wait_timeout(c, left) {
                Ok((c, _)) => c,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl ApiServer {
    /// Listen on the Unix socket `path` (which must not exist) and serve it from a thread.
    pub fn start(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("API socket {}: {e}", path.display()))
        })?;
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (tx, requests) = channel();
        let unwritten = Arc::new(Unwritten::default());
        let shared = Arc::new(Shared {
            requests: tx,
            event: event.clone(),
            connections: AtomicUsize::new(0),
            unwritten: unwritten.clone(),
        });
        std::thread::Builder::new()
            .name("api".into())
            .stack_size(256 << 10)
            .spawn(move || {
                kvmbox_seccomp::apply_or_exit(kvmbox_seccomp::ThreadKind::Api);
                accept_loop(listener, shared)
            })?;
        Ok(Self {
            requests,
            event,
            path: path.to_path_buf(),
            unwritten,
        })
    }

    /// Becomes readable when a request waits.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// The next waiting request, if any.
    pub fn try_next(&self) -> Option<PendingRequest> {
        let _ = self.event.read();
        self.requests.try_recv().ok()
    }
}

impl Drop for ApiServer {
    /// The VMM is done: requests still queued are answered "the VMM has stopped" (their
    /// channel closes here), and answers the VMM gave are written before it goes on to end
    /// the process (at most `ANSWER_GRACE`).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        drop(std::mem::replace(&mut self.requests, channel().1));
        self.unwritten.wait(ANSWER_GRACE);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                kvmbox_seccomp::apply_or_exit(kvmbox_seccomp::ThreadKind::ApiConnection);
                serve_connection(stream, &s);
                s.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One parsed HTTP request.
struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    close: bool,
}

/// Why a connection's request could not be read.
enum ReadError {
    /// The peer closed or the socket failed: nothing to answer.
    Closed,
    /// Answer 400 with this message, then close.
    Bad(String),
}

fn serve_connection(mut stream: UnixStream, shared: &Shared) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let req = match read_request(&mut stream, &mut buf) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad(msg)) => {
                let _ = write_response(&mut stream, Err(ApiError::bad_request(msg)), true);
                return;
            }
        };
        let written = match parse_request(&req.method, &req.path, &req.body) {
            Ok(request) => {
                shared.unwritten.add(1);
                let result = ask_vmm(shared, request);
                let written = write_response(&mut stream, result, req.close);
                shared.unwritten.add(-1);
                written
            }
            Err(e) => write_response(&mut stream, Err(e), req.close),
        };
        if written.is_err() || req.close {
            return;
        }
    }
}

fn ask_vmm(shared: &Shared, request: ApiRequest) -> ApiResult {
    let (reply, answer) = channel();
    shared
        .requests
        .send(PendingRequest { request, reply })
        .map_err(|_| ApiError::internal("the VMM has stopped"))?;
    let _ = shared.event.write(1);
    answer
        .recv()
        .unwrap_or_else(|_| Err(ApiError::internal("the VMM has stopped")))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn read_request(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<HttpRequest, ReadError> {
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(end) = find_head_end(buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Bad(format!(
                "request head is larger than {MAX_HEAD} bytes"
            )));
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ReadError::Bad("incomplete request head".into()))
        }
        Err(e) => return Err(ReadError::Bad(format!("malformed HTTP request: {e}"))),
    }
    let method = parsed.method.unwrap_or_default().to_string();
    let target = parsed.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    let mut close = parsed.version == Some(0);
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| ReadError::Bad(format!("invalid Content-Length '{value}'")))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Bad(
                "Transfer-Encoding is not supported: send a Content-Length".into(),
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if content_length > MAX_BODY {
        return Err(ReadError::Bad(format!(
            "request body of {content_length} bytes is larger than the limit of {MAX_BODY} bytes"
        )));
    }
    buf.drain(..head_len);
    while buf.len() < content_length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Vec<u8> = buf.drain(..content_length).collect();
    Ok(HttpRequest {
        method,
        path,
        body,
        close,
    })
}

fn write_response(stream: &mut UnixStream, result: ApiResult, close: bool) -> std::io::Result<()> {
    let (status, body) = match result {
        Ok(ApiReply::Empty) => ("204 No Content", String::new()),
        Ok(ApiReply::Json(v)) => ("200 OK", v.to_string()),
        Err(e) => (
            match e.kind {
                FaultKind::BadRequest => "400 Bad Request",
                FaultKind::Internal => "500 Internal Server Error",
            },
            serde_json::to_string(&ErrorBody {
                fault_message: e.message,
            })
            .unwrap_or_default(),
        ),
    };
    let mut out = format!("HTTP/1.1 {status}\r\nServer: kvmbox\r\n");
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    stream.write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(path: &Path, raw: &[u8]) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(raw).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn requests_reach_the_vmm_and_answers_come_back() {
        let path = std::env::temp_dir().join(format!("kvmbox-api-test-{}", std::process::id()));
        let server = ApiServer::start(&path).unwrap();
        let vmm = std::thread::spawn(move || {
            let mut served = 0;
            while served < 1 {
                if let Some(p) = server.try_next() {
                    assert_eq!(p.request, ApiRequest::DescribeInstance);
                    p.respond(Ok(ApiReply::Json(serde_json::json!({"state": "Running"}))));
                    served += 1;
                } else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            server
        });
        let ok = exchange(&path, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with(r#"{"state":"Running"}"#), "{ok}");
        let big = format!(
            "PUT /logger HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let too_big = exchange(&path, big.as_bytes());
        assert!(too_big.starts_with("HTTP/1.1 400"), "{too_big}");
        assert!(too_big.contains("larger than the limit"), "{too_big}");
        let garbage = exchange(&path, b"\x01\x02 nonsense\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        drop(vmm.join().unwrap());
        assert!(!path.exists(), "the socket is removed with the server");
    }

    /// A request the VMM answers and then ends on (a power button whose guest exits at once):
    /// by the time the server is dropped, which the VMM does before the process exits, the
    /// answer is in the client's socket; a request still queued is answered 500.
    #[test]
    fn answers_are_written_before_the_server_is_gone() {
        let path = std::env::temp_dir().join(format!("kvmbox-api-test-end-{}", std::process::id()));
        let server = ApiServer::start(&path).unwrap();
        let send = |raw: &[u8]| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(raw).unwrap();
            s
        };
        let body = r#"{"action_type": "PowerButton"}"#;
        let put = format!(
            "PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut answered = send(put.as_bytes());
        let start = Instant::now();
        let p = loop {
            match server.try_next() {
                Some(p) => break p,
                None if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                None => panic!("the request never reached the VMM"),
            }
        };
        let mut queued = send(b"GET / HTTP/1.1\r\n\r\n");
        // The second request reaches the VMM's queue (and is never taken).
        let start = Instant::now();
        while *shared_count(&server) < 2 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(2));
        }
        p.respond(Ok(ApiReply::Empty));
        drop(server);
        // Written already: a non-blocking read finds the whole answer.
        answered.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        let n = answered.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 204 No Content"), "{text:?}");
        queued.set_nonblocking(true).unwrap();
        let n = queued.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 500"), "{text:?}");
        assert!(text.contains("the VMM has stopped"), "{text:?}");
    }

    fn shared_count(server: &ApiServer) -> std::sync::MutexGuard<'_, usize> {
        server.unwritten.count.lock().unwrap()
    }
}
