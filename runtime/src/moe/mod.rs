//! The mixture-of-experts LM workload (Tiny-ONN): training a MoE bundle on
//! a text corpus with the generic driver ([`MoeWorkload`]), held-out
//! evaluation in bits per byte with the routers' measurements
//! ([`MoeEvaluator`]), and text generation ([`sample`]).
//!
//! One iteration of the driver is `steps_per_iteration` compiled
//! `train_step`s on random windows of the training text, drawn from the
//! run's seed and the iteration's number (so a resumed run draws what the
//! uninterrupted one would). The graphs and names are
//! `metac_contract::moe`'s.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use metac_contract::bundle::Bundle;
use metac_contract::init::SeededRng;
use metac_contract::lm::LrSchedule;
use metac_contract::moe::{
    MoeMeta, MoeRunSettings, RouterTable, TrainMode, MOE_EVALUATE, MOE_LOGITS, MOE_TRAIN_STEP,
};
use metac_graphs::Tensor;
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Session};
use crate::data::text::{random_windows, tiling_starts, windows_at, TextCorpus, Windows};
use crate::tensor::{draw_named, graph_tensors, restore_named, HostTensor, Named};
use crate::trainer::{MetricsLine, Validation, Workload};

/// `tokens` and `targets` of `w` as i64 `[B, T]` tensors.
fn window_tensors(w: &Windows) -> [HostTensor; 2] {
    let shape = [w.batch, w.context];
    let t = |v: &Vec<i64>| {
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&shape), v.clone()).expect("sized"))
    };
    [t(&w.tokens), t(&w.targets)]
}

/// The held-out measurements of a model.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldOut {
    /// Mean next-byte cross-entropy in bits.
    pub bits_per_byte: f64,
    pub windows: usize,
    /// Per block (mixtures only): mean active experts per token, gating
    /// accuracy (the token's active set holds its least-surprised expert),
    /// tokens routed to each expert (active-set counts, summed), and the
    /// surprise of every token and expert (for histograms; only with
    /// `keep_surprise`).
    pub mean_k: Vec<f64>,
    pub gating_accuracy: Vec<f64>,
    pub expert_tokens: Vec<Vec<f64>>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub surprise: Vec<Vec<f32>>,
}

/// Runs the `evaluate` graph over any number of windows.
pub struct MoeEvaluator {
    session: Box<dyn Session>,
    batch: usize,
    context: usize,
    layers: usize,
    experts: usize,
}

impl MoeEvaluator {
    pub fn new(bundle: &Bundle, meta: &MoeMeta, backend: &dyn Backend) -> Result<Self> {
        Ok(MoeEvaluator {
            session: backend.load(&bundle.graph_bytes(MOE_EVALUATE)?, MOE_EVALUATE)?,
            batch: meta.eval_batch,
            context: meta.model.context,
            layers: meta.model.layers,
            experts: meta.model.moe.as_ref().map_or(0, |m| m.experts),
        })
    }

    /// The model `params` on the windows of `stream` at `starts`, in whole
    /// batches of the graph (a last partial batch is left out).
    pub fn measure(
        &mut self,
        params: &Named<HostTensor>,
        stream: &[u8],
        starts: &[usize],
        keep_surprise: bool,
    ) -> Result<HeldOut> {
        ensure!(
            starts.len() >= self.batch,
            "{} windows to evaluate, fewer than one batch of the evaluation graph ({}); a longer held-out text or a smaller train.eval_batch",
            starts.len(),
            self.batch
        );
        let (b, t, moe) = (self.batch, self.context, self.experts > 0);
        let mut nll = 0.0;
        let mut out = HeldOut {
            windows: starts.len(),
            mean_k: vec![0.0; if moe { self.layers } else { 0 }],
            gating_accuracy: vec![0.0; if moe { self.layers } else { 0 }],
            expert_tokens: vec![vec![0.0; self.experts]; if moe { self.layers } else { 0 }],
            surprise: vec![vec![]; if moe && keep_surprise { self.layers } else { 0 }],
            ..HeldOut::default()
        };
        let mut counted = 0usize;
        for chunk in starts.chunks_exact(b) {
            let w = windows_at(stream, chunk, t);
            let data = window_tensors(&w);
            let mut ins: Vec<(&str, &HostTensor)> =
                params.iter().map(|(n, t)| (n.as_str(), t)).collect();
            ins.push(("tokens", &data[0]));
            ins.push(("targets", &data[1]));
            let r: HashMap<String, HostTensor> = self.session.run(&ins)?.into_iter().collect();
            let get = |n: &str| {
                r.get(n)
                    .with_context(|| format!("evaluate: no output '{n}'"))
            };
            nll += f64::from(get("nll_sum")?.to_scalar_f32()?);
            for l in 0..if moe { self.layers } else { 0 } {
                out.mean_k[l] += f64::from(get(&format!("mean_k.l{l}"))?.to_scalar_f32()?);
                {
                    out.gating_accuracy[l] +=
                        f64::from(get(&format!("gating_accuracy.l{l}"))?.to_scalar_f32()?);
                    let a = get(&format!("active.l{l}"))?.as_f32()?;
                    let e = self.experts;
                    for (i, v) in a.iter().enumerate() {
                        out.expert_tokens[l][i % e] += f64::from(*v);
                    }
                    if keep_surprise {
                        let s = get(&format!("surprise.l{l}"))?.as_f32()?;
                        out.surprise[l].extend(s.iter());
                    }
                }
            }
            counted += b;
        }
        let chunks = counted as f64 / b as f64;
        for v in out.mean_k.iter_mut().chain(out.gating_accuracy.iter_mut()) {
            *v /= chunks;
        }
        out.bits_per_byte = nll / (counted * t) as f64 / std::f64::consts::LN_2;
        Ok(out)
    }
}

/// One iteration's line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MoeLog {
    /// Mean training loss (nats per byte) over the iteration's steps,
    /// before each update.
    pub loss: f64,
    pub steps: usize,
    /// The learning rates' multiplier at the iteration's last step.
    pub lr_scale: f32,
    pub tokens_per_second: f64,
    /// Mean over the iteration of each of `train_step`'s measurements
    /// (`mean_k.l{i}`, `gating_accuracy.l{i}`, `router_loss.l{i}`, ...).
    pub train: BTreeMap<String, f64>,
}

/// See the module docs.
pub struct MoeWorkload {
    pub meta: MoeMeta,
    settings: MoeRunSettings,
    router: RouterTable,
    step: Box<dyn Session>,
    pub eval: MoeEvaluator,
    params: Named<HostTensor>,
    state: Named<HostTensor>,
    pub corpus: TextCorpus,
    heldout_starts: Vec<usize>,
    /// The bundle's manifest hash (the run's identity).
    pub manifest_sha256: String,
}

impl MoeWorkload {
    /// Training of `bundle` on `corpus` with `settings` and the router loss
    /// weights of `router`, from parameters drawn with the settings' seed.
    pub fn new(
        bundle: &Bundle,
        backend: &dyn Backend,
        corpus: TextCorpus,
        settings: MoeRunSettings,
        router: RouterTable,
    ) -> Result<Self> {
        let meta = MoeMeta::from_manifest(&bundle.manifest)
            .with_context(|| format!("{}", bundle.dir.display()))?;
        settings.validate()?;
        corpus.check_context(meta.model.context)?;
        let step = backend.load(&bundle.graph_bytes(MOE_TRAIN_STEP)?, MOE_TRAIN_STEP)?;
        let eval = MoeEvaluator::new(bundle, &meta, backend)?;
        let heldout_starts =
            tiling_starts(&corpus.heldout, meta.model.context, settings.eval_windows);
        Ok(MoeWorkload {
            params: draw_named(&meta.init, settings.seed),
            state: draw_named(&meta.state_init, settings.seed),
            meta,
            settings,
            router,
            step,
            eval,
            corpus,
            heldout_starts,
            manifest_sha256: bundle.manifest_sha256()?,
        })
    }

    /// The model's parameters, by name.
    pub fn params(&self) -> &Named<HostTensor> {
        &self.params
    }

    /// The held-out measurements of the current parameters.
    pub fn heldout(&mut self, keep_surprise: bool) -> Result<HeldOut> {
        let starts = self.heldout_starts.clone();
        self.eval
            .measure(&self.params, &self.corpus.heldout, &starts, keep_surprise)
    }

    fn iterations(&self) -> usize {
        self.settings
            .steps
            .div_ceil(self.settings.steps_per_iteration)
    }

    /// Iterations of the run.
    pub fn total_iterations(&self) -> usize {
        self.iterations()
    }
}

impl Workload for MoeWorkload {
    type Record = MoeLog;
    type Extra = ();

    fn iteration(&mut self, i: usize) -> Result<MoeLog> {
        let t0 = Instant::now();
        let s = &self.settings;
        let first = i * s.steps_per_iteration;
        let steps = s.steps_per_iteration.min(s.steps - first);
        let (b, t) = (self.meta.batch, self.meta.model.context);
        let mut rng = SeededRng::new(s.seed, 1 + i as u64);
        let hyper = self.meta.mode == TrainMode::Hyper;
        let scalar = |v: f64| HostTensor::scalar_f32(v as f32);
        let (kl, kp) = (scalar(self.router.kl), scalar(self.router.k_penalty));
        let mut sum = 0.0;
        let mut scale = 1.0;
        let mut train: BTreeMap<String, f64> = BTreeMap::new();
        for k in 0..steps {
            scale = s.lr_scale(first + k);
            let lr = HostTensor::scalar_f32(scale);
            let w = random_windows(&self.corpus.train, b, t, &mut rng);
            let data = window_tensors(&w);
            let mut ins: Vec<(&str, &HostTensor)> = vec![];
            ins.extend(self.params.iter().map(|(n, t)| (n.as_str(), t)));
            ins.extend(self.state.iter().map(|(n, t)| (n.as_str(), t)));
            ins.push(("tokens", &data[0]));
            ins.push(("targets", &data[1]));
            ins.push((self.meta.lr_scale.as_str(), &lr));
            if hyper {
                for (name, v) in [
                    (&self.meta.router_lr_scale, &lr),
                    (&self.meta.router_kl, &kl),
                    (&self.meta.router_k_penalty, &kp),
                ] {
                    let name = name
                        .as_deref()
                        .context("a hyper-step bundle names its router inputs")?;
                    ins.push((name, v));
                }
            }
            let mut out: HashMap<String, HostTensor> = self.step.run(&ins)?.into_iter().collect();
            sum += f64::from(
                out.remove("loss")
                    .context("train_step: no loss")?
                    .to_scalar_f32()?,
            );
            for (name, p) in self.params.iter_mut() {
                *p = out
                    .remove(&format!("new.{name}"))
                    .with_context(|| format!("train_step: no output 'new.{name}'"))?;
            }
            for (name, st) in self.state.iter_mut() {
                *st = out
                    .remove(&format!("new.{name}"))
                    .with_context(|| format!("train_step: no output 'new.{name}'"))?;
            }
            for m in &self.meta.metrics {
                let v = out
                    .get(m)
                    .with_context(|| format!("train_step: no output '{m}'"))?
                    .to_scalar_f32()?;
                *train.entry(m.clone()).or_default() += f64::from(v) / steps as f64;
            }
        }
        Ok(MoeLog {
            loss: sum / steps as f64,
            steps,
            lr_scale: scale,
            tokens_per_second: (steps * b * t) as f64 / t0.elapsed().as_secs_f64(),
            train,
        })
    }

    fn validate(&mut self) -> Result<Validation> {
        let h = self.heldout(false)?;
        let mut metrics = BTreeMap::from([("bits_per_byte".to_string(), h.bits_per_byte)]);
        for (l, v) in h.mean_k.iter().enumerate() {
            metrics.insert(format!("mean_k.l{l}"), *v);
        }
        for (l, v) in h.gating_accuracy.iter().enumerate() {
            metrics.insert(format!("gating_accuracy.l{l}"), *v);
        }
        Ok(Validation {
            objective: if h.bits_per_byte.is_finite() {
                h.bits_per_byte
            } else {
                f64::INFINITY
            },
            metrics,
        })
    }

    fn weights(&self, with_optimizer: bool) -> Result<Vec<(String, Tensor)>> {
        Ok(if with_optimizer {
            graph_tensors(&[&self.params, &self.state])
        } else {
            graph_tensors(&[&self.params])
        })
    }

    fn load_weights(&mut self, tensors: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        restore_named(&mut self.params, tensors, what)?;
        restore_named(&mut self.state, tensors, what)
    }

    fn settings(&self) -> serde_json::Value {
        let s = &self.settings;
        // The number of steps may change on resume where the schedule does
        // not depend on it (constant).
        let fixed_length = s.schedule != LrSchedule::Constant;
        serde_json::json!({
            "seed": s.seed,
            "steps": if fixed_length { Some(s.steps) } else { None },
            "steps_per_iteration": s.steps_per_iteration,
            "evaluation_period": s.evaluation_period,
            "eval_windows": s.eval_windows,
            "heldout_every": s.heldout_every,
            "schedule": s.schedule,
            "warmup_steps": s.warmup_steps,
            "router": self.router,
            "corpus": self.corpus.source,
        })
    }

    fn extra(&self) {}
    fn restore_extra(&mut self, _extra: ()) {}

    fn diverged(&self, r: &MoeLog) -> bool {
        !r.loss.is_finite()
    }

    fn progress(&self, l: &MetricsLine<MoeLog>) -> String {
        let r = &l.record;
        let layers = self.meta.model.layers;
        let mean = |key: &str| -> Option<f64> {
            let v: Vec<f64> = (0..layers)
                .filter_map(|i| r.train.get(&format!("{key}.l{i}")).copied())
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let mut s = format!(
            "step {}  loss {:.4} ({:.3} bits/byte)",
            l.iteration * self.settings.steps_per_iteration + r.steps,
            r.loss,
            r.loss / std::f64::consts::LN_2
        );
        if let Some(k) = mean("mean_k") {
            s += &format!("  k {k:.2}");
        }
        if let Some(a) = mean("gating_accuracy") {
            s += &format!("  gating {a:.3}");
        }
        if let Some(h) = l.validation.get("bits_per_byte") {
            s += &format!("  held-out {h:.3} bits/byte");
        }
        s + &format!("  {:.0} tokens/s", r.tokens_per_second)
    }
}

/// Options of [`sample`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Bytes to generate.
    pub bytes: usize,
    /// 0: greedy (the most likely byte); otherwise softmax(logits / T).
    pub temperature: f64,
    pub seed: u64,
}

/// Text after `prompt` from the `logits` graph of `bundle` with `params`:
/// a byte at a time, each from the logits after the last `context - 1`
/// bytes at most (the model's window).
pub fn sample(
    bundle: &Bundle,
    backend: &dyn Backend,
    params: &Named<HostTensor>,
    prompt: &str,
    opts: SampleOptions,
) -> Result<String> {
    let meta = MoeMeta::from_manifest(&bundle.manifest)?;
    let t = meta.model.context;
    let v = meta.model.vocab;
    ensure!(
        !prompt.is_empty(),
        "the prompt is empty: give at least one byte"
    );
    ensure!(
        opts.temperature.is_finite() && opts.temperature >= 0.0,
        "--temperature must be a finite number >= 0, got {}",
        opts.temperature
    );
    let mut session = backend.load(&bundle.graph_bytes(MOE_LOGITS)?, MOE_LOGITS)?;
    let mut bytes: Vec<u8> = prompt.as_bytes().to_vec();
    let start = bytes.len();
    let mut rng = SeededRng::new(opts.seed, 0);
    for _ in 0..opts.bytes {
        let window = &bytes[bytes.len().saturating_sub(t)..];
        let n = window.len();
        let mut tok = vec![0i64; t];
        for (i, &c) in window.iter().enumerate() {
            tok[i] = i64::from(c);
        }
        let tokens = HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, t]), tok).expect("sized"));
        let mut ins: Vec<(&str, &HostTensor)> =
            params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        ins.push(("tokens", &tokens));
        let out: HashMap<String, HostTensor> = session.run(&ins)?.into_iter().collect();
        let logits = out
            .get("logits")
            .context("logits: no output 'logits'")?
            .as_f32()?;
        let row: Vec<f64> = (0..v).map(|j| f64::from(logits[[0, n - 1, j]])).collect();
        let next = if opts.temperature == 0.0 {
            (0..v)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .expect("a vocabulary")
        } else {
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = row
                .iter()
                .map(|x| ((x - mx) / opts.temperature).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut u = rng.uniform() * total;
            let mut pick = v - 1;
            for (j, wj) in w.iter().enumerate() {
                if u < *wj {
                    pick = j;
                    break;
                }
                u -= wj;
            }
            pick
        };
        bytes.push(next as u8);
    }
    Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
}
