//! Plain text for byte-level language models (the Tiny-ONN workload): a
//! corpus read from a text file or a folder of them, split into documents
//! with a deterministic held-out share, and a byte tokenizer.
//!
//! * **Where.** `--data PATH` names a file or a folder; without it the
//!   corpus is Debian's `fortunes` package ([`FORTUNES_DIR`], about 2.5 MB
//!   of quotations; `apt-get install fortunes`). A missing corpus is an
//!   error that says how to install it.
//! * **Files.** A file must be text: UTF-8 without NUL bytes. In a folder
//!   (walked recursively, names sorted) files that are not text, such as the
//!   `.dat` indexes of `fortunes`, are skipped and counted; symbolic links are
//!   skipped (`fortunes` links every file a second time as `NAME.u8`). A
//!   folder without any text, an empty file or a corpus too short for the
//!   model's context is an error naming the path.
//! * **Documents.** A file with lines holding only `%` (the `fortune`
//!   format) is split at them; any other file at blank lines (paragraphs).
//!   Documents are trimmed; empty ones are dropped.
//! * **Held-out split.** Documents are numbered across the corpus in reading
//!   order; every `heldout_every`-th one (numbers `k - 1, 2k - 1, ...`) is
//!   held out. The split depends only on the files' names and contents.
//! * **Streams.** Each side is its documents joined by a blank line, as
//!   bytes: the tokens of a byte-level model (vocabulary 256).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use metac_contract::init::SeededRng;

/// Where Debian's `fortunes` package puts its quotations.
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";
/// The vocabulary of the byte tokenizer.
pub const BYTE_VOCAB: usize = 256;

/// A corpus split into training and held-out byte streams.
#[derive(Clone, Debug)]
pub struct TextCorpus {
    /// What was read: the file or folder.
    pub source: PathBuf,
    /// The text files read, in reading order.
    pub files: Vec<PathBuf>,
    /// Files of a folder skipped as not text.
    pub skipped: usize,
    pub documents: usize,
    pub heldout_documents: usize,
    pub train: Vec<u8>,
    pub heldout: Vec<u8>,
}

/// Read the corpus at `path` (the `fortunes` package without one), holding
/// out every `heldout_every`-th document.
pub fn load_corpus(path: Option<&Path>, heldout_every: usize) -> Result<TextCorpus> {
    ensure!(
        heldout_every >= 2,
        "heldout_every must be at least 2, got {heldout_every}"
    );
    let source = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(FORTUNES_DIR);
            if !p.is_dir() {
                bail!(
                    "no text corpus: {FORTUNES_DIR} does not exist. Install Debian's fortunes \
                     package (sudo apt-get install fortunes) or pass --data PATH (a text file or \
                     a folder of them)"
                );
            }
            p
        }
    };
    let meta = std::fs::metadata(&source)
        .with_context(|| format!("{}: cannot read the text corpus", source.display()))?;
    let mut files = vec![];
    let mut skipped = 0;
    let mut texts = vec![];
    if meta.is_dir() {
        let mut all = vec![];
        walk(&source, &mut all)?;
        for f in all {
            let bytes =
                std::fs::read(&f).with_context(|| format!("{}: cannot read", f.display()))?;
            match as_text(&bytes) {
                Some(t) => {
                    texts.push(t.to_string());
                    files.push(f);
                }
                None => skipped += 1,
            }
        }
        ensure!(
            !files.is_empty(),
            "{}: no text files in this folder ({skipped} files that are not UTF-8 text)",
            source.display()
        );
    } else {
        let bytes =
            std::fs::read(&source).with_context(|| format!("{}: cannot read", source.display()))?;
        let Some(t) = as_text(&bytes) else {
            bail!(
                "{}: not a text file (it holds NUL bytes or is not UTF-8)",
                source.display()
            );
        };
        texts.push(t.to_string());
        files.push(source.clone());
    }
    let mut train = vec![];
    let mut heldout = vec![];
    let mut documents = 0;
    let mut heldout_documents = 0;
    for text in &texts {
        for doc in documents_of(text) {
            let side = if documents % heldout_every == heldout_every - 1 {
                heldout_documents += 1;
                &mut heldout
            } else {
                &mut train
            };
            if !side.is_empty() {
                side.extend_from_slice(b"\n\n");
            }
            side.extend_from_slice(doc.as_bytes());
            documents += 1;
        }
    }
    ensure!(
        documents > 0,
        "{}: the corpus is empty (no text besides whitespace)",
        source.display()
    );
    Ok(TextCorpus {
        source,
        files,
        skipped,
        documents,
        heldout_documents,
        train,
        heldout,
    })
}

impl TextCorpus {
    /// An error naming the corpus unless both streams hold at least one
    /// window of `context + 1` bytes.
    pub fn check_context(&self, context: usize) -> Result<()> {
        for (side, s) in [("training", &self.train), ("held-out", &self.heldout)] {
            ensure!(
                s.len() > context,
                "{}: its {side} text has {} bytes, fewer than one window of the model's context \
                 ({context}) plus one; use a longer corpus or a shorter context",
                self.source.display(),
                s.len()
            );
        }
        Ok(())
    }
}

/// `bytes` as text: UTF-8 without NUL.
fn as_text(bytes: &[u8]) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Regular files under `dir`, recursively, names sorted; links are skipped.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ty = e
            .file_type()
            .with_context(|| format!("{}: cannot stat", e.path().display()))?;
        if ty.is_dir() {
            walk(&e.path(), out)?;
        } else if ty.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// The documents of one file: split at `%` lines if it has any, else at
/// blank lines; trimmed, empty ones dropped.
pub fn documents_of(text: &str) -> Vec<String> {
    let fortune = text.lines().any(|l| l.trim_end() == "%");
    let mut docs = vec![];
    let mut cur = String::new();
    let mut flush = |cur: &mut String| {
        let t = cur.trim();
        if !t.is_empty() {
            docs.push(t.to_string());
        }
        cur.clear();
    };
    for line in text.lines() {
        let boundary = if fortune {
            line.trim_end() == "%"
        } else {
            line.trim().is_empty()
        };
        if boundary {
            flush(&mut cur);
        } else {
            cur.push_str(line.trim_end());
            cur.push('\n');
        }
    }
    flush(&mut cur);
    docs
}

/// The byte tokenizer: a token per byte.
pub fn encode(text: &str) -> Vec<i64> {
    text.bytes().map(i64::from).collect()
}

/// Tokens back to text; invalid UTF-8 (a character cut by sampling) is
/// replaced by U+FFFD.
///
/// # Panics
/// If a token is not a byte.
pub fn decode(tokens: &[i64]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .map(|&t| u8::try_from(t).expect("byte tokens are 0..256"))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A batch of next-byte prediction windows: `tokens` and `targets` (the
/// next bytes), each `[batch, context]` row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Windows {
    pub batch: usize,
    pub context: usize,
    pub tokens: Vec<i64>,
    pub targets: Vec<i64>,
}

/// `batch` windows of `stream` starting at `starts`.
///
/// # Panics
/// If a window runs past the stream.
pub fn windows_at(stream: &[u8], starts: &[usize], context: usize) -> Windows {
    let mut tokens = Vec::with_capacity(starts.len() * context);
    let mut targets = Vec::with_capacity(starts.len() * context);
    for &s in starts {
        assert!(s + context < stream.len(), "window past the stream");
        tokens.extend(stream[s..s + context].iter().map(|&b| i64::from(b)));
        targets.extend(stream[s + 1..s + context + 1].iter().map(|&b| i64::from(b)));
    }
    Windows {
        batch: starts.len(),
        context,
        tokens,
        targets,
    }
}

/// `batch` windows at uniformly random starts.
pub fn random_windows(stream: &[u8], batch: usize, context: usize, rng: &mut SeededRng) -> Windows {
    let span = stream.len() - context; // starts 0..span
    let starts: Vec<usize> = (0..batch)
        .map(|_| rng.below(span as u64) as usize)
        .collect();
    windows_at(stream, &starts, context)
}

/// The starts of the non-overlapping windows that tile `stream` (the last
/// partial window dropped), at most `max` of them: the fixed evaluation set.
pub fn tiling_starts(stream: &[u8], context: usize, max: usize) -> Vec<usize> {
    let n = (stream.len() - 1) / context;
    (0..n.min(max)).map(|i| i * context).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("metac-text-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn fortune_files_split_at_percent_lines_and_others_at_paragraphs() {
        assert_eq!(
            documents_of("one\ntwo\n%\n\nthree\n%\n%\n"),
            vec!["one\ntwo".to_string(), "three".to_string()]
        );
        assert_eq!(
            documents_of("a b\nc\n\n\n d \n"),
            vec!["a b\nc".to_string(), "d".to_string()]
        );
    }

    #[test]
    fn a_folder_skips_binary_files_and_links_and_holds_out_every_kth_document() {
        let d = tmp("folder");
        std::fs::write(d.join("b"), "b1\n%\nb2\n%\nb3\n").unwrap();
        std::fs::write(d.join("a"), "a1\n\na2\n").unwrap();
        std::fs::write(d.join("a.dat"), [0u8, 1, 2, 3]).unwrap();
        std::os::unix::fs::symlink(d.join("a"), d.join("a.u8")).unwrap();
        let c = load_corpus(Some(&d), 2).unwrap();
        assert_eq!(c.files, vec![d.join("a"), d.join("b")]);
        assert_eq!(c.skipped, 1);
        assert_eq!((c.documents, c.heldout_documents), (5, 2));
        assert_eq!(c.train, b"a1\n\nb1\n\nb3");
        assert_eq!(c.heldout, b"a2\n\nb2");
        // The same files give the same split.
        let again = load_corpus(Some(&d), 2).unwrap();
        assert_eq!((again.train, again.heldout), (c.train, c.heldout));
    }

    #[test]
    fn bad_corpora_are_errors_naming_the_path() {
        let d = tmp("bad");
        let bin = d.join("x.bin");
        std::fs::write(&bin, [0u8, 159, 146, 150]).unwrap();
        let e = format!("{:#}", load_corpus(Some(&bin), 20).unwrap_err());
        assert!(e.contains("x.bin") && e.contains("not a text file"), "{e}");
        let empty = d.join("empty.txt");
        std::fs::write(&empty, " \n\n").unwrap();
        let e = format!("{:#}", load_corpus(Some(&empty), 20).unwrap_err());
        assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
        let e = format!("{:#}", load_corpus(Some(&d.join("nope")), 20).unwrap_err());
        assert!(e.contains("nope"), "{e}");
        std::fs::remove_file(&empty).unwrap();
        let e = format!("{:#}", load_corpus(Some(&d), 20).unwrap_err());
        assert!(e.contains("no text files"), "{e}");
        let short = d.join("short.txt");
        std::fs::write(&short, "abc\n\ndef\n").unwrap();
        let c = load_corpus(Some(&short), 2).unwrap();
        let e = format!("{:#}", c.check_context(8).unwrap_err());
        assert!(e.contains("short.txt") && e.contains("context (8)"), "{e}");
    }

    #[test]
    fn bytes_round_trip_and_windows_predict_the_next_byte() {
        let t = "héllo";
        assert_eq!(decode(&encode(t)), t);
        let s = b"abcdefgh";
        let w = windows_at(s, &[0, 3], 4);
        assert_eq!(decode(&w.tokens), "abcddefg");
        assert_eq!(decode(&w.targets), "bcdeefgh");
        assert_eq!(tiling_starts(s, 3, 10), vec![0, 3]);
        let mut rng = SeededRng::new(1, 0);
        let r = random_windows(s, 5, 7, &mut rng);
        assert_eq!(
            r.tokens,
            (0..7).map(|i| s[i] as i64).collect::<Vec<_>>().repeat(5)
        );
    }
}
