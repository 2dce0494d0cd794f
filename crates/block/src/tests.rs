//! Backend tests on real files; the qcow2 and locking ones check interoperability against
//! `qemu-img` (Debian's qemu-utils) and print one `SKIP:` line where it is missing.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{open, DiskSpec, Error, Format};

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kvmbox-block-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Byte `i` of the known pattern: varies within and across sectors.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(i as u64 >> 9) as u8 ^ seed)
        .collect()
}

/// Tests that open images or start processes run one at a time: a child forked while another
/// test holds an image (a QEMU tool before its exec, or the child that
/// `closing_an_image_unlocks_it_while_a_forked_child_holds_its_descriptor` keeps for a second)
/// holds copies of every descriptor, so that image's OFD lock, which the other test then sees as
/// another process's.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn qemu_img_found(test: &str) -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        println!("SKIP: {test}: qemu-img not found (install qemu-utils: scripts/setup.sh)");
    }
    ok
}

/// The serializing guard where qemu-img is installed, else one SKIP line and None.
fn qemu_img_or_skip(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    let g = serial();
    qemu_img_found(test).then_some(g)
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn read_all(b: &dyn crate::BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; b.size() as usize];
    // Two iovecs of odd sizes, to cover the vectored path.
    let (a, c) = v.split_at_mut(b.size() as usize / 3 / 512 * 512);
    b.read_vectored_at(&mut [IoSliceMut::new(a), IoSliceMut::new(c)], 0)
        .unwrap();
    v
}

fn spec(p: &Path) -> DiskSpec {
    DiskSpec::new(p)
}

#[test]
fn raw_reads_writes_and_refuses_out_of_range() {
    let _serial = serial();
    let d = TempDir::new("raw");
    let img = d.path("a.img");
    let data = pattern(1 << 20, 0);
    std::fs::write(&img, &data).unwrap();
    let b = open(&DiskSpec {
        format: Some(Format::Raw),
        ..spec(&img)
    })
    .unwrap();
    assert_eq!(b.size(), 1 << 20);
    assert_eq!(read_all(&*b), data);
    let w = pattern(4096, 7);
    b.write_vectored_at(&[IoSlice::new(&w[..512]), IoSlice::new(&w[512..])], 8192)
        .unwrap();
    b.write_zeroes(65536, 4096, false).unwrap();
    b.flush().unwrap();
    let f = std::fs::read(&img).unwrap();
    assert_eq!(&f[8192..12288], &w[..]);
    assert!(f[65536..69632].iter().all(|&x| x == 0));
    let mut buf = [0u8; 512];
    assert!(b
        .read_vectored_at(&mut [IoSliceMut::new(&mut buf)], (1 << 20) - 256)
        .is_err());
    assert!(b
        .write_vectored_at(&[IoSlice::new(&buf)], u64::MAX - 10)
        .is_err());
}

#[test]
fn detected_raw_refuses_a_guest_writing_an_image_header() {
    let _serial = serial();
    let d = TempDir::new("probe");
    let img = d.path("a.img");
    std::fs::write(&img, vec![0u8; 1 << 16]).unwrap();
    let b = open(&spec(&img)).unwrap();
    let mut hdr = vec![0u8; 512];
    hdr[..4].copy_from_slice(b"QFI\xfb");
    let e = b.write_vectored_at(&[IoSlice::new(&hdr)], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    // Split across iovecs and starting inside the magic: still refused.
    let e = b
        .write_vectored_at(&[IoSlice::new(&hdr[1..2]), IoSlice::new(&hdr[2..512])], 1)
        .map(|_| ());
    assert!(e.is_ok(), "bytes 1.. alone do not make a magic");
    b.write_vectored_at(&[IoSlice::new(b"Q")], 0).unwrap_err();
    // Ordinary data at sector 0 is fine, and with format=raw anything is.
    b.write_vectored_at(&[IoSlice::new(&[0x55u8; 512])], 0)
        .unwrap();
    drop(b);
    let b = open(&DiskSpec {
        format: Some(Format::Raw),
        ..spec(&img)
    })
    .unwrap();
    b.write_vectored_at(&[IoSlice::new(&hdr)], 0).unwrap();
    drop(b);
    // Now it looks like qcow2 (a broken one): detection refuses it, format=raw still works.
    let e = open(&spec(&img)).err().unwrap().to_string();
    assert!(e.contains("a.img") && e.contains("bad qcow2 header"), "{e}");
}

#[test]
fn other_formats_are_not_served_as_raw() {
    let _serial = serial();
    let d = TempDir::new("vdi");
    let img = d.path("a.vdi");
    let mut h = vec![0u8; 4096];
    h[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
    std::fs::write(&img, &h).unwrap();
    let e = open(&spec(&img)).err().unwrap().to_string();
    assert!(e.contains("vdi images can only be opened read-only"), "{e}");
}

/// A qcow2 image made by `qemu-img convert` (plain and compressed) reads exactly like the raw
/// file it was made from.
#[test]
fn qemu_img_made_qcow2_reads_bit_exact() {
    let Some(_serial) = qemu_img_or_skip("qemu_img_made_qcow2_reads_bit_exact") else {
        return;
    };
    let d = TempDir::new("q2read");
    let raw = d.path("src.raw");
    let mut data = pattern(3 << 20, 3);
    data[1 << 20..2 << 20].fill(0); // a hole qemu-img leaves unallocated
    std::fs::write(&raw, &data).unwrap();
    for (name, extra) in [
        ("v3.qcow2", vec![]),
        ("v2.qcow2", vec!["-o", "compat=0.10"]),
        ("c.qcow2", vec!["-c"]),
        ("small.qcow2", vec!["-o", "cluster_size=4096"]),
    ] {
        let q = d.path(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(extra);
        args.extend([raw.to_str().unwrap(), q.to_str().unwrap()]);
        let (ok, out) = qemu_img(&args);
        assert!(ok, "{out}");
        let b = open(&DiskSpec {
            read_only: true,
            ..spec(&q)
        })
        .unwrap();
        assert_eq!(b.size(), data.len() as u64, "{name}");
        assert!(read_all(&*b) == data, "{name}: contents differ");
    }
}

/// Writes through an overlay on a qemu-img-made base: the base stays as it was, the overlay
/// passes `qemu-img check` and `qemu-img compare` with what was written.
#[test]
fn overlay_writes_leave_the_backing_file_and_pass_qemu_img_check() {
    let Some(_serial) =
        qemu_img_or_skip("overlay_writes_leave_the_backing_file_and_pass_qemu_img_check")
    else {
        return;
    };
    let d = TempDir::new("overlay");
    let raw = d.path("base.raw");
    let data = pattern(4 << 20, 9);
    std::fs::write(&raw, &data).unwrap();
    let base = d.path("base.qcow2");
    let (ok, out) = qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // A relative backing name: resolved against the overlay's directory, not the cwd.
    let sub = d.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let ov = sub.join("ov.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "../base.qcow2",
        "-F",
        "qcow2",
        ov.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let base_before = std::fs::read(&base).unwrap();
    let mut expect = data.clone();
    {
        let b = open(&spec(&ov)).unwrap();
        assert_eq!(read_all(&*b), data);
        // Partial-cluster writes (copy-on-write from the base), a write across clusters,
        // zeroes and a discard.
        let w = pattern(70_000 / 512 * 512, 0x5a);
        b.write_vectored_at(&[IoSlice::new(&w)], 1536).unwrap();
        expect[1536..1536 + w.len()].copy_from_slice(&w);
        b.write_zeroes(1 << 20, 128 << 10, false).unwrap();
        expect[1 << 20..(1 << 20) + (128 << 10)].fill(0);
        b.discard(2 << 20, 1 << 20).unwrap();
        expect[2 << 20..3 << 20].fill(0);
        b.flush().unwrap();
        assert!(read_all(&*b) == expect, "read back after writes");
    }
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "backing file changed"
    );
    let (ok, out) = qemu_img(&["check", ov.to_str().unwrap()]);
    assert!(ok && out.contains("No errors"), "{out}");
    let exp = d.path("expect.raw");
    std::fs::write(&exp, &expect).unwrap();
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        exp.to_str().unwrap(),
        ov.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}

fn create_qcow2(path: &Path, size: &str, backing: Option<&str>) {
    let mut args = vec!["create", "-f", "qcow2", "-u"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([path.to_str().unwrap(), size]);
    let (ok, out) = qemu_img(&args);
    assert!(ok, "{out}");
}

#[test]
fn backing_loops_and_deep_chains_are_clear_errors() {
    let Some(_serial) = qemu_img_or_skip("backing_loops_and_deep_chains_are_clear_errors") else {
        return;
    };
    let d = TempDir::new("chain");
    let (a, b) = (d.path("a.qcow2"), d.path("b.qcow2"));
    create_qcow2(&a, "1M", Some("b.qcow2"));
    create_qcow2(&b, "1M", Some("a.qcow2"));
    let e = open(&spec(&a)).err().unwrap().to_string();
    assert!(e.contains("backing file loop"), "{e}");
    // A missing backing file names both files.
    let c = d.path("c.qcow2");
    create_qcow2(&c, "1M", Some("missing.qcow2"));
    let e = open(&spec(&c)).err().unwrap().to_string();
    assert!(e.contains("c.qcow2") && e.contains("missing.qcow2"), "{e}");
    // MAX_CHAIN_DEPTH + 1 backing files below the top.
    let n = crate::MAX_CHAIN_DEPTH + 1;
    create_qcow2(&d.path("l0.qcow2"), "1M", None);
    for i in 1..=n {
        create_qcow2(
            &d.path(&format!("l{i}.qcow2")),
            "1M",
            Some(&format!("l{}.qcow2", i - 1)),
        );
    }
    let e = open(&spec(&d.path(&format!("l{n}.qcow2"))))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("deeper than"), "{e}");
    let ok = open(&spec(&d.path(&format!("l{}.qcow2", n - 1))));
    assert!(ok.is_ok(), "{:?}", ok.err());
}

/// Corrupt headers give an error naming the file and the problem, never a panic.
#[test]
fn bad_qcow2_headers_are_clear_errors() {
    let Some(_serial) = qemu_img_or_skip("bad_qcow2_headers_are_clear_errors") else {
        return;
    };
    let d = TempDir::new("bad");
    let good = d.path("good.qcow2");
    create_qcow2(&good, "64M", None);
    let orig = std::fs::read(&good).unwrap();
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "truncated",
            Box::new(|v: &mut Vec<u8>| v.truncate(50)),
            "only 50 bytes",
        ),
        (
            "cluster bits",
            Box::new(|v: &mut Vec<u8>| v[20..24].copy_from_slice(&30u32.to_be_bytes())),
            "cluster_bits 30",
        ),
        (
            "L1 past EOF",
            Box::new(|v: &mut Vec<u8>| v[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            "L1 table",
        ),
        (
            "L1 in header",
            Box::new(|v: &mut Vec<u8>| v[40..48].copy_from_slice(&0u64.to_be_bytes())),
            "L1 table",
        ),
        (
            "refcount table",
            Box::new(|v: &mut Vec<u8>| v[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            "refcount table",
        ),
        (
            "huge size",
            Box::new(|v: &mut Vec<u8>| v[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
            "virtual size",
        ),
        (
            "version",
            Box::new(|v: &mut Vec<u8>| v[4..8].copy_from_slice(&9u32.to_be_bytes())),
            "version 9",
        ),
        (
            "zstd",
            Box::new(|v: &mut Vec<u8>| {
                v[79] |= 8;
                v[104] = 1;
            }),
            "zstd",
        ),
        // A dirty image opened read-write is repaired, not refused: see
        // lazy_refcount_crash_is_reported_and_repaired.
    ];
    for (what, f, want) in cases {
        let p = d.path("bad.qcow2");
        let mut v = orig.clone();
        f(&mut v);
        std::fs::write(&p, &v).unwrap();
        let e = open(&spec(&p))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bad.qcow2") && e.contains(want), "{what}: {e}");
    }
}

/// L2 entries pointing past the end of the file: an I/O error for that request, not a panic.
#[test]
fn l2_entry_past_eof_is_an_io_error() {
    let Some(_serial) = qemu_img_or_skip("l2_entry_past_eof_is_an_io_error") else {
        return;
    };
    let d = TempDir::new("l2");
    let raw = d.path("a.raw");
    std::fs::write(&raw, pattern(1 << 20, 1)).unwrap();
    let q = d.path("a.qcow2");
    let (ok, out) = qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let mut v = std::fs::read(&q).unwrap();
    let l1 = u64::from_be_bytes(v[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(v[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    v[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | (1 << 45)).to_be_bytes());
    std::fs::write(&q, &v).unwrap();
    let b = open(&spec(&q)).unwrap();
    let mut buf = vec![0xaau8; 4096];
    // imago reads a mapping past the end of the file as an error or as zeroes: nothing from
    // outside the image reaches the guest.
    let r = b.read_vectored_at(&mut [IoSliceMut::new(&mut buf)], 0);
    assert!(r.is_err() || buf.iter().all(|&x| x == 0), "{r:?}");
    let len = std::fs::metadata(&q).unwrap().len();
    // Writing there must not grow the file to the bogus offset either.
    let w = b.write_vectored_at(&[IoSlice::new(&buf)], 0);
    drop(b);
    let now = std::fs::metadata(&q).unwrap().len();
    println!("write through a bogus L2 entry: {w:?}, file {len} -> {now} bytes");
    assert!(now < len + (16 << 20));
}

/// Two writers exclude each other; readers share; kvmbox and QEMU see each other's locks.
#[test]
fn image_locks_exclude_a_second_writer_and_qemu() {
    let _serial = serial();
    let d = TempDir::new("lock");
    let img = d.path("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let ro = |p: &Path| DiskSpec {
        read_only: true,
        ..spec(p)
    };
    let w = open(&spec(&img)).unwrap();
    let e = open(&spec(&img)).err().unwrap();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("a.img") && msg.contains("in use") && msg.contains("lock=off"),
        "{msg}"
    );
    assert!(open(&ro(&img)).is_err(), "a reader while a writer holds it");
    assert!(
        open(&DiskSpec {
            lock: false,
            ..spec(&img)
        })
        .is_ok(),
        "lock=off"
    );
    if qemu_img_found("image_locks_exclude_a_second_writer_and_qemu (qemu part)") {
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(&img)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() || out.contains("lock"),
            "qemu-io wrote an image kvmbox writes: {out}"
        );
        assert!(out.contains("lock"), "{out}");
    }
    drop(w);
    let r1 = open(&ro(&img)).unwrap();
    let r2 = open(&ro(&img)).unwrap();
    assert!(open(&spec(&img)).is_err(), "a writer while readers hold it");
    if qemu_img_found("image_locks_exclude_a_second_writer_and_qemu (qemu part)") {
        let (ok, out) = qemu_img(&["info", img.to_str().unwrap()]);
        assert!(ok, "qemu-img info beside kvmbox readers: {out}");
    }
    drop((r1, r2));
    // QEMU holding the image for writing (qemu-nbd serves it read-write until killed).
    let nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "-k"])
        .arg(d.path("nbd.sock"))
        .arg(&img)
        .spawn();
    let Ok(mut nbd) = nbd else {
        println!("SKIP: image_locks_exclude_a_second_writer_and_qemu: qemu-nbd not found");
        return;
    };
    let mut msg = String::new();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Err(e) = open(&spec(&img)) {
            msg = e.to_string();
            break;
        }
    }
    let pid = nbd.id();
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(
        msg.contains("in use"),
        "kvmbox opened an image qemu-nbd writes: {msg}"
    );
    println!("lock message: {msg}");
    assert!(
        msg.contains(&format!("process {pid}")),
        "holder PID not named: {msg}"
    );
    assert!(open(&spec(&img)).is_ok(), "after qemu-nbd ended");
}

/// VDI, VMDK (sparse, streamOptimized, flat) and VHD (dynamic, fixed) images made by
/// `qemu-img convert` read back as the pattern they were made from, read-only and through
/// `convert` to qcow2 (checked by `qemu-img compare`).
#[test]
fn foreign_formats_read_like_their_source() {
    let Some(_serial) = qemu_img_or_skip("foreign_formats_read_like_their_source") else {
        return;
    };
    let d = TempDir::new("foreign");
    let raw = d.path("src.raw");
    let mut data = pattern(6 << 20, 0x3c);
    data[2 << 20..3 << 20].fill(0);
    std::fs::write(&raw, &data).unwrap();
    for (name, fmt, opts) in [
        ("a.vdi", "vdi", ""),
        ("f.vdi", "vdi", "static=on"),
        ("s.vmdk", "vmdk", ""),
        ("so.vmdk", "vmdk", "subformat=streamOptimized"),
        ("fl.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("d.vhd", "vpc", ""),
        ("x.vhd", "vpc", "subformat=fixed,force_size=on"),
        ("d.vhdx", "vhdx", ""),
        ("s.vhdx", "vhdx", "block_size=8M"),
    ] {
        let img = d.path(name);
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
        let (ok, out) = qemu_img(&args);
        assert!(ok, "{name}: {out}");
        let e = open(&spec(&img))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("read-only"), "{name} opened read-write: {e}");
        let b = open(&DiskSpec {
            read_only: true,
            ..spec(&img)
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = read_all(&*b);
        assert!(got.len() >= data.len(), "{name}: size {}", got.len());
        assert!(got[..data.len()] == data[..], "{name}: contents differ");
        assert!(got[data.len()..].iter().all(|&x| x == 0), "{name}: tail");
        let info = crate::image::info(&img).unwrap();
        assert_eq!(
            (info[0].format.as_str(), info[0].virtual_size),
            (fmt, got.len() as u64),
            "{name}: info"
        );
        let q = d.path(&format!("{name}.qcow2"));
        crate::image::convert(&img, &q, Format::Qcow2, &mut |_, _| {}).unwrap();
        let (ok, out) = qemu_img(&[
            "compare",
            "-f",
            fmt,
            img.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: {out}");
        let (ok, out) = qemu_img(&["check", q.to_str().unwrap()]);
        assert!(ok, "{name}: {out}");
    }
}

fn qemu_io(args: &[&str]) -> String {
    let o = Command::new("qemu-io").args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn header(p: &Path) -> crate::qcow2::Header {
    let f = std::fs::File::open(p).unwrap();
    crate::qcow2::Header::read(&f, p).unwrap()
}

fn check(p: &Path, repair: bool) -> crate::image::CheckOutcome {
    crate::image::check(p, repair, &mut |_, _| {}).unwrap()
}

/// `qemu-img check`'s exit status: 0 clean, 2 corruptions, 3 leaks only.
fn qemu_check_status(p: &Path) -> i32 {
    let o = Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .unwrap();
    o.status.code().unwrap_or(-1)
}

/// A qcow2 image of the 1 MiB pattern made by `qemu-img convert`, and the offset of its first
/// L2 table.
fn pattern_qcow2(d: &TempDir, seed: u8) -> (PathBuf, Vec<u8>, usize) {
    let raw = d.path("p.raw");
    let data = pattern(1 << 20, seed);
    std::fs::write(&raw, &data).unwrap();
    let q = d.path("p.qcow2");
    let (ok, out) = qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let v = std::fs::read(&q).unwrap();
    let l1 = u64::from_be_bytes(v[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(v[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    (q, data, l2)
}

/// A lazy-refcounts image QEMU abandoned mid-write (`qemu-io ... abort`: dirty bit set,
/// refcounts never written): check reports the refcount errors as repairable, repair rebuilds
/// them and `qemu-img check` is then clean with the data intact. Opening such an image
/// read-write repairs it too; the dirty bit is set while kvmbox has a lazy-refcounts image
/// open and cleared when it closes it.
#[test]
fn lazy_refcount_crash_is_reported_and_repaired() {
    let Some(_serial) = qemu_img_or_skip("lazy_refcount_crash_is_reported_and_repaired") else {
        return;
    };
    let d = TempDir::new("lazy");
    let q = d.path("l.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        q.to_str().unwrap(),
        "16M",
    ]);
    assert!(ok, "{out}");
    qemu_io(&[
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0x22 8M 64k",
        "-c",
        "abort",
        q.to_str().unwrap(),
    ]);
    assert!(header(&q).dirty(), "qemu-io abort left the image dirty");
    let copy = d.path("copy.qcow2");
    std::fs::copy(&q, &copy).unwrap();
    assert_eq!(
        qemu_check_status(&q),
        2,
        "qemu-img sees refcount errors too"
    );

    let found = check(&q, false).found.unwrap();
    assert!(found.corruptions > 0 && found.repairable, "{found:?}");
    assert!(found
        .problems
        .iter()
        .all(|p| p.kind != crate::meta::Kind::Mapping));
    let out = check(&q, true);
    let after = out.after_repair.expect("repaired");
    assert!(after.clean(), "{after:?}");
    assert!(!header(&q).dirty());
    assert_eq!(qemu_check_status(&q), 0);
    let said = qemu_io(&[
        "-r",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0x22 8M 64k",
        q.to_str().unwrap(),
    ]);
    assert!(!said.contains("verification failed"), "{said}");

    // Opening the dirty copy read-write repairs it; it stays marked dirty while open.
    let b = open(&spec(&copy)).unwrap();
    assert!(header(&copy).dirty(), "dirty while open (lazy refcounts)");
    let mut buf = vec![0u8; 65536];
    b.read_vectored_at(&mut [IoSliceMut::new(&mut buf)], 8 << 20)
        .unwrap();
    assert!(buf.iter().all(|&x| x == 0x22));
    b.write_vectored_at(&[IoSlice::new(&pattern(65536, 3))], 4 << 20)
        .unwrap();
    b.flush().unwrap();
    drop(b);
    assert!(!header(&copy).dirty(), "a clean close clears the dirty bit");
    assert_eq!(qemu_check_status(&copy), 0);
}

/// Leaked clusters (L2 entries dropped while their refcounts stay, as a crash between the two
/// updates leaves them): reported as leaks only, freed by repair, then `qemu-img check` is clean
/// and the contents are unchanged.
#[test]
fn leaked_clusters_are_reported_and_repaired() {
    let Some(_serial) = qemu_img_or_skip("leaked_clusters_are_reported_and_repaired") else {
        return;
    };
    let d = TempDir::new("leak");
    let (q, mut data, l2) = pattern_qcow2(&d, 9);
    let mut v = std::fs::read(&q).unwrap();
    for i in [2usize, 3] {
        v[l2 + i * 8..l2 + i * 8 + 8].fill(0);
        data[i << 16..(i + 1) << 16].fill(0);
    }
    std::fs::write(&q, &v).unwrap();
    assert_eq!(qemu_check_status(&q), 3);
    let found = check(&q, false).found.unwrap();
    assert_eq!((found.leaks, found.corruptions), (2, 0), "{found:?}");
    let after = check(&q, true).after_repair.expect("repaired");
    assert!(after.clean(), "{after:?}");
    assert_eq!(qemu_check_status(&q), 0);
    let b = open(&DiskSpec {
        read_only: true,
        ..spec(&q)
    })
    .unwrap();
    assert!(read_all(&*b) == data, "contents after repair");
}

/// Damaged tables (an L2 entry past the end of the file, two L2 entries sharing one data
/// cluster): reported as corruption, and `--repair` changes nothing.
#[test]
fn damaged_tables_are_reported_and_never_repaired() {
    let Some(_serial) = qemu_img_or_skip("damaged_tables_are_reported_and_never_repaired") else {
        return;
    };
    let d = TempDir::new("damage");
    let (q, _, l2) = pattern_qcow2(&d, 4);
    let mut v = std::fs::read(&q).unwrap();
    v[l2 + 8..l2 + 16].copy_from_slice(&((1u64 << 63) | (1 << 40)).to_be_bytes());
    let e2: [u8; 8] = v[l2 + 16..l2 + 24].try_into().unwrap();
    v[l2 + 24..l2 + 32].copy_from_slice(&e2);
    std::fs::write(&q, &v).unwrap();
    assert_eq!(qemu_check_status(&q), 2);
    let out = check(&q, true);
    let found = out.found.unwrap();
    assert!(found.corruptions > 0 && !found.repairable, "{found:?}");
    let said: Vec<&str> = found.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(
        said.iter()
            .any(|m| m.contains("exceeds the end of the image file"))
            && said.iter().any(|m| m.contains("overlapping allocations")),
        "{said:?}"
    );
    assert!(out.after_repair.is_none() && out.repair_refused.is_some());
    assert!(
        std::fs::read(&q).unwrap() == v,
        "the damaged image was changed"
    );
}

/// Internal snapshots: kvmbox's are listed and applied by `qemu-img snapshot`, QEMU's by
/// kvmbox, `qemu-img check` stays clean through create, apply and delete, and an image in use
/// is refused.
#[test]
fn snapshots_interoperate_with_qemu_img() {
    let Some(_serial) = qemu_img_or_skip("snapshots_interoperate_with_qemu_img") else {
        return;
    };
    use crate::snapshot;
    let d = TempDir::new("snap");
    let q = d.path("s.qcow2");
    let qs = q.to_str().unwrap();
    let (ok, out) = qemu_img(&["create", "-f", "qcow2", qs, "4M"]);
    assert!(ok, "{out}");
    let write = |data: &[u8]| {
        let b = open(&spec(&q)).unwrap();
        b.write_vectored_at(&[IoSlice::new(data)], 0).unwrap();
        b.flush().unwrap();
    };
    let first_mib = || {
        let b = open(&DiskSpec {
            read_only: true,
            ..spec(&q)
        })
        .unwrap();
        read_all(&*b)[..1 << 20].to_vec()
    };
    let a = pattern(1 << 20, 1);
    write(&a);
    snapshot::create(&q, "a").unwrap();
    let (ok, out) = qemu_img(&["snapshot", "-l", qs]);
    assert!(ok && out.contains(" a "), "{out}");
    assert_eq!(qemu_check_status(&q), 0);
    let bpat = pattern(512 << 10, 2);
    write(&bpat);
    let (ok, out) = qemu_img(&["snapshot", "-c", "qb", qs]);
    assert!(ok, "{out}");
    let names: Vec<String> = snapshot::list(&q)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["a", "qb"]);
    write(&pattern(1 << 20, 3));
    snapshot::apply(&q, "a").unwrap();
    assert!(first_mib() == a, "apply a");
    assert_eq!(qemu_check_status(&q), 0);
    snapshot::apply(&q, "qb").unwrap();
    let mut expect = a.clone();
    expect[..512 << 10].copy_from_slice(&bpat);
    assert!(first_mib() == expect, "apply qb (made by qemu-img)");
    let (ok, out) = qemu_img(&["snapshot", "-a", "a", qs]);
    assert!(
        ok && first_mib() == a,
        "qemu-img applied kvmbox's snapshot: {out}"
    );
    assert!(snapshot::create(&q, "a").is_err(), "duplicate name");
    assert!(snapshot::apply(&q, "nope")
        .unwrap_err()
        .to_string()
        .contains("no snapshot named 'nope'"));
    {
        let _user = open(&spec(&q)).unwrap();
        let e = snapshot::create(&q, "busy").unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
    }
    snapshot::delete(&q, "a").unwrap();
    let (ok, out) = qemu_img(&["snapshot", "-l", qs]);
    assert!(ok && !out.contains(" a ") && out.contains("qb"), "{out}");
    assert_eq!(qemu_check_status(&q), 0);
    snapshot::delete(&q, "qb").unwrap();
    assert!(snapshot::list(&q).unwrap().is_empty());
    assert_eq!(qemu_check_status(&q), 0);
    assert!(first_mib() == a, "contents after deleting every snapshot");
}

/// A loop device this test attached, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Block devices as disks: the size comes from `BLKGETSIZE64` (their metadata says 0), raw
/// reads and writes reach the backing file, and a qcow2 image on a block device opens too.
#[test]
fn block_devices_are_sized_by_ioctl() {
    let d = TempDir::new("loop");
    let file = d.path("backing.img");
    let data = pattern(4 << 20, 5);
    std::fs::write(&file, &data).unwrap();
    let attach = |f: &Path| {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(f)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !dev.is_empty()).then(|| Loop(dev))
    };
    let Some(dev) = attach(&file) else {
        println!("SKIP: block_devices_are_sized_by_ioctl: losetup could not attach a loop device");
        return;
    };
    let p = PathBuf::from(&dev.0);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0, "metadata of {p:?}");
    let b = open(&DiskSpec {
        format: Some(Format::Raw),
        ..spec(&p)
    })
    .unwrap();
    assert_eq!(b.size(), 4 << 20);
    assert!(read_all(&*b) == data);
    let w = pattern(8192, 6);
    b.write_vectored_at(&[IoSlice::new(&w)], 1 << 20).unwrap();
    b.flush().unwrap();
    drop(b);
    drop(dev);
    assert!(std::fs::read(&file).unwrap()[1 << 20..(1 << 20) + 8192] == w[..]);

    let Some(_serial) = qemu_img_or_skip("block_devices_are_sized_by_ioctl (qcow2 part)") else {
        return;
    };
    let q = d.path("q.qcow2");
    let raw = d.path("q.raw");
    std::fs::write(&raw, &data[..1 << 20]).unwrap();
    let (ok, out) = qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let dev = attach(&q).expect("a second loop device");
    let p = PathBuf::from(&dev.0);
    let b = open(&DiskSpec {
        read_only: true,
        ..spec(&p)
    })
    .unwrap();
    assert!(read_all(&*b) == data[..1 << 20], "qcow2 on {p:?}");
    drop(b);
    // Read-write: the table checks and the writes measure the device, not its inode (size 0).
    let b = open(&spec(&p)).unwrap();
    b.write_vectored_at(&[IoSlice::new(&w)], 4096).unwrap();
    let mut got = vec![0u8; w.len()];
    b.read_vectored_at(&mut [IoSliceMut::new(&mut got)], 4096)
        .unwrap();
    assert!(got == w, "qcow2 written on {p:?}");
}

/// zstd-compressed images (`compression_type=zstd`, made by `qemu-img convert -c` and by
/// `qemu-io write -c` into an overlay): kvmbox reads them bit-exact, read-only, with the
/// backing file showing through unallocated clusters; `kvmbox disk convert` of one matches
/// in `qemu-img compare`; read-write opens are refused by name. Dirty and corrupt images open
/// read-only through the same reader.
#[test]
fn zstd_images_read_bit_exact() {
    let Some(_serial) = qemu_img_or_skip("zstd_images_read_bit_exact") else {
        return;
    };
    let d = TempDir::new("zstd");
    let raw = d.path("z.raw");
    let mut data = pattern(3 << 20, 8);
    data[1 << 20..(1 << 20) + 65536].fill(0);
    std::fs::write(&raw, &data).unwrap();
    let z = d.path("z.qcow2");
    let (ok, out) = qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        raw.to_str().unwrap(),
        z.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert_eq!(header(&z).compression_type, 1);
    let ro = |p: &Path| {
        open(&DiskSpec {
            read_only: true,
            ..spec(p)
        })
        .unwrap()
    };
    assert!(read_all(&*ro(&z)) == data, "zstd image");
    let e = open(&spec(&z))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("z.qcow2") && e.contains("zstd"), "{e}");

    // An overlay on the raw pattern, some clusters written compressed with zstd.
    let ov = d.path("ov.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "-b",
        "z.raw",
        "-F",
        "raw",
        ov.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let said = qemu_io(&["-c", "write -c -P 0x3c 128k 128k", ov.to_str().unwrap()]);
    assert!(said.contains("wrote"), "{said}");
    data[128 << 10..256 << 10].fill(0x3c);
    assert!(read_all(&*ro(&ov)) == data, "zstd overlay over raw");

    let conv = d.path("conv.qcow2");
    crate::image::convert(&ov, &conv, Format::Qcow2, &mut |_, _| {}).unwrap();
    let (ok, out) = qemu_img(&["compare", ov.to_str().unwrap(), conv.to_str().unwrap()]);
    assert!(ok, "{out}");

    // Dirty and corrupt bits: read-only opens read the data.
    for bit in [1u8, 2] {
        let (q, want, _) = pattern_qcow2(&d, bit);
        let mut v = std::fs::read(&q).unwrap();
        v[79] |= bit;
        std::fs::write(&q, &v).unwrap();
        assert!(read_all(&*ro(&q)) == want, "incompatible bit {bit}");
        std::fs::remove_file(&q).unwrap();
    }
}

/// Every extent `block_status` reports from `b` covers the disk in order, and those it calls
/// zeroes read as zeroes in `expect`. Returns how many bytes it called zeroes.
fn walk_extents(b: &dyn crate::BlockBackend, expect: &[u8]) -> u64 {
    let (mut at, mut zeroes) = (0u64, 0);
    while at < b.size() {
        let e = b.block_status(at, b.size() - at).unwrap();
        assert!(e.len > 0 && at + e.len <= b.size(), "extent {e:?} at {at}");
        if !e.data {
            let r = &expect[at as usize..(at + e.len) as usize];
            assert!(
                r.iter().all(|&x| x == 0),
                "zero extent {e:?} at {at} has data"
            );
            zeroes += e.len;
        }
        at += e.len;
    }
    zeroes
}

/// `convert` reads only where the source may have data (holes of a raw file; unallocated and
/// zero clusters of a qcow2 image, with its backing file's data showing through) and copies
/// every byte that is there, for data at places that are not aligned to its 1 MiB steps and a
/// size that is not whole sectors; zeroes it found in data are not written.
#[test]
fn convert_follows_the_source_allocation_map() {
    // Images are locked: no qemu-img child of another test may hold a copy of a lock.
    let _serial = serial();
    use std::os::unix::fs::{FileExt, MetadataExt};
    let d = TempDir::new("convert-map");
    let size = (5u64 << 20) + 700;
    let raw = d.path("src.raw");
    let mut expect = vec![0u8; size as usize];
    {
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(size).unwrap();
        for (at, len, seed) in [
            (12288, 200_000, 1),
            ((1 << 20) + 4096, 1 << 20, 2),
            (size as usize - 1000, 1000, 3),
        ] {
            let p = pattern(len, seed);
            f.write_all_at(&p, at as u64).unwrap();
            expect[at..at + len].copy_from_slice(&p);
        }
        // Zeroes the file stores: read, found zero, not written.
        f.write_all_at(&vec![0u8; 256 << 10], 3 << 20).unwrap();
    }
    let s = open(&spec(&raw)).unwrap();
    // Where the filesystem reports holes (ext4, xfs, btrfs, tmpfs do), the leading one is seen.
    let holes = !s.block_status(0, size).unwrap().data;
    let zeroes = walk_extents(&*s, &expect);
    assert!(!holes || zeroes >= 3 << 20, "{zeroes} bytes of holes");
    drop(s);
    for format in [Format::Qcow2, Format::Raw] {
        let out = d.path(&format!("out.{format}"));
        crate::image::convert(&raw, &out, format, &mut |_, _| {}).unwrap();
        let o = open(&spec(&out)).unwrap();
        assert_eq!(o.size(), size.next_multiple_of(512));
        let got = read_all(&*o);
        assert!(got[..size as usize] == expect[..], "{format} copy differs");
        assert!(got[size as usize..].iter().all(|&x| x == 0));
        if holes {
            // Nothing was written over the stored zeroes or the holes: 1.2 MiB of data and
            // the last sector, in 64 KiB blocks, plus qcow2 metadata.
            let blocks = std::fs::metadata(&out).unwrap().blocks() * 512;
            assert!(blocks < 2 << 20, "{format}: {blocks} bytes allocated");
        }
    }

    // A qcow2 overlay: its own data, explicit zeroes over backing data, the backing file's
    // data through unallocated clusters, and the backing file's holes.
    let ov = d.path("ov.qcow2");
    // Its size is the backing file's, rounded up to whole sectors.
    crate::image::create(
        &ov,
        size.next_multiple_of(512),
        Format::Qcow2,
        Some("src.raw"),
    )
    .unwrap();
    let mut expect_ov = expect.clone();
    expect_ov.resize(size.next_multiple_of(512) as usize, 0);
    {
        let b = open(&spec(&ov)).unwrap();
        let w = pattern(70_000 / 512 * 512, 4);
        b.write_vectored_at(&[IoSlice::new(&w)], (2 << 20) + 1536)
            .unwrap();
        expect_ov[(2 << 20) + 1536..(2 << 20) + 1536 + w.len()].copy_from_slice(&w);
        b.write_zeroes(1 << 20, 256 << 10, false).unwrap();
        expect_ov[1 << 20..(1 << 20) + (256 << 10)].fill(0);
        b.flush().unwrap();
        assert!(walk_extents(&*b, &expect_ov) >= 256 << 10);
    }
    let out = d.path("ov.raw");
    crate::image::convert(&ov, &out, Format::Raw, &mut |_, _| {}).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == expect_ov,
        "overlay copy differs"
    );
}

/// Reads served from the qcow2 backend's cache of data cluster places see every change to the
/// mapping: a discard (the host cluster may then hold another guest cluster), write-zeroes,
/// writes in place, a shrink and regrow, and clusters shared with an internal snapshot (not
/// cached; a write copies them).
#[test]
fn cached_cluster_places_follow_every_mapping_change() {
    // Images are locked: no qemu-img child of another test may hold a copy of a lock.
    let _serial = serial();
    use crate::BlockBackend;
    const C: usize = 64 << 10;
    let d = TempDir::new("mapcache");
    let img = d.path("a.qcow2");
    crate::image::create(&img, 4 << 20, Format::Qcow2, None).unwrap();
    let backend = || {
        let f = crate::open_image_file(&img, true).unwrap();
        crate::Qcow2Backend::open(f, &img, false, true).unwrap()
    };
    let read = |b: &dyn crate::BlockBackend, cluster: usize| {
        // Two 4 KiB reads inside the cluster: the first learns its place, the second uses it.
        let mut v = vec![0u8; C];
        for (i, part) in v.chunks_mut(C / 2).enumerate() {
            let at = (cluster * C + i * C / 2) as u64;
            b.read_vectored_at(&mut [IoSliceMut::new(&mut part[..4096])], at)
                .unwrap();
            b.read_vectored_at(&mut [IoSliceMut::new(&mut part[4096..])], at + 4096)
                .unwrap();
        }
        v
    };
    let mut expect: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; C]).collect();
    let write = |b: &dyn crate::BlockBackend, e: &mut Vec<Vec<u8>>, cluster: usize, seed| {
        let p = pattern(C, seed);
        b.write_vectored_at(&[IoSlice::new(&p)], (cluster * C) as u64)
            .unwrap();
        e[cluster] = p;
    };
    {
        let b = backend();
        for c in 0..4 {
            write(&b, &mut expect, c, c as u8 + 1);
            assert!(read(&b, c) == expect[c], "cluster {c}");
        }
        b.discard(C as u64, C as u64).unwrap();
        expect[1].fill(0);
        write(&b, &mut expect, 10, 20);
        b.write_zeroes(2 * C as u64, C as u64, false).unwrap();
        expect[2].fill(0);
        write(&b, &mut expect, 3, 30);
        for c in [0, 1, 2, 3, 10] {
            assert!(
                read(&b, c) == expect[c],
                "cluster {c} after discard/zeroes/rewrite"
            );
        }
        b.resize(2 * C as u64).unwrap();
        b.resize(4 << 20).unwrap();
        expect[3].fill(0);
        expect[10].fill(0);
        for c in [0, 1, 3, 10] {
            assert!(
                read(&b, c) == expect[c],
                "cluster {c} after shrink and regrow"
            );
        }
    }
    crate::snapshot::create(&img, "s1").unwrap();
    let b = backend();
    assert!(read(&b, 0) == expect[0]);
    write(&b, &mut expect, 0, 40);
    assert!(read(&b, 0) == expect[0], "shared cluster after its copy");
    drop(b);
    crate::snapshot::apply(&img, "s1").unwrap();
    let b = backend();
    assert!(
        read(&b, 0) == pattern(C, 1),
        "the snapshot kept the old cluster"
    );
}

/// Tables pointing far past the end of the file (the `image_open` fuzz target's slow inputs: an
/// L1 entry at 48 GiB in a 4 KiB image, whose L2 table the flush at close wrote there, so that
/// checking the sparse 48 GiB file took seconds) never make kvmbox write there: a read-write
/// open refuses a damaged L1 entry or refcount table entry by name, a data cluster past the end
/// fails the write that reaches it, and the file keeps its size; read-only opens still read.
#[test]
fn tables_past_the_end_of_the_file_never_grow_it() {
    // Images are locked: no qemu-img child of another test may hold a copy of a lock.
    let _serial = serial();
    use crate::BlockBackend;
    use std::os::unix::fs::FileExt;
    const FAR: u64 = 0xc_0000_0000 | 1 << 63;
    let d = TempDir::new("far");
    let img = d.path("a.qcow2");
    crate::image::create(&img, 1 << 20, Format::Qcow2, None).unwrap();
    let p = pattern(65536, 5);
    {
        let b = open(&spec(&img)).unwrap();
        b.write_vectored_at(&[IoSlice::new(&p)], 0).unwrap();
    }
    let h = header(&img);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let entry = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let set = |at: u64, v: u64| f.write_all_at(&v.to_be_bytes(), at).unwrap();
    let len = f.metadata().unwrap().len();
    let (l1e, rt1) = (entry(h.l1_offset), h.refcount_table_offset + 8);
    let l2e = l1e & 0x00ff_ffff_ffff_fe00;
    let good_l2 = entry(l2e);
    let open_rw = || {
        let file = crate::open_image_file(&img, true).unwrap();
        crate::Qcow2Backend::open(file, &img, false, false)
    };
    let read0 = |b: &dyn BlockBackend| {
        let mut buf = vec![0u8; 4096];
        b.read_vectored_at(&mut [IoSliceMut::new(&mut buf)], 0)
            .map(|()| buf)
    };

    // A data cluster past the end: writing it fails, the rest of the disk works.
    set(l2e, FAR);
    {
        let b = open_rw().unwrap();
        assert!(read0(&b).unwrap().iter().all(|&x| x == 0));
        let e = b.write_vectored_at(&[IoSlice::new(&p[..4096])], 0);
        assert!(e.is_err(), "write through a data cluster past the end");
        b.write_vectored_at(&[IoSlice::new(&p)], 1 << 19).unwrap();
    }
    assert!(f.metadata().unwrap().len() < len + (1 << 20));
    set(l2e, good_l2);

    // An L2 table past the end: refused for writing, read-only reads zeroes.
    set(h.l1_offset, FAR);
    let e = open_rw().err().expect("read-write open").to_string();
    assert!(
        e.contains("L1 entry 0") && e.contains("past the end"),
        "{e}"
    );
    let ro = open(&DiskSpec {
        read_only: true,
        ..spec(&img)
    })
    .unwrap();
    assert!(read0(&*ro).map_or(true, |b| b.iter().all(|&x| x == 0)));
    drop(ro);
    set(h.l1_offset, l1e);

    // A refcount block past the end.
    set(rt1, 0xc_0000_0000);
    let e = open_rw().err().expect("read-write open").to_string();
    assert!(
        e.contains("refcount block 1") && e.contains("past the end"),
        "{e}"
    );
    set(rt1, 0);

    assert!(
        f.metadata().unwrap().len() < len + (1 << 20),
        "the file grew"
    );
    let b = open_rw().unwrap();
    assert!(read0(&b).unwrap() == p[..4096]);
}

/// A version 2 image has no dirty bit, so a kill of a writer between imago's L1 write and its
/// refcount write leaves nothing saying so: kvmbox checks every v2 image it opens read-write
/// and rebuilds its refcounts when needed. The crash state (an L2 table whose refcount is 0) is
/// made by hand; `qemu-img check` sees it, and after kvmbox opened and wrote the image, sees
/// nothing wrong.
#[test]
fn version_2_images_are_checked_and_repaired_at_read_write_open() {
    use std::os::unix::fs::FileExt;
    let Some(_serial) =
        qemu_img_or_skip("version_2_images_are_checked_and_repaired_at_read_write_open")
    else {
        return;
    };
    let d = TempDir::new("v2");
    let img = d.path("v2.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        img.to_str().unwrap(),
        "1M",
    ]);
    assert!(ok, "{out}");
    let p = pattern(65536, 8);
    let write = |at: u64| {
        let b = open(&spec(&img)).unwrap();
        b.write_vectored_at(&[IoSlice::new(&p)], at).unwrap();
    };
    write(0);
    let h = header(&img);
    assert_eq!(h.version, 2);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let be = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let l2 = be(h.l1_offset) & 0x00ff_ffff_ffff_fe00;
    let refblock = be(h.refcount_table_offset);
    // 16-bit refcounts (the only width v2 has).
    f.write_all_at(&[0, 0], refblock + 2 * (l2 / h.cluster_size()))
        .unwrap();
    assert_eq!(
        qemu_check_status(&img),
        2,
        "the crash state is a corruption"
    );
    write(1 << 19);
    let (ok, out) = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(ok && out.contains("No errors"), "{out}");
    let b = open(&spec(&img)).unwrap();
    let mut got = vec![0u8; 65536];
    for at in [0, 1 << 19] {
        b.read_vectored_at(&mut [IoSliceMut::new(&mut got)], at)
            .unwrap();
        assert!(got == p, "data at {at}");
    }
}

/// Closing an image releases its locks at once, even while a child process (here one that
/// another thread forked and that has not executed its program yet) holds a copy of its
/// descriptor: reopening it read-write right away works, for raw and for qcow2.
#[test]
fn closing_an_image_unlocks_it_while_a_forked_child_holds_its_descriptor() {
    let _serial = serial();
    let d = TempDir::new("unlock");
    let raw = d.path("a.img");
    std::fs::write(&raw, vec![0u8; 1 << 16]).unwrap();
    let qcow2 = d.path("b.qcow2");
    crate::image::create(&qcow2, 1 << 20, Format::Qcow2, None).unwrap();
    for img in [&raw, &qcow2] {
        let b = open(&spec(img)).unwrap();
        let child = fork_holding_descriptors(1_000_000);
        drop(b);
        let again = open(&spec(img)).map(|_| ());
        wait_for(child);
        again.unwrap_or_else(|e| panic!("{}: reopened while a child holds it: {e}", img.display()));
    }
}

/// A child process that holds copies of all this process's descriptors for `micros`
/// microseconds, then exits (as a child another thread is starting holds them until it
/// executes its program).
fn fork_holding_descriptors(micros: u32) -> libc::pid_t {
    // SAFETY: the child only sleeps and exits (both async-signal-safe).
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        // SAFETY: see above.
        unsafe {
            libc::usleep(micros);
            libc::_exit(0);
        }
    }
    child
}

/// Reap our own child.
fn wait_for(child: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waiting for a child of this process.
    unsafe { libc::waitpid(child, &mut status, 0) };
}

/// An image that opens, locks and then turns out unusable (a bad header) is unlocked before
/// `open` returns the error, not when its descriptor's last copy goes: while another thread
/// keeps forking children that hold copies of every descriptor for a while, a good image
/// written in its place opens read-write right away, every time.
#[test]
fn a_refused_image_is_unlocked_while_forked_children_hold_its_descriptor() {
    let _serial = serial();
    let d = TempDir::new("refused");
    let p = d.path("a.qcow2");
    crate::image::create(&p, 1 << 20, Format::Qcow2, None).unwrap();
    let good = std::fs::read(&p).unwrap();
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&9u32.to_be_bytes());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut children = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                children.push(fork_holding_descriptors(100_000));
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            children.into_iter().for_each(wait_for);
        })
    };
    let mut refused = 0;
    for _ in 0..300 {
        std::fs::write(&p, &bad).unwrap();
        let e = open(&spec(&p))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("version 9"), "{e}");
        std::fs::write(&p, &good).unwrap();
        if let Err(e) = open(&spec(&p)) {
            refused += 1;
            eprintln!("reopened right after a refusal: {e}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    forker.join().unwrap();
    assert_eq!(refused, 0, "a refused image stayed locked");
}

/// A snapshot taken on an open backend (a live snapshot, `snapshot_create` on the VM's own
/// descriptor): the writes after it change the active image only (shared clusters are copied,
/// also those whose data comes from the backing file), the snapshot keeps the contents it was
/// taken with, `qemu-img check` is clean and `qemu-img snapshot -l` lists it; a second one is
/// deleted again through the open backend; a duplicate name is refused and changes nothing.
#[test]
fn snapshot_of_an_open_backend_keeps_its_contents_while_writes_go_on() {
    let Some(_serial) = qemu_img_or_skip("snapshot_of_an_open_backend_keeps_its_contents") else {
        return;
    };
    use crate::BlockBackend;
    const C: usize = 64 << 10;
    let d = TempDir::new("livesnap");
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    crate::image::create(&base, 4 << 20, Format::Qcow2, None).unwrap();
    {
        let b = open(&spec(&base)).unwrap();
        b.write_vectored_at(&[IoSlice::new(&pattern(4 << 20, 9))], 0)
            .unwrap();
        b.flush().unwrap();
    }
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let mut expect = pattern(4 << 20, 9);
    let write = |b: &dyn BlockBackend, e: &mut Vec<u8>, at: usize, len: usize, seed| {
        let p = pattern(len, seed);
        b.write_vectored_at(&[IoSlice::new(&p)], at as u64).unwrap();
        e[at..at + len].copy_from_slice(&p);
    };
    let b = open(&spec(&top)).unwrap();
    // Whole clusters, a cluster written in part, clusters far apart (several L2 entries).
    write(&*b, &mut expect, 0, 3 * C, 1);
    write(&*b, &mut expect, 5 * C + 512, 4096, 2);
    write(&*b, &mut expect, 40 * C, C, 3);
    assert!(read_all(&*b) == expect);
    b.snapshot_create("vm-live").unwrap();
    let at_snapshot = expect.clone();
    assert!(read_all(&*b) == expect, "contents right after the snapshot");
    // Writes into shared clusters (copied first), part of a shared cluster, a cluster of the
    // backing file, and a new cluster.
    write(&*b, &mut expect, C, C, 4);
    write(&*b, &mut expect, 2 * C + 1024, 512, 5);
    write(&*b, &mut expect, 5 * C, 512, 6);
    write(&*b, &mut expect, 20 * C, C, 7);
    assert!(
        read_all(&*b) == expect,
        "contents after writes past the snapshot"
    );
    b.snapshot_create("vm-second").unwrap();
    let e = b.snapshot_create("vm-live").unwrap_err().to_string();
    assert!(e.contains("a snapshot named 'vm-live' exists"), "{e}");
    write(&*b, &mut expect, 0, 512, 8);
    assert_eq!(b.snapshot_names().unwrap(), ["vm-live", "vm-second"]);
    b.snapshot_delete("vm-second").unwrap();
    assert_eq!(b.snapshot_names().unwrap(), ["vm-live"]);
    // Read without the lock the open image holds, as `kvmbox vm` checks a running VM's disks.
    assert_eq!(crate::snapshot::names_unlocked(&top).unwrap(), ["vm-live"]);
    write(&*b, &mut expect, 3 * C, C, 10);
    b.flush().unwrap();
    assert!(
        read_all(&*b) == expect,
        "contents after a second snapshot and its deletion"
    );
    drop(b);
    assert_eq!(
        qemu_check_status(&top),
        0,
        "qemu-img check after the writes"
    );
    let (ok, out) = qemu_img(&["snapshot", "-l", top.to_str().unwrap()]);
    assert!(
        ok && out.contains("vm-live") && !out.contains("vm-second"),
        "{out}"
    );
    let ro = || {
        open(&DiskSpec {
            read_only: true,
            ..spec(&top)
        })
        .unwrap()
    };
    assert!(read_all(&*ro()) == expect, "contents after reopening");
    crate::snapshot::apply(&top, "vm-live").unwrap();
    assert!(read_all(&*ro()) == at_snapshot, "the snapshot's contents");
    assert_eq!(qemu_check_status(&top), 0, "qemu-img check after applying");
    // A read-only backend refuses.
    let e = ro().snapshot_create("x").unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
}
