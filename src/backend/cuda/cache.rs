//! The on-disk cache of compiled kernels: one file per kernel source, architecture and compiler,
//! so a device opens in milliseconds after the first time instead of recompiling.
//!
//! Where: `$RLHF_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/rlhf/kernels`, else
//! `~/.cache/rlhf/kernels`. An entry's name holds a hash of everything that decides the compiled
//! bytes — the kernel file's source and `common.cuh` (the only header kernels include), the
//! compile options, the target architecture and NVRTC's version — so a change to any of them is
//! a miss and stale code is never loaded. Entries are written to a temporary name and renamed,
//! so a reader never sees a partial file, even with several processes compiling at once.

use super::Target;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a cache entry depends on.
#[derive(Clone, Copy, Debug)]
pub struct KeyInputs<'a> {
    /// The kernel file's name, as in `kernels/` (`logprob.cu`).
    pub file: &'a str,
    /// Its source.
    pub source: &'a str,
    /// The source of `common.cuh`.
    pub common: &'a str,
    /// The NVRTC options, in order.
    pub options: &'a [String],
    /// The architecture compiled for.
    pub target: Target,
    /// NVRTC's (major, minor) version.
    pub nvrtc: (i32, i32),
}

/// FNV-1a, 64-bit: a hash written out here rather than std's, whose algorithm may change between
/// Rust releases (a cache key must mean the same thing to every build that reads it).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// A field, length first, so that no two different field lists give the same byte stream.
    fn field(&mut self, b: &[u8]) {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
    }
}

/// The hash that names an entry.
pub fn key(k: &KeyInputs<'_>) -> u64 {
    let mut h = Fnv::new();
    h.field(b"rlhf kernel cache v1");
    h.field(k.file.as_bytes());
    h.field(k.source.as_bytes());
    h.field(k.common.as_bytes());
    h.field(&(k.options.len() as u64).to_le_bytes());
    for o in k.options {
        h.field(o.as_bytes());
    }
    h.field(k.target.name().as_bytes());
    h.field(format!("{}.{}", k.nvrtc.0, k.nvrtc.1).as_bytes());
    h.0
}

/// An entry's file name: `logprob.sm_90.<key>.cubin`, readable at a glance.
pub fn entry_name(k: &KeyInputs<'_>) -> String {
    let stem = k.file.strip_suffix(".cu").unwrap_or(k.file);
    format!(
        "{stem}.{}.{:016x}.{}",
        k.target.name(),
        key(k),
        k.target.extension()
    )
}

/// The cache directory from the environment's values (module docs); `None` when none is set.
pub fn dir_from(
    rlhf_cache_dir: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let nonempty = |v: Option<OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    let root = nonempty(rlhf_cache_dir)
        .or_else(|| nonempty(xdg_cache_home).map(|x| x.join("rlhf")))
        .or_else(|| nonempty(home).map(|h| h.join(".cache/rlhf")))?;
    Some(root.join("kernels"))
}

/// The cache directory of this process's environment.
pub fn dir() -> Option<PathBuf> {
    dir_from(
        std::env::var_os("RLHF_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// The entry `name` of `dir`, if present and readable (anything else is a miss).
pub fn read(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

/// Writes the entry `name` of `dir` (created if needed): to a name unique to this process and
/// moment, then renamed over `name`, so readers see the old entry or the whole new one.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, dir.join(name))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
