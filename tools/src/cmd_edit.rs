//! `metac edit` (apply a meta-trained editor, or the fine-tuning baseline,
//! to a user's facts and write the edited language model), `metac facts`
//! (edit requests of a fact world as a facts file) and `metac eval` of an
//! edited model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::ValueEnum;
use metac_contract::bundle::{write_safetensors, Bundle};
use metac_contract::editor::{EditorMeta, Solver};
use metac_contract::fsutil::{sha256_hex, write_atomic};
use metac_contract::lm::{GptConfig, LmConfig, WorldConfig};
use metac_runtime::backend::open_backend;
use metac_runtime::data::edits::{load_requests, EditFormat, TextEdit};
use metac_runtime::data::facts::{EditRequest, FactWorld, Split};
use metac_runtime::editor::run::{RunRecord, RunWeights};
use metac_runtime::editor::{load_lm_weights, EditScores, Editor};
use metac_runtime::lm::run::TRAIN_SAMPLE;
use serde::{Deserialize, Serialize};

use crate::common::BackendArgs;

/// An edited model's record (`EDITED/edit.json`).
pub const EDIT_RECORD: &str = "edit.json";
/// The edited LM's weights (`EDITED/model.safetensors`).
pub const EDITED_WEIGHTS: &str = "model.safetensors";
/// The edits as read (`EDITED/facts.jsonl`).
pub const EDITED_FACTS: &str = "facts.jsonl";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FactsFormat {
    /// metac's JSON lines: one {"prompt", "target", "equivalent", "unrelated"} object per line.
    Jsonl,
    /// zsRE as MEND and MALMEN ship it (a JSON array).
    Zsre,
    /// CounterFact as ROME ships it (a JSON array).
    Counterfact,
}

impl FactsFormat {
    fn format(self) -> EditFormat {
        match self {
            FactsFormat::Jsonl => EditFormat::Jsonl,
            FactsFormat::Zsre => EditFormat::Zsre,
            FactsFormat::Counterfact => EditFormat::CounterFact,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightsChoice {
    /// RUN/best.safetensors: the hypernetwork with the best validation.
    Best,
    /// RUN/checkpoint.safetensors: the last trajectory's.
    Final,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// RUN's hypernetwork (MALMEN's least-squares shift, or MEND's sum of
    /// rank-one shifts, as its bundle was compiled).
    Editor,
    /// The baseline: fine-tune the edited layers with Adam on the edit
    /// prompts (--ft-steps, --ft-lr); RUN's hypernetwork is not used.
    Ft,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
metac facts --config configs/lm.toml --edits 100 --out facts.jsonl\n  \
metac edit runs/editor --facts facts.jsonl --out edited/\n  \
metac eval edited/\n  \
metac edit runs/editor --facts facts.jsonl --method ft --out edited-ft/\n\n\
A facts file has one edit per line:\n  \
{\"prompt\": \"...\", \"target\": \"...\", \"equivalent\": [\"...\"], \"unrelated\": [{\"prompt\": \"...\", \"answer\": \"...\"}]}\n\
prompts in the words of the LM's vocabulary (at most its compiled length), the target \
and answers one word each; equivalent prompts (should now give the target) and unrelated \
prompts (should keep their answer) are optional and give GS and LS.")]
pub struct Args {
    /// Run directory of `metac run` of an editor bundle.
    pub run: PathBuf,
    /// The facts to edit in (see below).
    #[arg(long)]
    pub facts: PathBuf,
    #[arg(long, value_enum, default_value_t = FactsFormat::Jsonl)]
    pub format: FactsFormat,
    /// Output directory: model.safetensors (the edited LM), edit.json (ES,
    /// GS, LS before and after, time), facts.jsonl (the edits as read).
    #[arg(long)]
    pub out: PathBuf,
    /// The editor bundle RUN trained (default: the one RUN/run.json names).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Which hypernetwork of RUN.
    #[arg(long, value_enum, default_value_t = WeightsChoice::Best)]
    pub weights: WeightsChoice,
    #[arg(long, value_enum, default_value_t = Method::Editor)]
    pub method: Method,
    /// FT: Adam steps, each over all edits.
    #[arg(long, default_value_t = 20)]
    pub ft_steps: usize,
    /// FT: Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub ft_lr: f32,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// `EDITED/edit.json`.
#[derive(Serialize, Deserialize)]
pub struct EditRecord {
    /// `malmen`, `mend` or `ft`.
    pub method: String,
    pub editor_run: PathBuf,
    pub bundle: PathBuf,
    pub facts: PathBuf,
    pub facts_sha256: String,
    pub edits: usize,
    pub layers: Vec<String>,
    /// FT's steps and learning rate.
    #[serde(default)]
    pub ft: Option<(usize, f32)>,
    /// Seconds of the edit (cache, values, solve and apply; FT: its steps).
    pub seconds: f64,
    pub before: EditScores,
    pub after: EditScores,
    pub lm_weights: PathBuf,
    pub lm_weights_sha256: String,
    pub model: GptConfig,
    pub world: WorldConfig,
}

/// Which method a bundle's editor is.
fn method_name(meta: &EditorMeta, method: Method) -> &'static str {
    match (method, meta.solver) {
        (Method::Ft, _) => "ft",
        (Method::Editor, Solver::LeastSquares) => "malmen",
        (Method::Editor, Solver::Sum) => "mend",
    }
}

/// An editor of RUN's bundle with its trained hypernetwork (for FT, the
/// bundle alone).
fn trained_editor(
    run: &Path,
    bundle: &Bundle,
    weights: WeightsChoice,
    method: Method,
    backend: &BackendArgs,
) -> Result<Editor> {
    let backend = open_backend(&backend.options())?;
    let mut editor = Editor::new(bundle, backend.as_ref(), 0)?;
    if method == Method::Editor {
        editor.load_run(
            run,
            match weights {
                WeightsChoice::Best => RunWeights::Best,
                WeightsChoice::Final => RunWeights::Final,
            },
        )?;
    }
    Ok(editor)
}

/// `metac edit`.
pub fn run(a: Args) -> Result<()> {
    ensure!(
        a.method != Method::Ft || (a.ft_steps > 0 && a.ft_lr.is_finite() && a.ft_lr > 0.0),
        "--ft-steps must be at least 1 and --ft-lr a finite number > 0"
    );
    // Everything is read and checked before anything is written.
    let bundle = RunRecord::bundle_of(&a.run, a.bundle.as_deref())?;
    let meta = EditorMeta::from_manifest(&bundle.manifest)
        .with_context(|| format!("{}", bundle.dir.display()))?;
    let world = FactWorld::generate(&meta.world)?;
    let reqs = load_requests(&a.facts, a.format.format(), &world.vocab, meta.seq)?;
    let facts_bytes = std::fs::read(&a.facts)?;
    let mut editor = trained_editor(&a.run, &bundle, a.weights, a.method, &a.backend)?;
    let before = editor.measure(&reqs)?;
    let t0 = Instant::now();
    match a.method {
        Method::Editor => {
            editor.edit(&reqs, false)?;
        }
        Method::Ft => {
            editor.fine_tune(&reqs, a.ft_steps, a.ft_lr)?;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let after = editor.measure(&reqs)?;
    let record = EditRecord {
        method: method_name(&meta, a.method).into(),
        editor_run: a.run.clone(),
        bundle: bundle.dir.clone(),
        facts: a.facts.clone(),
        facts_sha256: sha256_hex(&facts_bytes),
        edits: reqs.len(),
        layers: meta.layers.iter().map(|l| l.name.clone()).collect(),
        ft: (a.method == Method::Ft).then_some((a.ft_steps, a.ft_lr)),
        seconds,
        before,
        after,
        lm_weights: meta.lm_weights.clone(),
        lm_weights_sha256: meta.lm_weights_sha256.clone(),
        model: meta.model.clone(),
        world: meta.world.clone(),
    };
    // The edited model, the facts, and last the record that makes them count.
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let tensors: Vec<_> = editor
        .lm
        .iter()
        .map(|(n, t)| (n.clone(), t.to_graph()))
        .collect();
    write_atomic(&a.out.join(EDITED_WEIGHTS), &write_safetensors(&tensors)?)?;
    let facts: String = reqs
        .iter()
        .map(|r| TextEdit::decode(r, &world.vocab).to_jsonl() + "\n")
        .collect();
    write_atomic(&a.out.join(EDITED_FACTS), facts.as_bytes())?;
    write_atomic(
        &a.out.join(EDIT_RECORD),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    println!(
        "edited {} facts into {} with {} in {:.2}s: {} (before: {}); wrote {}",
        reqs.len(),
        record.layers.join(", "),
        record.method,
        seconds,
        after.show(),
        before.show(),
        a.out.join(EDITED_WEIGHTS).display()
    );
    Ok(())
}

#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
metac facts --config configs/lm.toml --edits 100 --out facts.jsonl\n  \
metac edit runs/editor --facts facts.jsonl --out edited/")]
pub struct FactsArgs {
    /// The LM config whose [world] the facts are of (configs/lm.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Number of edits (distinct facts, each given a new object).
    #[arg(long)]
    pub edits: usize,
    /// Whose facts: eval (the evaluation subjects, never seen in
    /// meta-training), validation or train.
    #[arg(long, value_enum, default_value_t = SplitChoice::Eval)]
    pub split: SplitChoice,
    /// Unrelated prompts per edit (facts of the reserved subjects).
    #[arg(long, default_value_t = 1)]
    pub unrelated: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The facts file (JSON lines) to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitChoice {
    Eval,
    Validation,
    Train,
}

/// `metac facts`.
pub fn facts(a: FactsArgs) -> Result<()> {
    ensure!(a.edits > 0, "--edits must be at least 1");
    let lm = LmConfig::load(&a.config)?;
    let world = FactWorld::generate(&lm.world)
        .with_context(|| format!("the [world] of {}", a.config.display()))?;
    let split = match a.split {
        SplitChoice::Eval => Split::Eval,
        SplitChoice::Validation => Split::Validation,
        SplitChoice::Train => Split::Train,
    };
    let reqs = world.edit_requests(split, a.edits, a.unrelated, a.seed)?;
    let text: String = reqs
        .iter()
        .map(|r| TextEdit::decode(r, &world.vocab).to_jsonl() + "\n")
        .collect();
    write_atomic(&a.out, text.as_bytes())?;
    println!(
        "wrote {} edit requests of the {:?} subjects to {}",
        reqs.len(),
        a.split,
        a.out.display()
    );
    Ok(())
}

/// `EDITED/eval.json` (or `--out`'s).
#[derive(Serialize)]
struct EditedEval {
    facts: PathBuf,
    edits: usize,
    /// ES, GS, LS of the facts: the unedited and the edited model.
    unedited: EditScores,
    edited: EditScores,
    /// Accuracy on a fixed sample of the world's facts under their
    /// training templates, and on the held-out paraphrases: how much of
    /// what the model knew survives the edit.
    world_train_templates: (f64, f64),
    world_heldout_paraphrases: (f64, f64),
    world_sample: usize,
}

/// `metac eval EDITED`: the edited model against the unedited one on the
/// edits (ES, GS, LS) and on the rest of the world.
pub fn eval_edited(
    dir: &Path,
    facts: Option<&Path>,
    out: Option<&Path>,
    backend: &BackendArgs,
) -> Result<()> {
    let p = dir.join(EDIT_RECORD);
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let rec: EditRecord =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    let bundle = Bundle::load(&rec.bundle)
        .with_context(|| format!("the editor bundle {} names (edited with it)", p.display()))?;
    let meta = EditorMeta::from_manifest(&bundle.manifest)?;
    let world = FactWorld::generate(&meta.world)?;
    let facts = facts.map_or_else(|| dir.join(EDITED_FACTS), Path::to_path_buf);
    let reqs: Vec<EditRequest> = load_requests(&facts, EditFormat::Jsonl, &world.vocab, meta.seq)?;
    let edited = load_lm_weights(&dir.join(EDITED_WEIGHTS), &meta.model)?;
    let be = open_backend(&backend.options())?;
    let mut editor = Editor::new(&bundle, be.as_ref(), 0)?;
    let mut rng = metac_contract::init::SeededRng::new(meta.world.seed, 7);
    let train = world.training_prompts();
    let sample: Vec<_> = (0..TRAIN_SAMPLE.min(train.len()))
        .map(|_| train[rng.below(train.len() as u64) as usize].clone())
        .collect();
    let heldout = world.heldout_prompts();
    let measure = |editor: &mut Editor| -> Result<(EditScores, f64, f64)> {
        Ok((
            editor.measure(&reqs)?,
            editor.scores(&sample)?.accuracy(),
            editor.scores(&heldout)?.accuracy(),
        ))
    };
    let (s0, t0, h0) = measure(&mut editor)?;
    editor.lm = edited;
    let (s1, t1, h1) = measure(&mut editor)?;
    let e = EditedEval {
        facts: facts.clone(),
        edits: reqs.len(),
        unedited: s0,
        edited: s1,
        world_train_templates: (t0, t1),
        world_heldout_paraphrases: (h0, h1),
        world_sample: sample.len(),
    };
    let out = out.unwrap_or(dir);
    std::fs::create_dir_all(out)?;
    let path = out.join("eval.json");
    write_atomic(&path, serde_json::to_string_pretty(&e)?.as_bytes())?;
    println!(
        "{} ({} edits of {}, {}):\n  the edits       unedited {}   edited {}\n  world facts     unedited {:.3}   edited {:.3}   ({} facts under training templates)\n  paraphrases     unedited {:.3}   edited {:.3}   ({} held-out paraphrases)\nwrote {}",
        dir.display(),
        reqs.len(),
        facts.display(),
        rec.method,
        s0.show(),
        s1.show(),
        t0,
        t1,
        sample.len(),
        h0,
        h1,
        heldout.len(),
        path.display()
    );
    Ok(())
}
