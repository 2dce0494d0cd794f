//! `kvmbox disk`: image operations (kvmbox-block's `image` module) on the command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use kvmbox_block::image::{self, LayerInfo};
use kvmbox_block::meta::{Report, Snapshot};
use kvmbox_block::snapshot;
use kvmbox_block::Format;

#[derive(clap::Subcommand)]
pub enum DiskCommand {
    /// Create an image: SIZE in bytes or with K, M, G, T (may be omitted with --backing).
    Create {
        /// The new image (must not exist).
        path: PathBuf,
        /// Virtual size.
        size: Option<String>,
        /// raw or qcow2 [default: qcow2].
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
        /// Backing image (qcow2 only), stored as given: relative names are relative to PATH's
        /// directory.
        #[arg(long, value_name = "BASE")]
        backing: Option<String>,
    },
    /// Show format, sizes, cluster size, flags and the backing chain.
    Info {
        /// The image.
        path: PathBuf,
        /// Print JSON (a list: the image, then its backing files).
        #[arg(long)]
        json: bool,
    },
    /// Copy an image into a new one, skipping zero blocks (the result is sparse).
    Convert {
        /// Source image (raw or qcow2 with its backing chain).
        src: PathBuf,
        /// Destination (must not exist).
        dst: PathBuf,
        /// raw or qcow2 [default: qcow2].
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
    /// Change an image's virtual size.
    Resize {
        /// The image.
        path: PathBuf,
        /// New virtual size.
        size: String,
    },
    /// Check a qcow2 image's refcounts and tables as `qemu-img check` does; exit status 0 clean,
    /// 2 corruptions, 3 leaked clusters only, 1 the check could not run.
    Check {
        /// The image.
        path: PathBuf,
        /// Rebuild refcounts and COPIED flags from the tables (fixes leaks and refcount errors);
        /// changes nothing if the tables themselves are damaged.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// qcow2 internal snapshots: create, list, apply or delete NAME.
    Snapshot {
        /// The image (qcow2, not in use).
        path: PathBuf,
        /// create, list, apply or delete.
        #[arg(value_parser = ["create", "list", "apply", "delete"])]
        action: String,
        /// The snapshot's name (or ID, for apply and delete); not for list.
        name: Option<String>,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    // Plain numbers are bytes here (as in qemu-img), MiB for --memory: give parse_size a unit.
    let with_unit = if s.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{s}B")
    } else {
        s.to_string()
    };
    kvmbox_vmm::config::parse_size(&with_unit).map_err(|_| format!("invalid size '{s}'"))
}

fn parse_format(f: Option<&str>) -> Result<Format, String> {
    f.unwrap_or("qcow2").parse()
}

fn render(layers: &[LayerInfo]) -> String {
    let mut out = String::new();
    for (i, l) in layers.iter().enumerate() {
        if i > 0 {
            out.push_str("\nbacking image:\n");
        }
        out.push_str(&format!(
            "image: {}\nformat: {}\n",
            l.path.display(),
            l.format
        ));
        out.push_str(&format!("virtual size: {} bytes\n", l.virtual_size));
        out.push_str(&format!("allocated on host: {} bytes\n", l.allocated_bytes));
        if let Some(c) = l.cluster_size {
            out.push_str(&format!("cluster size: {c}\n"));
            out.push_str(&format!(
                "qcow2 version: {}\n",
                l.qcow2_version.unwrap_or(0)
            ));
            out.push_str(&format!(
                "dirty: {}\ncorrupt: {}\nlazy refcounts: {}\nsnapshots: {}\n",
                l.dirty, l.corrupt, l.lazy_refcounts, l.snapshots
            ));
        }
        if let Some(b) = &l.backing_file {
            out.push_str(&format!(
                "backing file: {b} (format {})\n",
                l.backing_format.as_deref().unwrap_or("probed")
            ));
        }
    }
    out
}

/// What a progress line counts.
#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    /// Items, named after the count.
    Items(&'static str),
}

/// A progress line on a terminal (redrawn at most 10 times a second, cleared at the end),
/// nothing otherwise.
fn progress(unit: Unit) -> impl FnMut(u64, u64) {
    let tty = std::io::stdout().is_terminal();
    let start = std::time::Instant::now();
    let mut drawn: Option<std::time::Instant> = None;
    move |done, total| {
        use std::io::Write;
        if !tty {
            return;
        }
        let now = std::time::Instant::now();
        let finished = done >= total;
        if !finished && drawn.is_some_and(|t| now - t < std::time::Duration::from_millis(100)) {
            return;
        }
        drawn = Some(now);
        let mut out = std::io::stdout().lock();
        let _ = if finished {
            write!(out, "\r\x1b[2K")
        } else {
            write!(
                out,
                "\r{}\x1b[K",
                progress_line(done, total, now - start, unit)
            )
        };
        let _ = out.flush();
    }
}

/// `[#####-----] 1.5 GiB/4.0 GiB 12s`: a 40-column bar, the position, and the time left at
/// the rate so far (once there is a rate).
fn progress_line(done: u64, total: u64, elapsed: std::time::Duration, unit: Unit) -> String {
    const WIDTH: u64 = 40;
    let filled = (u128::from(done.min(total)) * u128::from(WIDTH))
        .checked_div(u128::from(total))
        .unwrap_or(0) as usize;
    let bar = format!(
        "[{}{}]",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let position = match unit {
        Unit::Bytes => format!("{}/{}", size(done), size(total)),
        Unit::Items(what) => format!("{done}/{total} {what}"),
    };
    let ms = elapsed.as_millis() as u64;
    let left = match (total.saturating_sub(done)).checked_mul(ms) {
        Some(x) if done > 0 && ms > 0 => format!(" {}s", (x / done).div_ceil(1000)),
        _ => String::new(),
    };
    format!("{bar} {position}{left}")
}

/// `n` bytes in the largest binary unit that keeps a digit before the point: `1.5 GiB`.
fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!(
            "{:.1} {}",
            n as f64 / (1u64 << (10 * unit)) as f64,
            UNITS[unit]
        )
    }
}

fn exec(cmd: DiskCommand) -> Result<ExitCode, String> {
    let done: Result<(), String> = match cmd {
        DiskCommand::Create {
            path,
            size,
            format,
            backing,
        } => {
            let format = parse_format(format.as_deref())?;
            let size = match size {
                Some(s) => parse_size(&s)?,
                None if backing.is_some() => 0,
                None => return Err("disk create: missing SIZE".into()),
            };
            image::create(&path, size, format, backing.as_deref()).map_err(|e| e.to_string())
        }
        DiskCommand::Info { path, json } => {
            let layers = image::info(&path).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&layers).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", render(&layers));
            }
            Ok(())
        }
        DiskCommand::Convert { src, dst, format } => {
            let format = parse_format(format.as_deref())?;
            image::convert(&src, &dst, format, &mut progress(Unit::Bytes))
                .map_err(|e| e.to_string())
        }
        DiskCommand::Resize { path, size } => {
            image::resize(&path, parse_size(&size)?).map_err(|e| e.to_string())
        }
        DiskCommand::Check { path, repair, json } => return Ok(check(&path, repair, json)),
        DiskCommand::Snapshot { path, action, name } => {
            let need = || {
                name.clone()
                    .ok_or_else(|| format!("disk snapshot {action}: missing NAME"))
            };
            let r = match action.as_str() {
                "list" => {
                    let list = snapshot::list(&path).map_err(|e| e.to_string())?;
                    print!("{}", render_snapshots(&list));
                    return Ok(ExitCode::SUCCESS);
                }
                "create" => snapshot::create(&path, &need()?),
                "apply" => snapshot::apply(&path, &need()?),
                _ => snapshot::delete(&path, &need()?),
            };
            r.map_err(|e| e.to_string())
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

fn render_snapshots(list: &[Snapshot]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut out = format!("{:<6} {:<24} {:>14} {}\n", "ID", "TAG", "DISK SIZE", "DATE");
    for s in list {
        let size = s.disk_size().map_or("-".into(), |d| d.to_string());
        out.push_str(&format!(
            "{:<6} {:<24} {:>14} {}\n",
            s.id,
            s.name,
            size,
            utc(s.date_sec.into())
        ));
    }
    out
}

/// `secs` since the epoch as "YYYY-MM-DD HH:MM:SS UTC" (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The text `qemu-img check` would print for `r` (its wording, so scripts carry over).
fn render_report(r: &Report, out: &mut String) {
    for p in &r.problems {
        out.push_str(&p.message);
        out.push('\n');
    }
    if r.leaks > 0 {
        out.push_str(&format!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
            r.leaks
        ));
    }
    if r.corruptions > 0 {
        out.push_str(&format!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
            r.corruptions
        ));
    } else {
        out.push_str("No errors were found on the image.\n");
    }
    let pct = |n: u64| {
        if r.total_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.total_clusters as f64
        }
    };
    out.push_str(&format!(
        "{}/{} = {:.2}% allocated, {:.2}% compressed clusters\nImage end offset: {}\n",
        r.allocated_clusters,
        r.total_clusters,
        pct(r.allocated_clusters),
        pct(r.compressed_clusters),
        r.image_end_offset
    ));
}

/// `kvmbox disk check`: its own exit statuses, those of `qemu-img check`.
fn check(path: &std::path::Path, repair: bool, json: bool) -> ExitCode {
    let outcome = match image::check(path, repair, &mut progress(Unit::Items("L2 tables"))) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kvmbox: error: {e}");
            return ExitCode::from(1);
        }
    };
    let status = match outcome.now() {
        Some(r) if r.corruptions > 0 => 2,
        Some(r) if r.leaks > 0 => 3,
        _ => 0,
    };
    if json {
        match serde_json::to_string_pretty(&outcome) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("kvmbox: error: {e}");
                return ExitCode::from(1);
            }
        }
        return ExitCode::from(status);
    }
    let mut out = String::new();
    match (&outcome.found, &outcome.after_repair) {
        (None, _) => out.push_str(&format!(
            "{}: raw image: nothing to check (raw images have no metadata)\n",
            path.display()
        )),
        (Some(found), Some(after)) => {
            for p in &found.problems {
                out.push_str(&format!("Repairing {}\n", p.message));
            }
            out.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                found.leaks, found.corruptions
            ));
            render_report(after, &mut out);
        }
        (Some(found), None) => {
            render_report(found, &mut out);
            if let Some(why) = &outcome.repair_refused {
                out.push_str(&format!("\nNot repaired: {why}\n"));
            }
        }
    }
    print!("{out}");
    ExitCode::from(status)
}

/// Run one `kvmbox disk` command: status 0 on success, 2 with one error line otherwise
/// (`check` has its own statuses).
pub fn run(cmd: DiskCommand) -> ExitCode {
    match exec(cmd) {
        Ok(status) => status,
        Err(e) => crate::fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::{progress_line, size, Unit};
    use std::time::Duration;

    #[test]
    fn sizes_use_the_largest_unit_with_a_whole_digit() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
        assert_eq!(size(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn the_line_shows_bar_position_and_time_left() {
        let line = progress_line(1 << 30, 4 << 30, Duration::from_secs(3), Unit::Bytes);
        assert_eq!(
            line,
            format!("[{}{}] 1.0 GiB/4.0 GiB 9s", "#".repeat(10), "-".repeat(30))
        );
        // No rate yet, an empty total, a position past the total: no panic, no nonsense.
        let start = progress_line(0, 7, Duration::ZERO, Unit::Items("L2 tables"));
        assert_eq!(start, format!("[{}] 0/7 L2 tables", "-".repeat(40)));
        assert!(progress_line(5, 0, Duration::from_secs(1), Unit::Bytes).starts_with("[---"));
        assert!(progress_line(9, 4, Duration::from_secs(1), Unit::Items("x")).starts_with("[###"));
    }
}
