//! kvmbox's control API: a REST API on a Unix socket, compatible with Firecracker's.
//!
//! This crate knows HTTP, the routes and their JSON bodies, and nothing of VMs. Its server
//! thread turns each request into an [`ApiRequest`], hands it to the VMM's control loop over a
//! channel (waking it through an eventfd), and waits for the typed [`ApiResult`], which it
//! turns into a status code and body: 204 for success without a body, 200 with JSON, 400 with
//! `{"fault_message": ...}` when the caller is at fault, 500 when the host is.

mod routes;
mod server;
pub mod types;

pub use routes::{parse_request, MAX_BODY};
pub use server::{ApiServer, PendingRequest};
pub use types::*;

/// One request for the VMM, decoded from HTTP.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`
    DescribeInstance,
    /// `GET /version`
    GetVersion,
    /// `GET /vm/config`
    GetVmConfig,
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `GET /machine-config`
    GetMachineConfig,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`
    PatchMachineConfig(MachineConfig),
    /// `PUT /drives/{id}`
    PutDrive(Drive),
    /// `PATCH /drives/{id}`
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /entropy`
    PutEntropy(Entropy),
    /// `PUT /vsock`
    PutVsock(Vsock),
    /// `PUT /actions`
    Action(ActionType),
    /// `PATCH /vm`
    PatchVm(VmStateRequest),
    /// `PUT /snapshot/create`
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load`
    LoadSnapshot(SnapshotLoad),
    /// `PUT /snapshot/delete` (kvmbox extension)
    DeleteSnapshot(SnapshotDelete),
    /// `PUT /logger`
    PutLogger(Logger),
    /// `PUT /metrics`
    PutMetrics(Metrics),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// 204 No Content.
    Empty,
    /// 200 with this JSON body.
    Json(serde_json::Value),
}

/// Whose fault a failed request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The request is wrong: bad body, wrong state, a file that cannot be used (400).
    BadRequest,
    /// The host failed (500).
    Internal,
}

/// A failed request: its kind picks the status code, its message becomes `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// 400 or 500.
    pub kind: FaultKind,
    /// One line naming the problem.
    pub message: String,
}

impl ApiError {
    /// The caller's fault (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            kind: FaultKind::BadRequest,
            message: message.into(),
        }
    }

    /// The host's fault (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: FaultKind::Internal,
            message: message.into(),
        }
    }
}

/// What the VMM answers to one [`ApiRequest`].
pub type ApiResult = Result<ApiReply, ApiError>;
