//! The generic training driver: one loop for every workload.
//!
//! A workload ([`Workload`]) says how to run one training iteration, how to
//! validate, and which tensors make up its state; the [`Trainer`] owns
//! everything around that:
//!
//! * the run directory: `metrics.jsonl` (one [`MetricsLine`] per
//!   iteration, appended and synced), `checkpoint.safetensors` and
//!   `checkpoint.json` (written atomically after every iteration, the JSON
//!   last: it is what makes a checkpoint count), `best.safetensors` (the
//!   weights with the best validation objective);
//! * periodic validation and best-checkpoint selection;
//! * resume: a run continues from its checkpoint, refusing one that belongs
//!   to other inputs (`identity`, e.g. the bundle's manifest hash) or other
//!   settings, and dropping the metrics of iterations after it;
//! * the divergence guard: a non-finite validation objective is never a
//!   best, and an iteration the workload reports diverged is flagged in the
//!   progress line;
//! * progress: a bar on a terminal, one line per iteration in logs.
//!
//! A workload is deterministic in the iteration number, and its checkpoint
//! holds everything carried between iterations, so a resumed run computes
//! exactly what the uninterrupted run would have.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_contract::bundle::{read_safetensors, write_safetensors, Bundle};
use metac_contract::fsutil::{sha256_hex, write_atomic};
use metac_graphs::Tensor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The weights and optimizer state after the last completed iteration.
pub const CHECKPOINT_WEIGHTS: &str = "checkpoint.safetensors";
/// What makes the checkpoint count: iteration count, best validation,
/// hashes, settings (see [`CheckpointInfo`]).
pub const CHECKPOINT_INFO: &str = "checkpoint.json";
/// The weights (without optimizer state) with the best validation objective.
pub const BEST_WEIGHTS: &str = "best.safetensors";
/// One JSON line per completed iteration.
pub const METRICS: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`: the driver's fields around the workload's
/// record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine<R> {
    /// The iteration, counted from 0 over the run (resumes included).
    pub iteration: usize,
    #[serde(flatten)]
    pub record: R,
    /// Wall-clock seconds of the iteration (validation included).
    pub seconds: f64,
    /// The validation objective after the iteration, when one ran.
    pub validation_objective: Option<f64>,
    /// The workload's other validation measures (accuracies, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub validation: BTreeMap<String, f64>,
    /// The best validation objective so far.
    pub best_validation: Option<f64>,
}

/// What a validation measured: the objective that picks the best weights
/// (lower is better; infinite for a diverged validation) and other measures
/// written with it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Validation {
    pub objective: f64,
    pub metrics: BTreeMap<String, f64>,
}

impl From<f64> for Validation {
    fn from(objective: f64) -> Self {
        Validation {
            objective,
            metrics: BTreeMap::new(),
        }
    }
}

/// What the driver asks of a workload.
pub trait Workload {
    /// The workload's part of a `metrics.jsonl` line.
    type Record: Serialize + DeserializeOwned;
    /// Workload state carried in `checkpoint.json` besides the weights (a
    /// curriculum stage, ...).
    type Extra: Serialize + DeserializeOwned + Default;

    /// Run training iteration `i` (deterministic in `i`).
    fn iteration(&mut self, i: usize) -> Result<Self::Record>;
    /// Validate the current weights.
    fn validate(&mut self) -> Result<Validation>;
    /// After a validation: `improved` says it set a new best (already
    /// written to `best.safetensors`). A workload may change course here
    /// (a curriculum switching stage), with files of its own in `dir`.
    fn after_validation(&mut self, _improved: bool, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Training stops early (e.g. a curriculum that brought no improvement).
    fn finished(&self) -> bool {
        false
    }
    /// The tensors to save: the weights, and with `with_optimizer` also the
    /// optimizer's state (a checkpoint, as opposed to the best weights).
    fn weights(&self, with_optimizer: bool) -> Result<Vec<(String, Tensor)>>;
    /// Restore what [`Workload::weights`]`(true)` saved; `what` names the
    /// file for errors.
    fn load_weights(&mut self, tensors: &BTreeMap<String, Tensor>, what: &str) -> Result<()>;
    /// The settings a resumed run must share with the run it continues.
    fn settings(&self) -> serde_json::Value;
    /// Check the settings saved in a checkpoint against this run's.
    fn check_resume(&self, saved: &serde_json::Value) -> Result<()> {
        ensure!(
            *saved == self.settings(),
            "the run was started with other settings ({saved}); resume with the same ones"
        );
        Ok(())
    }
    fn extra(&self) -> Self::Extra;
    fn restore_extra(&mut self, extra: Self::Extra);
    /// Whether the iteration of `record` diverged.
    fn diverged(&self, _record: &Self::Record) -> bool {
        false
    }
    /// The workload's part of the progress line of an iteration.
    fn progress(&self, line: &MetricsLine<Self::Record>) -> String;
}

/// `RUN/run.json`: what a run records about its bundle, so that the
/// commands that use a run (`metac edit RUN`, `metac sample RUN`) need no
/// `--bundle`.
pub const RUN_RECORD: &str = "run.json";

/// The contents of [`RUN_RECORD`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub kind: String,
    /// The bundle's directory (absolute where it could be resolved).
    pub bundle: PathBuf,
    pub manifest_sha256: String,
}

impl RunRecord {
    /// Record `bundle` as the bundle of the run in `run`.
    pub fn write(run: &Path, bundle: &Bundle) -> Result<()> {
        let r = RunRecord {
            kind: bundle.manifest.kind.clone(),
            bundle: std::fs::canonicalize(&bundle.dir).unwrap_or_else(|_| bundle.dir.clone()),
            manifest_sha256: bundle.manifest_sha256()?,
        };
        write_atomic(
            &run.join(RUN_RECORD),
            serde_json::to_string_pretty(&r)?.as_bytes(),
        )
    }

    /// The bundle of the run in `run`: `bundle` if given, else the
    /// recorded one; refused when the run's checkpoint is of another.
    pub fn bundle_of(run: &Path, bundle: Option<&Path>) -> Result<Bundle> {
        ensure!(
            run.is_dir(),
            "{}: no such run directory (of `metac run`)",
            run.display()
        );
        let path = match bundle {
            Some(b) => b.to_path_buf(),
            None => {
                let p = run.join(RUN_RECORD);
                let text = std::fs::read_to_string(&p).with_context(|| {
                    format!(
                        "cannot read {} (is {} a run of `metac run`? name its bundle with --bundle)",
                        p.display(),
                        run.display()
                    )
                })?;
                let r: RunRecord = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", p.display()))?;
                r.bundle
            }
        };
        let b = Bundle::load(&path)?;
        let info = run.join(CHECKPOINT_INFO);
        if let Ok(text) = std::fs::read_to_string(&info) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", info.display()))?;
            let trained = v["manifest_sha256"].as_str().unwrap_or_default();
            ensure!(
                trained == b.manifest_sha256()?,
                "{} was trained with another bundle than {} (manifest hash {} vs {})",
                run.display(),
                path.display(),
                &trained[..12.min(trained.len())],
                &b.manifest_sha256()?[..12]
            );
        }
        Ok(b)
    }
}

/// `checkpoint.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointInfo<E> {
    pub completed_iterations: usize,
    pub best_validation: Option<f64>,
    pub best_iteration: Option<usize>,
    /// What the run trains (the bundle's manifest hash).
    pub manifest_sha256: String,
    pub weights_sha256: String,
    pub settings: serde_json::Value,
    /// The workload's own state ([`Workload::Extra`]).
    pub workload: E,
}

/// How a run is driven.
#[derive(Clone, Copy, Debug)]
pub struct TrainerOptions {
    /// Iterations of the whole run (resumed ones included).
    pub iterations: usize,
    /// Validate every this many iterations (0 = never).
    pub evaluation_period: usize,
    /// No progress output.
    pub quiet: bool,
}

/// A training run in a directory; see the module docs.
pub struct Trainer {
    pub out: PathBuf,
    identity: String,
    completed: usize,
    best_validation: Option<f64>,
    best_iteration: Option<usize>,
}

impl Trainer {
    /// Start a run of `w` in `out` (which must not hold a checkpoint unless
    /// `resume`), or resume the checkpoint there. `identity` names what is
    /// trained (a checkpoint of another identity is refused).
    pub fn open<W: Workload>(w: &mut W, out: &Path, identity: &str, resume: bool) -> Result<Self> {
        let mut t = Trainer {
            out: out.to_path_buf(),
            identity: identity.to_string(),
            completed: 0,
            best_validation: None,
            best_iteration: None,
        };
        let info = out.join(CHECKPOINT_INFO);
        if resume {
            ensure!(
                info.is_file(),
                "{}: no checkpoint to resume (run without --resume to start)",
                info.display()
            );
            t.load_checkpoint(w)?;
        } else {
            ensure!(
                !info.exists(),
                "{} already holds a run (checkpoint.json); pass --resume to continue it, or choose another --out",
                out.display()
            );
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join(METRICS), b"")?;
        }
        Ok(t)
    }

    /// Iterations completed (by this run and the ones it resumes).
    pub fn completed(&self) -> usize {
        self.completed
    }

    pub fn best_validation(&self) -> Option<f64> {
        self.best_validation
    }

    fn load_checkpoint<W: Workload>(&mut self, w: &mut W) -> Result<()> {
        let ip = self.out.join(CHECKPOINT_INFO);
        let info: CheckpointInfo<W::Extra> =
            serde_json::from_str(&std::fs::read_to_string(&ip)?)
                .with_context(|| format!("{}: malformed checkpoint", ip.display()))?;
        ensure!(
            info.manifest_sha256 == self.identity,
            "{}: the checkpoint belongs to a different bundle (manifest hash {} vs {}); resume with the bundle the run started with",
            ip.display(),
            info.manifest_sha256.get(..12).unwrap_or(&info.manifest_sha256),
            self.identity.get(..12).unwrap_or(&self.identity)
        );
        w.check_resume(&info.settings)
            .with_context(|| format!("{}", ip.display()))?;
        let wp = self.out.join(CHECKPOINT_WEIGHTS);
        let bytes = std::fs::read(&wp).with_context(|| format!("cannot read {}", wp.display()))?;
        ensure!(
            sha256_hex(&bytes) == info.weights_sha256,
            "{}: does not match checkpoint.json (corrupt checkpoint)",
            wp.display()
        );
        let what = wp.display().to_string();
        w.load_weights(&read_safetensors(&bytes, &what)?, &what)?;
        self.completed = info.completed_iterations;
        self.best_validation = info.best_validation;
        self.best_iteration = info.best_iteration;
        w.restore_extra(info.workload);
        // Keep the metrics of the completed iterations only.
        let mp = self.out.join(METRICS);
        let text = std::fs::read_to_string(&mp).unwrap_or_default();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                    v.get("iteration")
                        .and_then(|i| i.as_u64())
                        .is_some_and(|i| (i as usize) < self.completed)
                })
            })
            .collect();
        write_atomic(
            &mp,
            (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes(),
        )?;
        Ok(())
    }

    fn save_checkpoint<W: Workload>(&self, w: &W) -> Result<()> {
        let bytes = write_safetensors(&w.weights(true)?)?;
        write_atomic(&self.out.join(CHECKPOINT_WEIGHTS), &bytes)?;
        let info = CheckpointInfo {
            completed_iterations: self.completed,
            best_validation: self.best_validation,
            best_iteration: self.best_iteration,
            manifest_sha256: self.identity.clone(),
            weights_sha256: sha256_hex(&bytes),
            settings: w.settings(),
            workload: w.extra(),
        };
        // The info file is written last: it is what makes the checkpoint count.
        write_atomic(
            &self.out.join(CHECKPOINT_INFO),
            serde_json::to_string_pretty(&info)?.as_bytes(),
        )
    }

    /// Give `w` the weights of `best.safetensors`, keeping its current
    /// values of what that file leaves out (the optimizer's state); false
    /// when no validation wrote one.
    pub fn restore_best<W: Workload>(&self, w: &mut W) -> Result<bool> {
        let p = self.out.join(BEST_WEIGHTS);
        if !p.is_file() {
            return Ok(false);
        }
        let what = p.display().to_string();
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {what}"))?;
        let mut t = read_safetensors(&bytes, &what)?;
        for (n, v) in w.weights(true)? {
            t.entry(n).or_insert(v);
        }
        w.load_weights(&t, &what)?;
        Ok(true)
    }

    /// Run iterations until `opts.iterations` are done (or the workload
    /// finishes early). `on_line` sees every metrics line.
    pub fn run<W: Workload>(
        &mut self,
        w: &mut W,
        opts: TrainerOptions,
        on_line: &mut dyn FnMut(&MetricsLine<W::Record>),
    ) -> Result<()> {
        let total = opts.iterations;
        let start = self.completed;
        let t_run = Instant::now();
        // A progress bar on a terminal; plain lines (one per iteration) in logs.
        let bar =
            (!opts.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
                let pb = indicatif::ProgressBar::new(total as u64).with_position(start as u64);
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} iterations, eta {eta}",
                    )
                    .expect("valid template"),
                );
                pb
            });
        while self.completed < total && !w.finished() {
            let it = self.completed;
            let t0 = Instant::now();
            let record = w.iteration(it)?;
            self.completed += 1;
            let mut validation_objective = None;
            let mut validation = BTreeMap::new();
            if opts.evaluation_period > 0 && self.completed.is_multiple_of(opts.evaluation_period) {
                let Validation {
                    objective: v,
                    metrics,
                } = w.validate()?;
                validation_objective = Some(v);
                validation = metrics;
                // The divergence guard: a non-finite objective is never a best.
                let improved = v.is_finite() && self.best_validation.is_none_or(|b| v < b);
                if improved {
                    self.best_validation = Some(v);
                    self.best_iteration = Some(it);
                    write_atomic(
                        &self.out.join(BEST_WEIGHTS),
                        &write_safetensors(&w.weights(false)?)?,
                    )?;
                }
                w.after_validation(improved, &self.out)?;
            }
            let line = MetricsLine {
                iteration: it,
                record,
                seconds: t0.elapsed().as_secs_f64(),
                validation_objective,
                validation,
                best_validation: self.best_validation,
            };
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(self.out.join(METRICS))?;
            writeln!(f, "{}", serde_json::to_string(&line)?)?;
            f.sync_all()?;
            self.save_checkpoint(w)?;
            if !opts.quiet {
                let done = it + 1;
                let rate = t_run.elapsed().as_secs_f64() / (done - start) as f64;
                let text = format!(
                    "[{done:>4}/{total}] {}  {}({rate:.1}s/it, eta {:.0}s)",
                    w.progress(&line),
                    if w.diverged(&line.record) {
                        "DIVERGED "
                    } else {
                        ""
                    },
                    rate * total.saturating_sub(done) as f64
                );
                match &bar {
                    Some(pb) => {
                        pb.println(text);
                        pb.set_position(done as u64);
                    }
                    None => eprintln!("{text}"),
                }
            }
            on_line(&line);
        }
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy workload: `x <- x - lr * (x - 3) + noise(i)`, validated by
    /// `(x - 3)^2`, which diverges (NaN) at iteration `nan_at`.
    struct Toy {
        x: f32,
        lr: f32,
        nan_at: Option<usize>,
        validations: usize,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct ToyRecord {
        x: f32,
    }

    impl Workload for Toy {
        type Record = ToyRecord;
        type Extra = usize;
        fn iteration(&mut self, i: usize) -> Result<ToyRecord> {
            let noise = ((i * 7919) % 13) as f32 * 1e-3;
            self.x = if self.nan_at == Some(i) {
                f32::NAN
            } else {
                self.x - self.lr * (self.x - 3.0) + noise
            };
            Ok(ToyRecord { x: self.x })
        }
        fn validate(&mut self) -> Result<Validation> {
            self.validations += 1;
            Ok(f64::from((self.x - 3.0).powi(2)).into())
        }
        fn weights(&self, with_optimizer: bool) -> Result<Vec<(String, Tensor)>> {
            let mut v = vec![("x".to_string(), Tensor::f32(&[], vec![self.x]))];
            if with_optimizer {
                v.push(("lr".to_string(), Tensor::f32(&[], vec![self.lr])));
            }
            Ok(v)
        }
        fn load_weights(&mut self, t: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
            let get = |k: &str| -> Result<f32> {
                Ok(t.get(k)
                    .with_context(|| format!("{what}: no {k}"))?
                    .as_f32()
                    .unwrap()[0])
            };
            self.x = get("x")?;
            self.lr = get("lr")?;
            Ok(())
        }
        fn settings(&self) -> serde_json::Value {
            serde_json::json!({ "lr": self.lr })
        }
        fn extra(&self) -> usize {
            self.validations
        }
        fn restore_extra(&mut self, extra: usize) {
            self.validations = extra;
        }
        fn progress(&self, l: &MetricsLine<ToyRecord>) -> String {
            format!("x {}", l.record.x)
        }
    }

    fn toy() -> Toy {
        Toy {
            x: 0.0,
            lr: 0.5,
            nan_at: None,
            validations: 0,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("metac-trainer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn opts(iterations: usize) -> TrainerOptions {
        TrainerOptions {
            iterations,
            evaluation_period: 2,
            quiet: true,
        }
    }

    fn metrics(d: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join(METRICS))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v
            })
            .collect()
    }

    #[test]
    fn a_resumed_run_ends_where_the_uninterrupted_one_does() {
        let full = dir("full");
        let mut w = toy();
        let mut t = Trainer::open(&mut w, &full, "id", false).unwrap();
        let mut lines = 0;
        t.run(&mut w, opts(7), &mut |_| lines += 1).unwrap();
        assert_eq!((t.completed(), lines), (7, 7));
        let m = metrics(&full);
        assert_eq!(m.len(), 7);
        assert!(m[1]["validation_objective"].is_number() && m[0]["validation_objective"].is_null());
        assert_eq!(m[3]["x"].as_f64().unwrap() as f32, w.x_at(3));

        let part = dir("part");
        let mut w2 = toy();
        Trainer::open(&mut w2, &part, "id", false)
            .unwrap()
            .run(&mut w2, opts(3), &mut |_| {})
            .unwrap();
        // A line past the checkpoint (as a killed run may leave) is dropped.
        let mut text = std::fs::read_to_string(part.join(METRICS)).unwrap();
        text.push_str("{\"iteration\":3,\"x\":0.0}\n");
        std::fs::write(part.join(METRICS), text).unwrap();
        let mut w3 = toy();
        let mut t3 = Trainer::open(&mut w3, &part, "id", true).unwrap();
        assert_eq!(t3.completed(), 3);
        t3.run(&mut w3, opts(7), &mut |_| {}).unwrap();
        assert_eq!(metrics(&part), m);
        assert_eq!(w3.x.to_bits(), w.x.to_bits());
        assert_eq!(w3.validations, w.validations);
        for f in [CHECKPOINT_WEIGHTS, BEST_WEIGHTS] {
            assert_eq!(
                std::fs::read(full.join(f)).unwrap(),
                std::fs::read(part.join(f)).unwrap(),
                "{f}"
            );
        }
        // Another identity, other settings, or no --resume on a run: refused.
        let e = |r: Result<Trainer>| format!("{:#}", r.err().unwrap());
        assert!(e(Trainer::open(&mut toy(), &full, "other", true)).contains("different bundle"));
        let mut fast = Toy { lr: 0.9, ..toy() };
        assert!(e(Trainer::open(&mut fast, &full, "id", true)).contains("other settings"));
        assert!(e(Trainer::open(&mut toy(), &full, "id", false)).contains("--resume"));
        assert!(e(Trainer::open(&mut toy(), &dir("none"), "id", true)).contains("no checkpoint"));
        let _ = std::fs::remove_dir_all(&full);
        let _ = std::fs::remove_dir_all(&part);
    }

    #[test]
    fn a_diverged_validation_is_never_the_best() {
        let d = dir("nan");
        let mut w = Toy {
            nan_at: Some(3),
            ..toy()
        };
        let mut t = Trainer::open(&mut w, &d, "id", false).unwrap();
        t.run(&mut w, opts(6), &mut |_| {}).unwrap();
        let m = metrics(&d);
        // Validations after iterations 2, 4 and 6; the last two are NaN.
        let best = m[1]["validation_objective"].as_f64().unwrap();
        assert!(
            m[3]["validation_objective"].is_null(),
            "NaN is written as null"
        );
        assert_eq!(t.best_validation(), Some(best));
        assert_eq!(m[5]["best_validation"].as_f64(), Some(best));
        let saved =
            read_safetensors(&std::fs::read(d.join(BEST_WEIGHTS)).unwrap(), "best").unwrap();
        assert!(saved["x"].as_f32().unwrap()[0].is_finite());
        assert!(
            !saved.contains_key("lr"),
            "best weights hold no optimizer state"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    impl Toy {
        /// `x` after iteration `i` of an undisturbed toy run from 0.
        fn x_at(&self, i: usize) -> f32 {
            let mut t = toy();
            for k in 0..=i {
                t.iteration(k).unwrap();
            }
            t.x
        }
    }
}
