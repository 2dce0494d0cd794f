//! `kvmbox disk`: image operations (kvmbox-block's `image` module) on the command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use kvmbox_block::image::{self, LayerInfo};
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

/// A progress bar on a terminal, nothing otherwise.
fn progress() -> impl FnMut(u64, u64) {
    let bar = std::io::stdout().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    move |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
            if done >= total {
                b.finish_and_clear();
            }
        }
    }
}

fn exec(cmd: DiskCommand) -> Result<(), String> {
    match cmd {
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
            image::convert(&src, &dst, format, &mut progress()).map_err(|e| e.to_string())
        }
        DiskCommand::Resize { path, size } => {
            image::resize(&path, parse_size(&size)?).map_err(|e| e.to_string())
        }
    }
}

/// Run one `kvmbox disk` command: status 0 on success, 2 with one error line otherwise.
pub fn run(cmd: DiskCommand) -> ExitCode {
    match exec(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::fail(e),
    }
}
