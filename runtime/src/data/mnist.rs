//! MNIST from IDX files (gzip-compressed or raw), verified on load.
//!
//! The standard split: the first 55,000 training images for training, the
//! last 5,000 for validation, and the 10,000 test images. Pixels are kept
//! as bytes (a quarter of the memory of floats: 55 MB instead of 220 MB for
//! the whole set) and scaled to [0, 1] when rows are gathered.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

pub const IMAGE_MAGIC: u32 = 2051;
pub const LABEL_MAGIC: u32 = 2049;
pub const PIXELS: usize = 28 * 28;
pub const TRAIN_SIZE: usize = 55_000;

/// Images (row-major `[n, 784]` bytes, 0..=255) and labels (0..=9).
#[derive(Clone, Debug)]
pub struct Split {
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Append image `i`, scaled to [0, 1], to `out`.
    pub fn push_image(&self, i: usize, out: &mut Vec<f32>) {
        out.extend(
            self.pixels[i * PIXELS..(i + 1) * PIXELS]
                .iter()
                .map(|&p| f32::from(p) / 255.0),
        );
    }
    /// Images `rows`, scaled to [0, 1], transposed: `[784, rows.len()]`
    /// (pixel-major), made straight from the bytes a block of images at a
    /// time, so that neither the images nor their transpose is copied again.
    pub fn images_transposed(&self, rows: &[usize]) -> Vec<f32> {
        const BLOCK: usize = 64;
        let n = rows.len();
        let mut out = vec![0.0f32; n * PIXELS];
        for (b, block) in rows.chunks(BLOCK).enumerate() {
            let i0 = b * BLOCK;
            for p in 0..PIXELS {
                let dst = &mut out[p * n + i0..p * n + i0 + block.len()];
                for (d, &r) in dst.iter_mut().zip(block) {
                    *d = f32::from(self.pixels[r * PIXELS + p]) / 255.0;
                }
            }
        }
        out
    }

    /// The first `n` images, scaled to [0, 1], row-major `[n, 784]`.
    pub fn images_f32(&self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * PIXELS);
        for i in 0..n {
            self.push_image(i, &mut out);
        }
        out
    }
    fn range(&self, a: usize, b: usize) -> Split {
        Split {
            pixels: self.pixels[a * PIXELS..b * PIXELS].to_vec(),
            labels: self.labels[a..b].to_vec(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Mnist {
    pub train: Split,
    pub validation: Split,
    pub test: Split,
}

/// The data directory shipped with the project (`data/mnist`), found from
/// the current directory or the executable's location.
pub fn default_dir() -> PathBuf {
    let rel = Path::new("data").join("mnist");
    let mut candidates = vec![rel.clone()];
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1) {
            candidates.push(anc.join(&rel));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&rel));
    candidates.into_iter().find(|p| p.is_dir()).unwrap_or(rel)
}

/// Find `stem` or `stem.gz` in `dir`.
fn locate(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{}: missing MNIST file {stem}(.gz)", dir.display())
}

/// Read a file, decompressing it if it is gzip (by content, not by name).
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// Parse an IDX3 image file into `[n, 784]` pixel bytes.
pub fn parse_images(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    ensure!(
        bytes.len() >= 16,
        "{what}: too short for an IDX image header ({} bytes)",
        bytes.len()
    );
    let magic = be_u32(bytes, 0);
    ensure!(
        magic == IMAGE_MAGIC,
        "{what}: magic number {magic}, expected {IMAGE_MAGIC} (an IDX3 image file)"
    );
    let (n, rows, cols) = (
        be_u32(bytes, 4) as usize,
        be_u32(bytes, 8) as usize,
        be_u32(bytes, 12) as usize,
    );
    ensure!(
        rows == 28 && cols == 28,
        "{what}: images are {rows}x{cols}, expected 28x28"
    );
    let want = 16 + n * PIXELS;
    ensure!(
        bytes.len() == want,
        "{what}: header says {n} images ({want} bytes) but the file has {} bytes",
        bytes.len()
    );
    Ok(bytes[16..].to_vec())
}

/// Parse an IDX1 label file.
pub fn parse_labels(bytes: &[u8], what: &str) -> Result<Vec<i64>> {
    ensure!(
        bytes.len() >= 8,
        "{what}: too short for an IDX label header ({} bytes)",
        bytes.len()
    );
    let magic = be_u32(bytes, 0);
    ensure!(
        magic == LABEL_MAGIC,
        "{what}: magic number {magic}, expected {LABEL_MAGIC} (an IDX1 label file)"
    );
    let n = be_u32(bytes, 4) as usize;
    ensure!(
        bytes.len() == 8 + n,
        "{what}: header says {n} labels but the file has {} bytes of labels",
        bytes.len() - 8
    );
    if let Some(p) = bytes[8..].iter().position(|&l| l > 9) {
        bail!(
            "{what}: label {} at index {p} is not a digit 0-9",
            bytes[8 + p]
        );
    }
    Ok(bytes[8..].iter().map(|&l| l as i64).collect())
}

fn load_pair(dir: &Path, images: &str, labels: &str) -> Result<Split> {
    let ip = locate(dir, images)?;
    let lp = locate(dir, labels)?;
    let im = parse_images(&read_maybe_gz(&ip)?, &ip.display().to_string())?;
    let lb = parse_labels(&read_maybe_gz(&lp)?, &lp.display().to_string())?;
    ensure!(
        im.len() / PIXELS == lb.len(),
        "{} has {} images but {} has {} labels",
        ip.display(),
        im.len() / PIXELS,
        lp.display(),
        lb.len()
    );
    Ok(Split {
        pixels: im,
        labels: lb,
    })
}

/// Load and verify MNIST from `dir` (the four standard IDX files).
pub fn load(dir: &Path) -> Result<Mnist> {
    let full = load_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = load_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    ensure!(
        full.len() > TRAIN_SIZE,
        "{}: the training files hold {} examples; need more than {TRAIN_SIZE} for the train/validation split",
        dir.display(),
        full.len()
    );
    Ok(Mnist {
        train: full.range(0, TRAIN_SIZE),
        validation: full.range(TRAIN_SIZE, full.len()),
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(n: u32, rows: u32) -> Vec<u8> {
        let mut b = vec![];
        b.extend(IMAGE_MAGIC.to_be_bytes());
        b.extend(n.to_be_bytes());
        b.extend(rows.to_be_bytes());
        b.extend(28u32.to_be_bytes());
        b.extend(std::iter::repeat_n(255u8, (n * rows * 28) as usize));
        b
    }

    #[test]
    fn parses_and_scales_images() {
        let v = parse_images(&idx_images(2, 28), "x").unwrap();
        assert_eq!(v.len(), 2 * PIXELS);
        let s = Split {
            pixels: v,
            labels: vec![0, 1],
        };
        let x = s.images_f32(2);
        assert_eq!(x.len(), 2 * PIXELS);
        assert!(x.iter().all(|&p| p == 1.0));
    }

    #[test]
    fn rejects_bad_headers_naming_the_file() {
        let mut b = idx_images(2, 28);
        b[3] = 0;
        let e = parse_images(&b, "imgs.idx").unwrap_err().to_string();
        assert!(e.contains("imgs.idx") && e.contains("magic"), "{e}");
        let e = parse_images(&idx_images(2, 27), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("27x28"), "{e}");
        let mut b = idx_images(2, 28);
        b.pop();
        assert!(parse_images(&b, "f")
            .unwrap_err()
            .to_string()
            .contains("bytes"));
        let mut l = vec![];
        l.extend(LABEL_MAGIC.to_be_bytes());
        l.extend(2u32.to_be_bytes());
        l.extend([3u8, 12u8]);
        assert!(parse_labels(&l, "lab")
            .unwrap_err()
            .to_string()
            .contains("not a digit"));
    }

    #[test]
    fn loads_the_shipped_files() {
        let m = load(&default_dir()).unwrap();
        assert_eq!(
            (m.train.len(), m.validation.len(), m.test.len()),
            (55_000, 5_000, 10_000)
        );
        // The first training label of MNIST is a 5, the first test label a 7.
        assert_eq!((m.train.labels[0], m.test.labels[0]), (5, 7));
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = load(Path::new("/nonexistent/mnist"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/mnist") && e.contains("train-images"),
            "{e}"
        );
    }
}
