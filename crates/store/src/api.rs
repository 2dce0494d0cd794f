//! A client of the control API (`kvmbox run --api-sock`): one HTTP/1.1 exchange per
//! connection on the VM's Unix socket, as any Firecracker client does.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest an answer may take. The control loop answers between two polls; a snapshot of a
/// large guest writes its memory before it answers (a 512 MiB guest: seconds).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest a state query waits: the control loop answers between two requests, so only a
/// request that takes long itself (a snapshot being written) delays it.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// One request: the status code and the body (JSON text or empty).
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    request_within(sock, method, path, body, ANSWER_TIMEOUT)
}

fn request_within(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let raw = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    };
    s.write_all(raw.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// The `state` of `GET /`: "Not started", "Running" or "Paused" (waiting at most
/// [`STATE_TIMEOUT`]).
pub fn instance_state(sock: &Path) -> std::io::Result<String> {
    let (status, body) = request_within(sock, "GET", "/", None, STATE_TIMEOUT)?;
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if status != 200 {
        return Err(std::io::Error::other(format!("GET / answered {status}")));
    }
    Ok(v["state"].as_str().unwrap_or_default().to_string())
}

/// A request that must succeed (2xx); a refusal becomes [`Error::State`] with the API's
/// `fault_message`, other failures [`Error::Failed`].
pub fn call(vm: &str, sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    let (status, answer) = request(sock, method, path, body).map_err(|e| {
        Error::Failed(format!(
            "VM '{vm}': its API at {} did not answer: {e}",
            sock.display()
        ))
    })?;
    if (200..300).contains(&status) {
        return Ok(answer);
    }
    let msg = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or(answer);
    if status == 400 {
        Err(Error::State(format!(
            "VM '{vm}': {method} {path} refused: {msg}"
        )))
    } else {
        Err(Error::Failed(format!(
            "VM '{vm}': {method} {path} failed ({status}): {msg}"
        )))
    }
}
