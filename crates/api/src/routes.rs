//! From method, path and body to an [`ApiRequest`].

use crate::{ApiError, ApiRequest, InstanceActionInfo, VmPatch};
use serde::de::DeserializeOwned;

/// Largest request body accepted, in bytes (Firecracker's default payload limit).
pub const MAX_BODY: usize = 51_200;

fn body<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{what}: the request needs a JSON body"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("{what}: invalid JSON body: {e}")))
}

/// The `{id}` of `/prefix/{id}`, which must be a non-empty single path segment.
fn id_in<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let id = path.strip_prefix(prefix)?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

fn same_id(what: &str, path_id: &str, body_id: &str) -> Result<(), ApiError> {
    if path_id != body_id {
        return Err(ApiError::bad_request(format!(
            "{what}: the id in the path ('{path_id}') does not match the id in the body ('{body_id}')"
        )));
    }
    Ok(())
}

/// Decode one request. `path` is the request target without a query string.
pub fn parse_request(method: &str, path: &str, b: &[u8]) -> Result<ApiRequest, ApiError> {
    use ApiRequest as R;
    let path = path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    Ok(match (method, path) {
        ("GET", "/") => R::DescribeInstance,
        ("GET", "/version") => R::GetVersion,
        ("GET", "/vm/config") => R::GetVmConfig,
        ("PUT", "/boot-source") => R::PutBootSource(body("PUT /boot-source", b)?),
        ("GET", "/machine-config") => R::GetMachineConfig,
        ("PUT", "/machine-config") => {
            let m: crate::MachineConfig = body("PUT /machine-config", b)?;
            for (field, missing) in [
                ("vcpu_count", m.vcpu_count.is_none()),
                ("mem_size_mib", m.mem_size_mib.is_none()),
            ] {
                if missing {
                    return Err(ApiError::bad_request(format!(
                        "PUT /machine-config: missing field `{field}`"
                    )));
                }
            }
            R::PutMachineConfig(m)
        }
        ("PATCH", "/machine-config") => R::PatchMachineConfig(body("PATCH /machine-config", b)?),
        ("PUT", "/actions") => {
            let a: InstanceActionInfo = body("PUT /actions", b)?;
            R::Action(a.action_type)
        }
        ("PATCH", "/vm") => {
            let v: VmPatch = body("PATCH /vm", b)?;
            R::PatchVm(v.state)
        }
        ("PUT", "/entropy") => R::PutEntropy(body("PUT /entropy", b)?),
        ("PUT", "/vsock") => R::PutVsock(body("PUT /vsock", b)?),
        ("PUT", "/snapshot/create") => R::CreateSnapshot(body("PUT /snapshot/create", b)?),
        ("PUT", "/snapshot/load") => R::LoadSnapshot(body("PUT /snapshot/load", b)?),
        ("PUT", "/snapshot/delete") => R::DeleteSnapshot(body("PUT /snapshot/delete", b)?),
        ("PUT", "/logger") => R::PutLogger(body("PUT /logger", b)?),
        ("PUT", "/metrics") => R::PutMetrics(body("PUT /metrics", b)?),
        (m @ ("PUT" | "PATCH"), p) if id_in(p, "/drives/").is_some() => {
            let id = id_in(p, "/drives/").unwrap_or_default();
            if m == "PUT" {
                let d: crate::Drive = body("PUT /drives", b)?;
                same_id("PUT /drives", id, &d.drive_id)?;
                R::PutDrive(d)
            } else {
                let d: crate::PartialDrive = body("PATCH /drives", b)?;
                same_id("PATCH /drives", id, &d.drive_id)?;
                R::PatchDrive(d)
            }
        }
        (m @ ("PUT" | "PATCH"), p) if id_in(p, "/network-interfaces/").is_some() => {
            let id = id_in(p, "/network-interfaces/").unwrap_or_default();
            if m == "PUT" {
                let n: crate::NetworkInterface = body("PUT /network-interfaces", b)?;
                same_id("PUT /network-interfaces", id, &n.iface_id)?;
                R::PutNetworkInterface(n)
            } else {
                let n: crate::PartialNetworkInterface = body("PATCH /network-interfaces", b)?;
                same_id("PATCH /network-interfaces", id, &n.iface_id)?;
                R::PatchNetworkInterface(n)
            }
        }
        (m, p) => {
            return Err(ApiError::bad_request(format!(
                "invalid request method and/or path: {m} {p}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ActionType, VmStateRequest};

    #[test]
    fn routes_and_bodies() {
        assert_eq!(
            parse_request("GET", "/", b"").unwrap(),
            ApiRequest::DescribeInstance
        );
        assert_eq!(
            parse_request("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#).unwrap(),
            ApiRequest::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            parse_request("PATCH", "/vm", br#"{"state":"Paused"}"#).unwrap(),
            ApiRequest::PatchVm(VmStateRequest::Paused)
        );
        let d = parse_request(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap();
        assert!(matches!(d, ApiRequest::PutDrive(ref d) if d.drive_id == "rootfs"));
        assert_eq!(
            parse_request("PUT", "/snapshot/delete", br#"{"disk_snapshot":"vm-a"}"#).unwrap(),
            ApiRequest::DeleteSnapshot(crate::SnapshotDelete {
                disk_snapshot: "vm-a".into()
            })
        );
        assert_eq!(
            parse_request(
                "PUT",
                "/vsock",
                br#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#
            )
            .unwrap(),
            ApiRequest::PutVsock(crate::Vsock {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
                vsock_id: None,
            })
        );
        assert!(parse_request("PUT", "/vsock", br#"{"guest_cid":3}"#)
            .unwrap_err()
            .message
            .contains("missing field `uds_path`"));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let msg = |m: &str, p: &str, b: &[u8]| parse_request(m, p, b).unwrap_err().message;
        assert!(msg("PUT", "/boot-source", b"{").contains("invalid JSON"));
        assert!(msg(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path":"/k","bogus":1}"#
        )
        .contains("unknown field `bogus`"));
        assert!(msg(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":"two","mem_size_mib":128}"#
        )
        .contains("invalid type"));
        assert!(msg("PUT", "/machine-config", br#"{"vcpu_count":2}"#).contains("mem_size_mib"));
        assert!(msg(
            "PUT",
            "/drives/a",
            br#"{"drive_id":"b","is_root_device":false}"#
        )
        .contains("does not match"));
        assert!(msg("PUT", "/actions", br#"{"action_type":"Explode"}"#).contains("Explode"));
        assert!(msg("DELETE", "/vm", b"").contains("DELETE /vm"));
        assert!(msg("PUT", "/drives/", b"{}").contains("invalid request"));
        assert!(msg("PUT", "/logger", b"").contains("needs a JSON body"));
        assert!(msg("PUT", "/snapshot/delete", b"{}").contains("disk_snapshot"));
    }
}
