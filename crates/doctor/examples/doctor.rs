//! `kvmbox doctor` without the CLI: `cargo run -p kvmbox-doctor --example doctor [-- --json]`.

fn main() -> std::process::ExitCode {
    let report = kvmbox_doctor::run_checks();
    if std::env::args().any(|a| a == "--json") {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render_text());
    }
    std::process::ExitCode::from(if report.can_run_vms() { 0 } else { 1 })
}
