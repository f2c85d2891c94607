//! Finding and initialising the ONNX Runtime shared library.
//!
//! metac links ONNX Runtime dynamically (ort's `load-dynamic` feature) so that the binary builds and runs
//! without it; the library is found at run time, in order:
//!
//! 1. `ORT_DYLIB_PATH`, if set: the user said exactly which file to use, so a missing file is an error,
//!    not a reason to keep searching;
//! 2. the `onnxruntime` Python package (`python3`, then `python`): the documented install route is
//!    `pip install onnxruntime==1.31.1`, whose wheel ships `onnxruntime/capi/libonnxruntime.so.<ver>`;
//! 3. the system library search path (`libonnxruntime.so` via `dlopen`), for system-wide installs.
//!
//! ort itself would `panic!` if asked to use the library without a successful load, and it only accepts
//! one library and one environment per process. So everything here runs once, behind a `OnceLock`, and the
//! library is opened and version-checked by us first, so failures come back as `Err` with a reason.

use std::ffi::{CStr, OsStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// The ONNX Runtime release metac is tested against (and the version `pip install` instructions name).
pub const PINNED_ORT_VERSION: &str = "1.31.1";
/// Appended to every "ONNX Runtime unavailable" message so users know the fix.
pub const INSTALL_HINT: &str =
    "Install with: pip install onnxruntime==1.31.1, or set ORT_DYLIB_PATH";

/// ort 2.0.0-rc.15 is compiled against C API version 31 and refuses older libraries.
const MIN_MINOR: u32 = 31;

/// A loaded, initialised ONNX Runtime: the process-wide environment every session is created in.
pub(crate) struct OrtRuntime {
    pub env: ort::environment::Environment,
    pub dylib: PathBuf,
    pub version: String,
}

static ORT_RUNTIME: OnceLock<std::result::Result<OrtRuntime, String>> = OnceLock::new();

/// Returns the process's ONNX Runtime, locating and initialising it on first use.
///
/// The outcome, failure included, is cached: the library cannot be unloaded or swapped once ort has it, and
/// re-running discovery (which spawns Python) for every `open_backend` call would be slow and noisy.
pub(crate) fn ort_runtime() -> Result<&'static OrtRuntime> {
    ORT_RUNTIME
        .get_or_init(|| {
            let env_value = std::env::var_os("ORT_DYLIB_PATH");
            init_ort(env_value.as_deref()).map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn init_ort(env_value: Option<&OsStr>) -> Result<OrtRuntime> {
    let dylib = resolve_dylib_path(env_value)?;
    let version = probe_library(&dylib)?;
    if !version.starts_with("1.31.") {
        // Newer libraries usually work (ort only warns at debug level), but numerics and op coverage are
        // only validated against the pinned release, so say so once.
        eprintln!(
            "metac: warning: ONNX Runtime at {} is version {version}, but metac is tested with {PINNED_ORT_VERSION}; results may differ",
            dylib.display()
        );
    }
    let env = build_environment(&dylib)?;
    tracing::info!(path = %dylib.display(), %version, "loaded ONNX Runtime");
    Ok(OrtRuntime {
        env,
        dylib,
        version,
    })
}

/// Threads of the process-wide intra-op pool: the cores this process may use
/// (the standard library's figure honours CPU affinity and cgroup quotas).
///
/// One pool serves every session. L2O alternates between several graphs
/// many times a second; with a pool per session, the threads of the graph
/// that just finished spin-wait for more work while the next graph's threads
/// need the same cores (a separate objective graph ran at half speed that
/// way). Sessions asking for another thread count get a pool of their own.
pub fn global_pool_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Hands the library to ort and creates the one environment ort allows per process.
fn build_environment(dylib: &Path) -> Result<ort::environment::Environment> {
    // `init_from` returns `Err` for load failures in rc.15, but the API getter behind it still has
    // `expect`s; `probe_library` has already ruled out the known causes, and this catches anything else.
    let built = std::panic::catch_unwind(|| -> Result<ort::environment::Environment> {
        let builder = ort::init_from(dylib)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("ort could not load {}", dylib.display()))?;
        // One intra-op thread pool for every session (see `GLOBAL_POOL_THREADS`).
        let pool = ort::environment::GlobalThreadPoolOptions::default()
            .with_intra_threads(global_pool_threads())
            .and_then(|p| p.with_inter_threads(1))
            .map_err(|e| anyhow!("{e}"))?;
        // Telemetry off: a research tool should not phone home from users' training runs.
        let env = builder
            .with_name("metac")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()?;
        Ok(env)
    });
    match built {
        Ok(r) => r.context("initialising ONNX Runtime"),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            bail!(
                "initialising ONNX Runtime from {} panicked: {msg}",
                dylib.display()
            )
        }
    }
}

/// Opens `path`, checks it exports the ONNX Runtime C API, and returns its version string (e.g. `1.31.1`).
///
/// The handle is deliberately leaked: ort opens the same file again (the OS shares the mapping), and ONNX
/// Runtime does not support being unloaded while sessions or its thread pools may still exist.
fn probe_library(path: &Path) -> Result<String> {
    // SAFETY: loading a shared library runs its initialisers; this is the library the user installed as
    // ONNX Runtime, which is exactly what ort would load next anyway.
    let lib = unsafe { libloading::Library::new(path) }
        .with_context(|| format!("could not load {} as a shared library", path.display()))?;
    let version = {
        // SAFETY: `OrtGetApiBase` has this signature in every ONNX Runtime release (it is the stable
        // entry point of the C API).
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            unsafe { lib.get(b"OrtGetApiBase") }.with_context(|| {
                format!(
                    "{} does not export OrtGetApiBase; it is not an ONNX Runtime library",
                    path.display()
                )
            })?;
        let base = unsafe { get_base() };
        if base.is_null() {
            bail!("{}: OrtGetApiBase returned null", path.display());
        }
        // SAFETY: non-null `OrtApiBase` points to a static table; the version string is static too.
        let raw = unsafe { ((*base).GetVersionString)() };
        if raw.is_null() {
            bail!("{}: GetVersionString returned null", path.display());
        }
        unsafe { CStr::from_ptr(raw) }
            .to_string_lossy()
            .into_owned()
    };
    std::mem::forget(lib);

    let mut parts = version.split('.');
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(1), Some(m)) if m >= MIN_MINOR => Ok(version),
        _ => bail!(
            "ONNX Runtime at {} is version {version}, but metac needs 1.{MIN_MINOR} or newer (tested with {PINNED_ORT_VERSION})",
            path.display()
        ),
    }
}

/// Chooses the ONNX Runtime library to load. `env_value` is the value of `ORT_DYLIB_PATH` (passed in, not
/// read here, so tests can exercise it without touching process-global state).
///
/// The error lists every place that was tried, on one line, so it can be shown in a one-line notice.
pub fn resolve_dylib_path(env_value: Option<&OsStr>) -> Result<PathBuf> {
    if let Some(v) = env_value.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if !p.is_file() {
            bail!(
                "ORT_DYLIB_PATH is set to {}, but no such file exists",
                p.display()
            );
        }
        // Absolute, because ort resolves relative paths against the executable's directory instead of
        // the working directory the user meant.
        return Ok(std::fs::canonicalize(&p).unwrap_or(p));
    }

    let mut tried = vec!["ORT_DYLIB_PATH (not set)".to_string()];
    for python in ["python3", "python"] {
        match python_package_dir(python) {
            Ok(dir) => {
                let capi = dir.join("capi");
                match find_library_in_dir(&capi) {
                    Some(lib) => return Ok(lib),
                    None => tried.push(format!(
                        "{python}: no ONNX Runtime library in {}",
                        capi.display()
                    )),
                }
            }
            Err(e) => tried.push(format!("{python}: {e}")),
        }
    }

    let system_name = system_library_name();
    // SAFETY: as in `probe_library`; a library found under the ONNX Runtime name is what ort would load.
    match unsafe { libloading::Library::new(system_name) } {
        Ok(lib) => {
            std::mem::forget(lib);
            return Ok(PathBuf::from(system_name));
        }
        Err(_) => tried.push(format!("system library path: {system_name} not found")),
    }
    bail!(
        "could not find the ONNX Runtime library (tried {})",
        tried.join("; ")
    )
}

fn system_library_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "libonnxruntime.dylib"
    } else if cfg!(windows) {
        "onnxruntime.dll"
    } else {
        "libonnxruntime.so"
    }
}

/// Asks `python` where the installed `onnxruntime` package lives.
fn python_package_dir(python: &str) -> Result<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .map_err(|e| anyhow!("could not run {python} ({e})"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!("`import onnxruntime` failed ({})", last.trim());
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dir.is_empty() {
        bail!("printed no package directory");
    }
    Ok(PathBuf::from(dir))
}

/// Picks the ONNX Runtime library inside a directory such as `site-packages/onnxruntime/capi`.
///
/// Wheels ship the real file under its full version (`libonnxruntime.so.1.31.1`), sometimes next to
/// symlinks (`libonnxruntime.so`, `libonnxruntime.so.1`) and always next to provider plug-ins
/// (`libonnxruntime_providers_*.so`), which must not be picked. Regular files win over symlinks, then the
/// most specific (longest) name.
pub fn find_library_in_dir(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut best: Option<(bool, usize, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_ort_library_name(name) {
            continue;
        }
        let path = entry.path();
        let is_regular = std::fs::symlink_metadata(&path)
            .map(|m| m.file_type().is_file())
            .unwrap_or(false);
        if !is_regular && !path.is_file() {
            continue; // dangling symlink or directory
        }
        let key = (is_regular, name.len());
        if best.as_ref().is_none_or(|(r, l, _)| key > (*r, *l)) {
            best = Some((key.0, key.1, path));
        }
    }
    best.map(|(_, _, p)| p)
}

fn is_ort_library_name(name: &str) -> bool {
    if cfg!(target_os = "macos") {
        // libonnxruntime.dylib, libonnxruntime.1.31.1.dylib
        name.strip_prefix("libonnxruntime")
            .is_some_and(|rest| rest.ends_with(".dylib") && rest.starts_with('.'))
    } else if cfg!(windows) {
        name.eq_ignore_ascii_case("onnxruntime.dll")
    } else {
        // libonnxruntime.so, libonnxruntime.so.1, libonnxruntime.so.1.31.1
        name == "libonnxruntime.so" || name.starts_with("libonnxruntime.so.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_path_that_does_not_exist_is_an_error_naming_it() {
        let err =
            resolve_dylib_path(Some(OsStr::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("ORT_DYLIB_PATH") && msg.contains("/nonexistent/libonnxruntime.so"),
            "{msg}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn picks_the_versioned_library_not_providers_or_symlinks() {
        let dir = std::env::temp_dir().join(format!("metac-discovery-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libonnxruntime.so.1.31.1"), b"x").unwrap();
        std::fs::write(dir.join("libonnxruntime_providers_shared.so"), b"x").unwrap();
        std::fs::write(dir.join("libonnxruntime_providers_cuda.so"), b"x").unwrap();
        std::os::unix::fs::symlink(
            dir.join("libonnxruntime.so.1.31.1"),
            dir.join("libonnxruntime.so"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            dir.join("libonnxruntime.so.1.31.1"),
            dir.join("libonnxruntime.so.1.31.1.longer-link"),
        )
        .unwrap();
        let got = find_library_in_dir(&dir).unwrap();
        assert_eq!(got.file_name().unwrap(), "libonnxruntime.so.1.31.1");
        assert!(find_library_in_dir(&dir.join("missing")).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn library_that_is_not_onnx_runtime_is_rejected() {
        // Any file that exists but is not a shared library must give an Err, not a crash.
        let exe = std::env::current_exe().unwrap();
        let resolved = resolve_dylib_path(Some(exe.as_os_str())).unwrap();
        assert!(probe_library(&resolved).is_err());
    }
}
