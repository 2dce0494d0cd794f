//! Images made to hurt the VMM: damaged metadata of every format (the CI twin of the
//! `image_open` fuzz target, `crates/block/fuzz`) and a backing file name pointing at a FIFO.
//! Opening them may fail, never panic or hang.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use kvmbox_block::{fuzzing, open, DiskSpec, Format};

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kvmbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `qemu-img ARGS`; None (after a SKIP line) where qemu-img is missing.
fn qemu_img(test: &str, args: &[&str], paths: &[&Path]) -> Option<()> {
    match Command::new("qemu-img").args(args).args(paths).status() {
        Ok(s) => {
            assert!(s.success(), "qemu-img {args:?} {paths:?} failed");
            Some(())
        }
        Err(e) => {
            eprintln!("SKIP {test}: qemu-img: {e} (install qemu-utils: scripts/setup.sh)");
            None
        }
    }
}

/// Open `path` read-only with format detection, as `--disk PATH,ro` does.
fn open_ro(path: &Path) -> kvmbox_block::Result<()> {
    open(&DiskSpec {
        read_only: true,
        lock: false,
        ..DiskSpec::new(path)
    })
    .map(|_| ())
}

/// Real images of every format kvmbox reads, made by `qemu-img` from 1 MiB of patterned data
/// (so their tables are populated), then damaged at random in their metadata (the first 4 KiB,
/// the first 64 KiB, the last 512 bytes) and truncated, fed to the `image_open` fuzz target's
/// entry point. Every undamaged image opens (the inputs reach the parsers behind the magic
/// numbers); no damaged one may panic.
#[test]
fn damaged_images_never_panic() {
    let test = "damaged_images_never_panic";
    let dir = TempDir::new("damaged-images");
    let raw = dir.0.join("data.raw");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i / 4096 * 7 + i % 251) as u8)
        .collect();
    std::fs::write(&raw, &data).expect("write data.raw");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (fmt, opts) in [
        ("qcow2", "cluster_size=4096"),
        ("qcow2", "compat=0.10,cluster_size=65536"),
        ("vdi", ""),
        ("vmdk", ""),
        ("vpc", ""),
        ("vhdx", ""),
    ] {
        let img = dir.0.join(format!("image.{fmt}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        if qemu_img(test, &args, &[&raw, &img]).is_none() {
            return;
        }
        if let Err(e) = open_ro(&img) {
            panic!("the undamaged {fmt} image ({opts}) did not open: {e}");
        }
        let good = std::fs::read(&img).expect("read the image");
        for case in 0..150 {
            let mut bad = good.clone();
            for _ in 0..1 + rnd() % 8 {
                let at = match rnd() % 3 {
                    0 => bad.len() - 1 - (rnd() % 512) as usize,
                    1 => (rnd() % 4096) as usize % bad.len(),
                    _ => (rnd() % 65536) as usize % bad.len(),
                };
                bad[at] = rnd() as u8;
            }
            if case % 10 == 9 {
                bad.truncate((rnd() % bad.len() as u64) as usize);
            }
            fuzzing::image(&bad);
        }
    }
}

/// A qcow2 overlay whose backing file is a FIFO: opening it used to block forever in open(2)
/// (waiting for a writer, with kvmbox's termination signals blocked in that thread). Now the
/// FIFO is refused with an error naming it, as is a FIFO given as the disk itself.
#[test]
fn fifo_backing_file_is_refused_not_waited_for() {
    let test = "fifo_backing_file_is_refused_not_waited_for";
    let dir = TempDir::new("fifo-backing");
    let fifo = dir.0.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().expect("UTF-8 temp path")).expect("no NUL");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let overlay = dir.0.join("overlay.qcow2");
    let backing = fifo.to_str().expect("UTF-8 temp path");
    let args = [
        "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
    ];
    if qemu_img(test, &args, &[&overlay, Path::new("1M")]).is_none() {
        return;
    }
    let (tx, rx) = mpsc::channel();
    for (path, format) in [(overlay.clone(), Some(Format::Qcow2)), (fifo.clone(), None)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let spec = DiskSpec {
                format,
                read_only: true,
                lock: false,
                ..DiskSpec::new(&path)
            };
            let _ = tx.send((
                path.clone(),
                open(&spec).map(|_| ()).map_err(|e| e.to_string()),
            ));
        });
    }
    for _ in 0..2 {
        // A thread stuck in open(2) stays behind; the test fails instead of hanging.
        let (path, got) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("opening an image with a FIFO still blocks");
        let err = got.expect_err("a FIFO opened as a disk image");
        assert!(
            err.contains("not a regular file or a block device") && err.contains("pipe"),
            "{}: {err}",
            path.display()
        );
    }
}

/// Found by `image_open` (FUZZING.md): a qcow2 image (512-byte clusters, 16-bit refcounts)
/// whose refcount table does not cover its own metadata. Writing to it made imago allocate a
/// refcount block, which needed a refcount block, and so on until the stack overflowed (ASan:
/// `ensure_rb` -> `allocate_cluster_at` -> `allocate_clusters` -> `ensure_rb`, hundreds deep).
/// Run on a thread with the default 2 MiB stack, as kvmbox's device threads have.
#[test]
fn qcow2_refblock_recursion_does_not_overflow_the_stack() {
    let data = include_bytes!("data/qcow2-refblock-recursion.bin");
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| fuzzing::image(data))
        .expect("spawn")
        .join()
        .expect("the image made the opener panic");
    let dir = TempDir::new("refblock-gap");
    let img = dir.0.join("gap.qcow2");
    std::fs::write(&img, data).expect("write the image");
    let spec = DiskSpec {
        format: Some(Format::Qcow2),
        lock: false,
        ..DiskSpec::new(&img)
    };
    let err = open(&spec)
        .map(|_| ())
        .expect_err("read-write open of a refcount gap");
    assert!(
        err.to_string()
            .contains("has no refcount block for clusters 0"),
        "{err}"
    );
}

/// Found by `image_open` (FUZZING.md): a VMDK whose header puts the grain directory at a sector
/// number that overflows when turned into a byte offset (a panic with overflow checks, a wrapped
/// offset without). It is refused at open with the grain directory named.
#[test]
fn vmdk_grain_directory_past_the_byte_range_is_refused() {
    let data = include_bytes!("data/vmdk-grain-directory-overflow.bin");
    fuzzing::image(data);
    let dir = TempDir::new("vmdk-gd");
    let img = dir.0.join("gd.vmdk");
    std::fs::write(&img, data).expect("write the image");
    let err = open_ro(&img).expect_err("a grain directory past 2^64 bytes");
    assert!(
        err.to_string().contains("grain directory at sector"),
        "{err}"
    );
}

/// Found by `image_open` (FUZZING.md): a qcow2 image smaller than one sector, read at its end
/// with a zero-length buffer (as a guest's zero-length descriptor would be), reached imago with
/// an I/O vector holding an empty buffer, which imago's debug assertion forbids. Empty buffers
/// are left out before imago sees them: the image reads, and an empty buffer beside a real one
/// changes nothing.
#[test]
fn empty_buffers_never_reach_imago() {
    fuzzing::image(include_bytes!("data/qcow2-empty-read-buffer.bin"));
    let dir = TempDir::new("empty-buf");
    let img = dir.0.join("e.qcow2");
    if qemu_img(
        "empty_buffers_never_reach_imago",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("size={}", 1 << 20),
        ],
        &[&img],
    )
    .is_none()
    {
        return;
    }
    let b = open(&DiskSpec {
        lock: false,
        ..DiskSpec::new(&img)
    })
    .expect("open the qcow2 image");
    let data = [0x5au8; 512];
    b.write_vectored_at(&[IoSlice::new(&[]), IoSlice::new(&data)], 4096)
        .expect("write with an empty buffer first");
    let mut got = [0u8; 512];
    b.read_vectored_at(
        &mut [IoSliceMut::new(&mut []), IoSliceMut::new(&mut got)],
        4096,
    )
    .expect("read with an empty buffer first");
    assert_eq!(got, data);
}
