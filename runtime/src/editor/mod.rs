//! The MALMEN editor's host side: running the editor bundle's graphs over
//! batches of edits of any size ([`Editor`]), the least-squares shift and
//! its adjoint ([`solve`]), and meta-training with the generic driver
//! ([`run::EditorWorkload`]). The graphs and names are
//! `metac_contract::editor`'s; the algorithm is in `docs/editing.md`.

pub mod run;
pub mod solve;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use metac_contract::bundle::{read_safetensors, Bundle};
use metac_contract::editor::{
    EditorMeta, LocalityReference, Solver, CACHE, EVALUATE, FT_ADAM, FT_LR, HYPER_ADAM, LOGP,
    META_LOSS, VALUES, VALUES_VJP,
};
use metac_contract::fsutil::sha256_hex;
use metac_contract::init::SeededRng;
use metac_contract::lm::GptConfig;
use metac_graphs::Tensor;
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use self::solve::Shift;
use crate::backend::{Backend, Session};
use crate::data::facts::{EditRequest, FactWorld, Prompt, Split};
use crate::lm::{answer_batch, Evaluator, Scores};
use crate::tensor::{HostTensor, Named};

/// Running mean and variance of the hypernetwork's inputs `[u, delta]` of
/// a group (the normaliser): the parallel (Chan et al.) update, in f64,
/// starting from mean 0, variance 1 and a count of 1e-4.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunningNorm {
    pub count: f64,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl RunningNorm {
    pub fn new(dim: usize) -> Self {
        RunningNorm {
            count: 1e-4,
            mean: vec![0.0; dim],
            var: vec![1.0; dim],
        }
    }

    /// Add `rows` (row-major, `dim` wide).
    pub fn update(&mut self, rows: &[f32]) {
        let dim = self.mean.len();
        let n = rows.len() / dim;
        if n == 0 {
            return;
        }
        let nf = n as f64;
        let total = self.count + nf;
        for j in 0..dim {
            let col = (0..n).map(|i| f64::from(rows[i * dim + j]));
            let m = col.clone().sum::<f64>() / nf;
            let v = col.map(|x| (x - m).powi(2)).sum::<f64>() / nf;
            let delta = m - self.mean[j];
            self.mean[j] += delta * nf / total;
            let m2 = self.var[j] * self.count + v * nf + delta * delta * self.count * nf / total;
            self.var[j] = m2 / total;
        }
        self.count = total;
    }

    /// Mean and `sqrt(var + 1e-8)` as f32 tensors.
    pub fn tensors(&self) -> (HostTensor, HostTensor) {
        let d = self.mean.len();
        let mean = self.mean.iter().map(|&x| x as f32).collect();
        let std = self.var.iter().map(|&v| (v + 1e-8).sqrt() as f32).collect();
        (
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[d]), mean).expect("sized")),
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[d]), std).expect("sized")),
        )
    }
}

/// ES, GS and LS: the fraction of answer tokens the edited model ranks
/// first (teacher forcing) on the edit prompts (the new answer), their
/// equivalent prompts (the new answer) and the unrelated prompts (their
/// own answer). NaN (`null` in JSON) where the edits have no such prompts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EditScores {
    pub es: f64,
    pub gs: f64,
    pub ls: f64,
}

/// An applied edit: the cached keys, the shifts (for the adjoint) and the
/// weights they replaced.
pub struct Applied {
    pub n: usize,
    /// Per edited layer: `U [n, in]`, `delta [n, out]` (row-major).
    pub keys: Vec<Vec<f32>>,
    pub deltas: Vec<Vec<f32>>,
    pub shifts: Vec<Shift>,
    previous: Vec<HostTensor>,
}

impl EditScores {
    /// `ES 0.912 GS 0.850 LS 0.970`, with `-` for a score without prompts.
    pub fn show(&self) -> String {
        let f = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.3}")
            }
        };
        format!("ES {} GS {} LS {}", f(self.es), f(self.gs), f(self.ls))
    }
}

/// The editor bundle's graphs over an LM's weights and a hypernetwork.
pub struct Editor {
    pub meta: EditorMeta,
    cache: Box<dyn Session>,
    values: Box<dyn Session>,
    values_vjp: Box<dyn Session>,
    meta_loss: Box<dyn Session>,
    logp: Box<dyn Session>,
    adam: Box<dyn Session>,
    ft_adam: Box<dyn Session>,
    eval: Evaluator,
    /// The unedited LM's parameters.
    pub base: Named<HostTensor>,
    /// The LM's parameters now (edited or not).
    pub lm: Named<HostTensor>,
    pub hyper: Named<HostTensor>,
    pub adam_state: Named<HostTensor>,
    pub norms: Vec<RunningNorm>,
    pub world: FactWorld,
    /// Per edited layer, the least-squares regulariser `C` (`[in, in]`
    /// row-major; `None`: the identity), [`Editor::regularisers`].
    reg: Vec<Option<Vec<f64>>>,
}

fn refs(v: &Named<HostTensor>) -> Vec<(&str, &HostTensor)> {
    v.iter().map(|(n, t)| (n.as_str(), t)).collect()
}

fn f32s(t: &HostTensor) -> Result<Vec<f32>> {
    Ok(t.as_f32()?.iter().copied().collect())
}

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).expect("sized"))
}

/// The first `rows` rows of `t [c, w]`.
fn rows(t: &HostTensor, rows: usize) -> Result<Vec<f32>> {
    let w = t.shape()[1];
    Ok(f32s(t)?[..rows * w].to_vec())
}

/// `v` (`m` rows of `w`) padded with zero rows to `c` rows.
fn padded(v: &[f32], c: usize, w: usize) -> HostTensor {
    let mut x = v.to_vec();
    x.resize(c * w, 0.0);
    tensor(&[c, w], x)
}

fn output(out: &mut HashMap<String, HostTensor>, graph: &str, name: &str) -> Result<HostTensor> {
    out.remove(name)
        .with_context(|| format!("{graph}: no output '{name}'"))
}

/// Read LM weights from `path`: every parameter of `model`, with its shape
/// (an error names a missing or misshapen one).
pub fn load_lm_weights(path: &Path, model: &GptConfig) -> Result<Named<HostTensor>> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the language model's weights {}",
            path.display()
        )
    })?;
    let what = path.display().to_string();
    let t: BTreeMap<String, Tensor> = read_safetensors(&bytes, &what)?;
    model
        .param_shapes()
        .into_iter()
        .map(|(n, s)| {
            let v = t
                .get(&n)
                .with_context(|| format!("{what}: no tensor '{n}' (weights of another model?)"))?;
            ensure!(
                v.shape == s,
                "{what}: '{n}' has shape {:?}, the model {:?}",
                v.shape,
                s
            );
            Ok((n, HostTensor::from_graph(v)))
        })
        .collect()
}

impl Editor {
    /// The editor of `bundle` on the LM weights the bundle names (which must
    /// be the file it was compiled with), with the hypernetwork drawn from
    /// `seed`.
    pub fn new(bundle: &Bundle, backend: &dyn Backend, seed: u64) -> Result<Self> {
        let meta = EditorMeta::from_manifest(&bundle.manifest)
            .with_context(|| format!("{}", bundle.dir.display()))?;
        let path = &meta.lm_weights;
        let sha = sha256_hex(
            &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        ensure!(
            sha == meta.lm_weights_sha256,
            "{}: not the weights the bundle was compiled with (SHA-256 {} vs {}); recompile the editor",
            path.display(),
            &sha[..12],
            &meta.lm_weights_sha256[..12.min(meta.lm_weights_sha256.len())]
        );
        let base = load_lm_weights(path, &meta.model)?;
        let world = FactWorld::generate(&meta.world)?;
        ensure!(
            world.vocab.len() == meta.model.vocab,
            "the fact world has {} words; the editor's model {}",
            world.vocab.len(),
            meta.model.vocab
        );
        let load = |name: &str| -> Result<Box<dyn Session>> {
            backend.load(&bundle.graph_bytes(name)?, name)
        };
        let draw = |rules: &[metac_contract::init::TensorInit]| -> Named<HostTensor> {
            rules
                .iter()
                .map(|r| (r.name.clone(), HostTensor::from_graph(&r.draw(seed))))
                .collect()
        };
        let c = meta.chunk;
        let mut editor = Editor {
            cache: load(CACHE)?,
            values: load(VALUES)?,
            values_vjp: load(VALUES_VJP)?,
            meta_loss: load(META_LOSS)?,
            logp: load(LOGP)?,
            adam: load(HYPER_ADAM)?,
            ft_adam: load(FT_ADAM)?,
            eval: Evaluator::from_session(load(EVALUATE)?, c * (1 + meta.equivalents), meta.seq),
            lm: base.clone(),
            base,
            hyper: draw(&meta.hyper_init),
            adam_state: draw(&meta.adam_init),
            norms: meta
                .norm_dims
                .iter()
                .map(|&d| RunningNorm::new(d))
                .collect(),
            reg: vec![None; meta.layers.len()],
            world,
            meta,
        };
        if editor.meta.preserve > 0 {
            editor.reg = editor.regularisers(editor.meta.preserve)?;
        }
        Ok(editor)
    }

    /// MEMIT's regulariser of each edited layer (`[editor] preserve`): the
    /// second moment `C = K^T K / P` of the layer's keys (its inputs at the
    /// answer position) over `preserve` training-template prompts of the
    /// meta-training subjects (drawn from a fixed stream; never the
    /// evaluation or unrelated subjects), in the unedited LM, scaled to a
    /// mean eigenvalue of 1 (so that `lambda` means what it means with the
    /// identity), plus `1e-2 I` to keep it positive definite.
    fn regularisers(&mut self, preserve: usize) -> Result<Vec<Option<Vec<f64>>>> {
        let subjects = self.world.subjects_of(Split::Train);
        let all = self.world.training_prompts_of(&subjects);
        ensure!(!all.is_empty(), "no training-template prompts to preserve");
        let mut rng = SeededRng::new(0, 7);
        let picked: Vec<Prompt> = (0..preserve)
            .map(|_| all[rng.below(all.len() as u64) as usize].clone())
            .collect();
        let (c, seq) = (self.meta.chunk, self.meta.seq);
        let layers = self.meta.layers.clone();
        let mut acc: Vec<Vec<f64>> = layers.iter().map(|l| vec![0.0; l.d_in * l.d_in]).collect();
        for chunk in picked.chunks(c) {
            let prompts: Vec<&Prompt> = chunk.iter().collect();
            let data = answer_batch(&prompts, c, seq)?;
            let w = tensor(&[c], vec![1.0; c]);
            let mut ins = refs(&self.base);
            ins.extend(["tokens", "positions", "answers"].into_iter().zip(&data));
            ins.push(("weights", &w));
            let mut out: HashMap<String, HostTensor> = self.cache.run(&ins)?.into_iter().collect();
            for (i, l) in layers.iter().enumerate() {
                let k = rows(
                    &output(&mut out, CACHE, &format!("u.{}", l.name))?,
                    chunk.len(),
                )?;
                let d = l.d_in;
                for row in k.chunks(d) {
                    for a in 0..d {
                        let ra = f64::from(row[a]);
                        if ra == 0.0 {
                            continue;
                        }
                        let dst = &mut acc[i][a * d..(a + 1) * d];
                        for (x, &rb) in dst.iter_mut().zip(row) {
                            *x += ra * f64::from(rb);
                        }
                    }
                }
            }
        }
        Ok(layers
            .iter()
            .zip(acc)
            .map(|(l, mut m)| {
                let d = l.d_in;
                let trace: f64 = (0..d).map(|a| m[a * d + a]).sum();
                let scale = if trace > 0.0 { d as f64 / trace } else { 1.0 };
                for x in m.iter_mut() {
                    *x *= scale;
                }
                for a in 0..d {
                    m[a * d + a] += 1e-2;
                }
                Some(m)
            })
            .collect())
    }

    /// Back to the unedited LM.
    pub fn reset(&mut self) {
        self.lm = self.base.clone();
    }

    /// The hypernetwork (without `lamda`) and the normalisers' statistics.
    fn values_inputs(&self) -> Named<HostTensor> {
        let mut v: Named<HostTensor> = self
            .hyper
            .iter()
            .filter(|(n, _)| n != "hyper.lamda")
            .cloned()
            .collect();
        for (k, norm) in self.norms.iter().enumerate() {
            let (m, s) = norm.tensors();
            v.push((format!("norm.g{k}.mean"), m));
            v.push((format!("norm.g{k}.std"), s));
        }
        v
    }

    fn lamda(&self) -> Result<Vec<f32>> {
        let t = self
            .hyper
            .iter()
            .find(|(n, _)| n == "hyper.lamda")
            .context("no hyper.lamda")?;
        f32s(&t.1)
    }

    /// Edit the LM with `reqs` (in chunks of the bundle's size): cache the
    /// keys and value gradients of the edit prompts, update the normalisers
    /// (when `learn`), make the values, solve for the shifts and add them
    /// to the edited layers.
    pub fn edit(&mut self, reqs: &[EditRequest], learn: bool) -> Result<Applied> {
        let c = self.meta.chunk;
        let seq = self.meta.seq;
        let layers = self.meta.layers.clone();
        let n = reqs.len();
        ensure!(n > 0, "no edits");
        let mut keys = vec![vec![]; layers.len()];
        let mut deltas = vec![vec![]; layers.len()];
        for chunk in reqs.chunks(c) {
            let prompts: Vec<&Prompt> = chunk.iter().map(|r| &r.edit).collect();
            let data = answer_batch(&prompts, c, seq)?;
            let mut w = vec![0f32; c];
            w[..chunk.len()].fill(1.0);
            let w = tensor(&[c], w);
            let mut ins = refs(&self.lm);
            ins.extend(["tokens", "positions", "answers"].into_iter().zip(&data));
            ins.push(("weights", &w));
            let mut out: HashMap<String, HostTensor> = self.cache.run(&ins)?.into_iter().collect();
            for (i, l) in layers.iter().enumerate() {
                keys[i].extend(rows(
                    &output(&mut out, CACHE, &format!("u.{}", l.name))?,
                    chunk.len(),
                )?);
                deltas[i].extend(rows(
                    &output(&mut out, CACHE, &format!("delta.{}", l.name))?,
                    chunk.len(),
                )?);
            }
        }
        if learn {
            for (i, l) in layers.iter().enumerate() {
                let mut both = Vec::with_capacity(n * (l.d_in + l.d_out));
                for j in 0..n {
                    both.extend(&keys[i][j * l.d_in..(j + 1) * l.d_in]);
                    both.extend(&deltas[i][j * l.d_out..(j + 1) * l.d_out]);
                }
                self.norms[l.group].update(&both);
            }
        }
        // The values, chunk by chunk.
        let base = self.values_inputs();
        let mut values = vec![vec![]; layers.len()];
        for start in (0..n).step_by(c) {
            let m = c.min(n - start);
            let pairs = self.pair_inputs(&keys, &deltas, start, m);
            let mut ins: Vec<(&str, &HostTensor)> =
                base.iter().map(|(k, t)| (k.as_str(), t)).collect();
            ins.extend(pairs.iter().map(|(k, t)| (k.as_str(), t)));
            let mut out: HashMap<String, HostTensor> = self.values.run(&ins)?.into_iter().collect();
            for (i, l) in layers.iter().enumerate() {
                values[i].extend(rows(
                    &output(&mut out, VALUES, &format!("d.{}", l.name))?,
                    m,
                )?);
            }
        }
        let lamda = self.lamda()?;
        let mut shifts = vec![];
        let mut previous = vec![];
        for (i, l) in layers.iter().enumerate() {
            let s = match self.meta.solver {
                Solver::LeastSquares => Shift::solve_with(
                    &keys[i],
                    &values[i],
                    n,
                    l.d_in,
                    l.d_out,
                    lamda[i],
                    self.reg[i].as_deref(),
                ),
                Solver::Sum => Shift::sum(&keys[i], &values[i], n, l.d_in, l.d_out),
            }
            .with_context(|| format!("layer {}", l.name))?;
            let w = self.weight_mut(&l.name)?;
            previous.push(w.clone());
            let shift = s.shift();
            if let HostTensor::F32(a) = w {
                for (x, d) in a.iter_mut().zip(&shift) {
                    *x += d;
                }
            }
            shifts.push(s);
        }
        Ok(Applied {
            n,
            keys,
            deltas,
            shifts,
            previous,
        })
    }

    /// `u.{layer}` and `delta.{layer}` rows `start..start + m`, padded to a
    /// chunk.
    fn pair_inputs(
        &self,
        keys: &[Vec<f32>],
        deltas: &[Vec<f32>],
        start: usize,
        m: usize,
    ) -> Named<HostTensor> {
        let c = self.meta.chunk;
        let mut v = vec![];
        for (i, l) in self.meta.layers.iter().enumerate() {
            v.push((
                format!("u.{}", l.name),
                padded(&keys[i][start * l.d_in..(start + m) * l.d_in], c, l.d_in),
            ));
            v.push((
                format!("delta.{}", l.name),
                padded(
                    &deltas[i][start * l.d_out..(start + m) * l.d_out],
                    c,
                    l.d_out,
                ),
            ));
        }
        v
    }

    fn weight_mut(&mut self, layer: &str) -> Result<&mut HostTensor> {
        let name = format!("{layer}.w");
        self.lm
            .iter_mut()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
            .with_context(|| format!("the model has no '{name}'"))
    }

    /// Take an edit back out (the weights it replaced, exactly).
    pub fn undo(&mut self, applied: Applied) -> Result<()> {
        let layers = self.meta.layers.clone();
        for (l, w) in layers.iter().zip(applied.previous) {
            *self.weight_mut(&l.name)? = w;
        }
        Ok(())
    }

    /// The unrelated prompts of `reqs`, chunk by chunk (the `kl` batches).
    fn unrelated_chunks(&self, reqs: &[EditRequest]) -> Vec<Vec<Prompt>> {
        reqs.chunks(self.meta.chunk)
            .map(|ch| {
                ch.iter()
                    .flat_map(|r| r.unrelated.iter().cloned())
                    .collect()
            })
            .collect()
    }

    /// The locality reference: the log-probabilities after each unrelated
    /// prompt of `reqs`, one tensor per chunk, of the unedited LM or (with
    /// `[meta] reference = "current"`) of the current one (take it before
    /// editing).
    pub fn reference(&mut self, reqs: &[EditRequest]) -> Result<Vec<HostTensor>> {
        let kl = self.meta.chunk * self.meta.unrelated;
        let mut v = vec![];
        for prompts in self.unrelated_chunks(reqs) {
            ensure!(
                !prompts.is_empty(),
                "edit requests without unrelated prompts"
            );
            let picked: Vec<&Prompt> = prompts.iter().collect();
            let [t, p, _] = answer_batch(&picked, kl, self.meta.seq)?;
            let mut ins = refs(match self.meta.meta.reference {
                LocalityReference::Unedited => &self.base,
                LocalityReference::Current => &self.lm,
            });
            ins.push(("tokens", &t));
            ins.push(("positions", &p));
            let mut out: HashMap<String, HostTensor> = self.logp.run(&ins)?.into_iter().collect();
            v.push(output(&mut out, LOGP, "logp")?);
        }
        Ok(v)
    }

    /// The meta-loss of the edited LM on `reqs` and its gradient, carried
    /// back through the solve and the hypernetwork; adds the gradient to
    /// `grads` (by hypernetwork parameter name) and returns the loss.
    pub fn meta_backward(
        &mut self,
        reqs: &[EditRequest],
        applied: &Applied,
        reference: &[HostTensor],
        grads: &mut BTreeMap<String, Vec<f32>>,
    ) -> Result<f64> {
        let c = self.meta.chunk;
        let (ne, nu) = (self.meta.equivalents, self.meta.unrelated);
        let n = reqs.len() as f32;
        let w = &self.meta.meta;
        let (w_edit, w_eq, w_loc) = (
            w.edit as f32 / n,
            w.equivalent as f32 / (n * ne.max(1) as f32),
            w.locality as f32 / (n * nu as f32),
        );
        let layers = self.meta.layers.clone();
        let mut loss = 0.0;
        let mut g_w: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.0; l.d_in * l.d_out]).collect();
        for (k, chunk) in reqs.chunks(c).enumerate() {
            let mut ce_prompts: Vec<&Prompt> = vec![];
            let mut ce_w = vec![];
            for r in chunk {
                ce_prompts.push(&r.edit);
                ce_w.push(w_edit);
                for e in &r.equivalent {
                    ce_prompts.push(e);
                    ce_w.push(w_eq);
                }
            }
            let kl_prompts: Vec<&Prompt> = chunk.iter().flat_map(|r| &r.unrelated).collect();
            let kl_w = vec![w_loc; kl_prompts.len()];
            loss += self.meta_loss_into(
                (&ce_prompts, ce_w),
                (&kl_prompts, kl_w),
                &reference[k],
                &mut g_w,
            )?;
        }
        // Through the solve ...
        let mut dd = vec![];
        let mut dlamda = vec![];
        for (i, s) in applied.shifts.iter().enumerate() {
            let (d, l) = s.backward(&g_w[i])?;
            dd.push(d);
            dlamda.push(l as f32);
        }
        // ... and the hypernetwork.
        let base = self.values_inputs();
        for start in (0..applied.n).step_by(c) {
            let m = c.min(applied.n - start);
            let mut pairs = self.pair_inputs(&applied.keys, &applied.deltas, start, m);
            for (i, l) in layers.iter().enumerate() {
                pairs.push((
                    format!("dd.{}", l.name),
                    padded(&dd[i][start * l.d_out..(start + m) * l.d_out], c, l.d_out),
                ));
            }
            let mut ins: Vec<(&str, &HostTensor)> =
                base.iter().map(|(k, t)| (k.as_str(), t)).collect();
            ins.extend(pairs.iter().map(|(k, t)| (k.as_str(), t)));
            for (name, t) in self.values_vjp.run(&ins)? {
                let key = name.trim_start_matches("grad.").to_string();
                let g = f32s(&t)?;
                let acc = grads.entry(key).or_insert_with(|| vec![0.0; g.len()]);
                for (a, b) in acc.iter_mut().zip(g) {
                    *a += b;
                }
            }
        }
        let acc = grads
            .entry("hyper.lamda".to_string())
            .or_insert_with(|| vec![0.0; dlamda.len()]);
        for (a, b) in acc.iter_mut().zip(dlamda) {
            *a += b;
        }
        Ok(loss)
    }

    /// One Adam step on the hypernetwork with `grads` (clipped to the
    /// bundle's global norm); returns the norm before clipping.
    pub fn update(&mut self, grads: &BTreeMap<String, Vec<f32>>) -> Result<f64> {
        let norm = grads
            .values()
            .flat_map(|g| g.iter())
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let clip = self.meta.meta.clip;
        let scale = if clip > 0.0 && norm > clip {
            (clip / norm) as f32
        } else {
            1.0
        };
        let gts: Named<HostTensor> = self
            .hyper
            .iter()
            .map(|(n, t)| {
                let g = grads
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; t.num_elements()]);
                let g: Vec<f32> = g.into_iter().map(|x| x * scale).collect();
                (format!("grad.{n}"), tensor(t.shape(), g))
            })
            .collect();
        let mut ins: Vec<(&str, &HostTensor)> =
            self.hyper.iter().map(|(n, t)| (n.as_str(), t)).collect();
        ins.extend(gts.iter().map(|(n, t)| (n.as_str(), t)));
        ins.extend(self.adam_state.iter().map(|(n, t)| (n.as_str(), t)));
        let mut out: HashMap<String, HostTensor> = self.adam.run(&ins)?.into_iter().collect();
        for (n, t) in self.hyper.iter_mut().chain(self.adam_state.iter_mut()) {
            *t = output(&mut out, HYPER_ADAM, &format!("new.{n}"))?;
        }
        Ok(norm)
    }

    /// ES, GS and LS of the current LM on `reqs`.
    pub fn measure(&mut self, reqs: &[EditRequest]) -> Result<EditScores> {
        let edits: Vec<Prompt> = reqs.iter().map(|r| r.edit.clone()).collect();
        let eq: Vec<Prompt> = reqs
            .iter()
            .flat_map(|r| r.equivalent.iter().cloned())
            .collect();
        let un: Vec<Prompt> = reqs
            .iter()
            .flat_map(|r| r.unrelated.iter().cloned())
            .collect();
        let acc = |s: Scores| {
            if s.correct.is_empty() {
                f64::NAN
            } else {
                s.accuracy()
            }
        };
        Ok(EditScores {
            es: acc(self.eval.scores(&self.lm, &edits)?),
            gs: acc(self.eval.scores(&self.lm, &eq)?),
            ls: acc(self.eval.scores(&self.lm, &un)?),
        })
    }

    /// The scores of `prompts` under the current LM.
    pub fn scores(&mut self, prompts: &[Prompt]) -> Result<Scores> {
        self.eval.scores(&self.lm, prompts)
    }

    /// Run `meta_loss` on one chunk: `ce` prompts with their weights (the
    /// new answers' cross-entropy), `kl` prompts with theirs and the
    /// reference log-probabilities; adds the gradient with respect to each
    /// edited weight to `g_w` and returns the loss. Weights are padded with
    /// zeros to the graph's batches.
    fn meta_loss_into(
        &mut self,
        ce: (&[&Prompt], Vec<f32>),
        kl: (&[&Prompt], Vec<f32>),
        ref_logp: &HostTensor,
        g_w: &mut [Vec<f32>],
    ) -> Result<f64> {
        let (c, seq) = (self.meta.chunk, self.meta.seq);
        let (nce, nkl) = (c * (1 + self.meta.equivalents), c * self.meta.unrelated);
        let (mut ce_w, mut kl_w) = (ce.1, kl.1);
        ce_w.resize(nce, 0.0);
        kl_w.resize(nkl, 0.0);
        let [ct, cp, ca] = answer_batch(ce.0, nce, seq)?;
        let [kt, kp, _] = answer_batch(kl.0, nkl, seq)?;
        let (cw, kw) = (tensor(&[nce], ce_w), tensor(&[nkl], kl_w));
        let mut ins = refs(&self.lm);
        ins.extend([
            ("ce.tokens", &ct),
            ("ce.positions", &cp),
            ("ce.answers", &ca),
            ("ce.weights", &cw),
            ("kl.tokens", &kt),
            ("kl.positions", &kp),
            ("kl.weights", &kw),
            ("kl.ref_logp", ref_logp),
        ]);
        let mut out: HashMap<String, HostTensor> = self.meta_loss.run(&ins)?.into_iter().collect();
        for (l, g) in self.meta.layers.iter().zip(g_w.iter_mut()) {
            let grad = f32s(&output(&mut out, META_LOSS, &format!("grad.{}.w", l.name))?)?;
            for (a, b) in g.iter_mut().zip(grad) {
                *a += b;
            }
        }
        Ok(f64::from(
            output(&mut out, META_LOSS, "loss")?.to_scalar_f32()?,
        ))
    }

    /// The baseline: fine-tune the edited layers' weights on the edit
    /// prompts (mean cross-entropy of the new answers, all edits in every
    /// step), `steps` Adam steps at learning rate `lr` (the bundle's
    /// `ft_adam`, fresh state). Undo with [`Editor::undo`].
    pub fn fine_tune(&mut self, reqs: &[EditRequest], steps: usize, lr: f32) -> Result<Applied> {
        let c = self.meta.chunk;
        let kl = c * self.meta.unrelated;
        let n = reqs.len();
        ensure!(n > 0, "no edits");
        let layers = self.meta.layers.clone();
        let previous = layers
            .iter()
            .map(|l| self.weight_mut(&l.name).map(|w| w.clone()))
            .collect::<Result<Vec<_>>>()?;
        let mut state: Named<HostTensor> = self
            .meta
            .ft_adam_init
            .iter()
            .map(|r| (r.name.clone(), HostTensor::from_graph(&r.draw(0))))
            .collect();
        ensure!(
            !state.is_empty(),
            "the bundle has no ft_adam state (recompile it)"
        );
        let ref_logp = tensor(
            &[kl, self.meta.model.vocab],
            vec![0.0; kl * self.meta.model.vocab],
        );
        let lr = HostTensor::scalar_f32(lr);
        for _ in 0..steps {
            let mut g_w: Vec<Vec<f32>> =
                layers.iter().map(|l| vec![0.0; l.d_in * l.d_out]).collect();
            for chunk in reqs.chunks(c) {
                let prompts: Vec<&Prompt> = chunk.iter().map(|r| &r.edit).collect();
                let w = vec![1.0 / n as f32; chunk.len()];
                // No locality term: one placeholder prompt of weight 0.
                self.meta_loss_into(
                    (&prompts, w),
                    (&prompts[..1], vec![0.0]),
                    &ref_logp,
                    &mut g_w,
                )?;
            }
            let grads: Named<HostTensor> = layers
                .iter()
                .zip(g_w)
                .map(|(l, g)| (format!("grad.{}.w", l.name), tensor(&[l.d_in, l.d_out], g)))
                .collect();
            let weights: Named<HostTensor> = layers
                .iter()
                .map(|l| {
                    let name = format!("{}.w", l.name);
                    self.weight_mut(&l.name).map(|w| (name, w.clone()))
                })
                .collect::<Result<_>>()?;
            let mut ins = refs(&weights);
            ins.extend(refs(&grads));
            ins.extend(refs(&state));
            ins.push((FT_LR, &lr));
            let mut out: HashMap<String, HostTensor> =
                self.ft_adam.run(&ins)?.into_iter().collect();
            for l in &layers {
                let w = output(&mut out, FT_ADAM, &format!("new.{}.w", l.name))?;
                *self.weight_mut(&l.name)? = w;
            }
            for (name, t) in state.iter_mut() {
                *t = output(&mut out, FT_ADAM, &format!("new.{name}"))?;
            }
        }
        Ok(Applied {
            n,
            keys: vec![],
            deltas: vec![],
            shifts: vec![],
            previous,
        })
    }

    /// Take the hypernetwork and the normalisers' statistics from
    /// `tensors` (a run's `best.safetensors` or checkpoint); with
    /// `optimizer`, Adam's state too. `what` names the source in errors.
    pub fn load_hyper(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        what: &str,
        optimizer: bool,
    ) -> Result<()> {
        let adam: &mut Named<HostTensor> = &mut self.adam_state;
        let both = self
            .hyper
            .iter_mut()
            .chain(adam.iter_mut().filter(|_| optimizer));
        for (n, t) in both {
            let v = tensors
                .get(n.as_str())
                .with_context(|| format!("{what}: no tensor '{n}'"))?;
            ensure!(
                v.shape == t.shape(),
                "{what}: '{n}' has shape {:?}, the bundle {:?}",
                v.shape,
                t.shape()
            );
            *t = HostTensor::from_graph(v);
        }
        // The normalisers as the weights saw them (a checkpoint's exact f64
        // statistics come after this, from checkpoint.json).
        for (k, norm) in self.norms.iter_mut().enumerate() {
            let (m, sd) = (format!("norm.g{k}.mean"), format!("norm.g{k}.std"));
            let (m, sd) = (
                tensors
                    .get(&m)
                    .with_context(|| format!("{what}: no tensor '{m}'"))?,
                tensors
                    .get(&sd)
                    .with_context(|| format!("{what}: no tensor '{sd}'"))?,
            );
            let (m, sd) = (
                m.as_f32().context("f32 mean")?,
                sd.as_f32().context("f32 std")?,
            );
            ensure!(
                m.len() == norm.mean.len() && sd.len() == norm.var.len(),
                "{what}: normaliser {k} has {} entries, the bundle's {}",
                m.len(),
                norm.mean.len()
            );
            norm.mean = m.iter().map(|&x| f64::from(x)).collect();
            norm.var = sd
                .iter()
                .map(|&x| (f64::from(x).powi(2) - 1e-8).max(0.0))
                .collect();
        }
        Ok(())
    }
}
