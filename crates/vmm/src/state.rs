//! The VM's lifecycle: which state it is in and which transitions are allowed.

/// Where a VM is in its life. Displayed as Firecracker's `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Configured (or being configured through the API), not booted.
    NotStarted,
    /// Every vCPU may run guest code.
    Running,
    /// No vCPU runs guest code; devices keep their state.
    Paused,
    /// The VM has ended (the process exits right after).
    Stopped,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopped => "Stopped",
        })
    }
}

/// What someone asked the VM to do, for state checks and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Change the configuration (boot source, machine, devices, logger, metrics).
    Configure,
    /// Boot it.
    Start,
    /// Stop its vCPUs.
    Pause,
    /// Run its vCPUs again.
    Resume,
    /// Press a key or button the guest sees (Ctrl-Alt-Del, power button).
    GuestInput,
    /// Write a snapshot.
    Snapshot,
    /// Load a snapshot into this process.
    LoadSnapshot,
    /// Delete a disk snapshot (kvmbox's `PUT /snapshot/delete`).
    DeleteSnapshot,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Configure => "change the configuration",
            Action::Start => "start the VM",
            Action::Pause => "pause the VM",
            Action::Resume => "resume the VM",
            Action::GuestInput => "send input to the guest",
            Action::Snapshot => "create a snapshot",
            Action::LoadSnapshot => "load a snapshot",
            Action::DeleteSnapshot => "delete a disk snapshot",
        })
    }
}

/// An action the current state does not allow: the caller's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} while the VM is {}{}", state_words(*.state), hint(*.action, *.state))]
pub struct StateError {
    /// What was asked.
    pub action: Action,
    /// The state it was asked in.
    pub state: VmState,
}

fn state_words(s: VmState) -> &'static str {
    match s {
        VmState::NotStarted => "not started",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopped => "stopped",
    }
}

fn hint(action: Action, state: VmState) -> &'static str {
    match (action, state) {
        (Action::Snapshot | Action::DeleteSnapshot, VmState::Running) => {
            " (pause it first: PATCH /vm {\"state\": \"Paused\"})"
        }
        (Action::GuestInput, VmState::Paused) => " (resume it first)",
        (Action::Configure | Action::LoadSnapshot, _) => " (only before InstanceStart)",
        (Action::Pause | Action::Resume | Action::GuestInput, VmState::NotStarted) => {
            " (start it first: PUT /actions {\"action_type\": \"InstanceStart\"})"
        }
        _ => "",
    }
}

impl VmState {
    /// Whether `action` is allowed now; the state it leads to.
    pub fn check(self, action: Action) -> Result<VmState, StateError> {
        use Action as A;
        use VmState as S;
        let next = match (self, action) {
            (S::NotStarted, A::Configure) => S::NotStarted,
            (S::NotStarted, A::Start) => S::Running,
            (S::NotStarted, A::LoadSnapshot) => S::Paused,
            (S::Running, A::Pause) => S::Paused,
            (S::Running, A::GuestInput) => S::Running,
            (S::Paused, A::Resume) => S::Running,
            (S::Paused, A::Snapshot) => S::Paused,
            (S::Paused, A::DeleteSnapshot) => S::Paused,
            (state, action) => return Err(StateError { action, state }),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use Action as A;
        use VmState as S;
        assert_eq!(S::NotStarted.check(A::Start), Ok(S::Running));
        assert_eq!(S::Running.check(A::Pause), Ok(S::Paused));
        assert_eq!(S::Paused.check(A::Resume), Ok(S::Running));
        assert_eq!(S::Paused.check(A::Snapshot), Ok(S::Paused));
        assert_eq!(S::Paused.check(A::DeleteSnapshot), Ok(S::Paused));
        for (s, a) in [
            (S::Running, A::Start),
            (S::Paused, A::Start),
            (S::NotStarted, A::Pause),
            (S::Paused, A::Pause),
            (S::Running, A::Resume),
            (S::Running, A::Snapshot),
            (S::Running, A::Configure),
            (S::Stopped, A::Resume),
            (S::Running, A::LoadSnapshot),
            (S::Running, A::DeleteSnapshot),
            (S::NotStarted, A::DeleteSnapshot),
        ] {
            assert!(s.check(a).is_err(), "{s} {a}");
        }
        let e = S::Running.check(A::Snapshot).unwrap_err().to_string();
        assert_eq!(
            e,
            "cannot create a snapshot while the VM is running (pause it first: PATCH /vm {\"state\": \"Paused\"})"
        );
        assert_eq!(S::NotStarted.to_string(), "Not started");
    }
}
