//! `metac compile editor` and `metac run` of an editor bundle: the MALMEN
//! hypernetwork meta-trained to edit a language model's facts.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use metac_compiler::editor::{compile_editor, EditedModel};
use metac_contract::bundle::Bundle;
use metac_contract::editor::{editor_run_settings, EditorConfig};
use metac_contract::fsutil::{sha256_hex, write_atomic};
use metac_contract::lm::LmConfig;
use metac_runtime::backend::open_backend;
use metac_runtime::data::facts::FactWorld;
use metac_runtime::editor::run::{EditorWorkload, RunRecord};
use metac_runtime::editor::{load_lm_weights, EditScores, Editor};
use metac_runtime::trainer::{Trainer, TrainerOptions, BEST_WEIGHTS};
use serde::Serialize;

use crate::cmd_l2o::RunArgs;

/// `metac compile editor --config FILE --out DIR`.
pub fn compile(config: &Path, out: &Path) -> Result<()> {
    let c = EditorConfig::load(config)?;
    let t0 = Instant::now();
    let lm = LmConfig::load(&c.lm.config).context("config key 'lm.config'")?;
    let world = FactWorld::generate(&lm.world)
        .with_context(|| format!("the [world] of {}", c.lm.config.display()))?;
    let model = lm.model.with_vocab(world.vocab.len());
    // The weights must be the model's before anything is written.
    load_lm_weights(&c.lm.weights, &model).context("config key 'lm.weights'")?;
    let weights = std::fs::read(&c.lm.weights)?;
    let m = compile_editor(
        &c,
        &EditedModel {
            model,
            world: lm.world.clone(),
            seq: world.longest_prompt(),
            equivalents: lm.world.heldout_templates,
            weights_sha256: sha256_hex(&weights),
        },
        out,
    )?;
    println!(
        "wrote editor bundle {} ({} graphs; edits {} in chunks of {}) in {:.1}s",
        out.display(),
        m.graphs.len(),
        c.editor.layers.join(", "),
        c.editor.chunk,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `RUN/summary.json` of an editor run.
#[derive(Serialize)]
struct Summary {
    /// The hypernetwork the scores are of.
    weights: &'static str,
    trajectories: usize,
    seconds: f64,
    validation_edits: usize,
    /// ES, GS, LS of the unedited LM and after the edit.
    before: EditScores,
    after: EditScores,
}

/// `metac run` of an editor bundle.
pub fn run(a: RunArgs, bundle: Bundle) -> Result<()> {
    let cfg = a.config.as_ref().with_context(|| {
        format!(
            "{} is an editor bundle: pass its config with --config (the [run] table: trajectories, batches, edits)",
            bundle.dir.display()
        )
    })?;
    let mut s = editor_run_settings(cfg)?;
    if let Some(v) = a.seed {
        s.seed = v;
    }
    if let Some(v) = a.evaluation_period {
        s.evaluation_period = v;
    }
    if let Some(v) = a.trajectories {
        s.trajectories = v;
    }
    s.validate()?;
    let backend = open_backend(&a.backend.options())?;
    let t0 = Instant::now();
    let editor = Editor::new(&bundle, backend.as_ref(), s.seed)?;
    let identity = bundle.manifest_sha256()?;
    let mut w = EditorWorkload::new(editor, s.clone())?;
    let mut trainer = Trainer::open(&mut w, &a.out, &identity, a.resume)?;
    RunRecord::write(&a.out, &bundle)?;
    if !a.quiet {
        eprintln!(
            "metac run: editor of {} on {} ({}), {} trajectories x {} batches x {} edits, seed {}; unedited LM on the validation edits: ES {:.3} GS {:.3} LS {:.3}; starting at trajectory {}",
            w.editor.meta.layers.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "),
            backend.name(),
            a.backend.device,
            s.trajectories,
            s.batches,
            s.edits,
            s.seed,
            w.before.es,
            w.before.gs,
            w.before.ls,
            trainer.completed()
        );
    }
    let opts = TrainerOptions {
        iterations: s.trajectories,
        evaluation_period: s.evaluation_period,
        quiet: a.quiet,
    };
    trainer.run(&mut w, opts, &mut |_| {})?;
    let weights = if trainer.restore_best(&mut w)? {
        BEST_WEIGHTS
    } else {
        "final hypernetwork"
    };
    let reqs = w.validation_requests().to_vec();
    let after = w.evaluate_edits(&reqs)?;
    let summary = Summary {
        weights,
        trajectories: trainer.completed(),
        seconds: t0.elapsed().as_secs_f64(),
        validation_edits: reqs.len(),
        before: w.before,
        after,
    };
    write_atomic(
        &a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "meta-trained {} trajectories; {} on {} validation edits: ES {:.3} GS {:.3} LS {:.3} (unedited: ES {:.3} GS {:.3} LS {:.3}); {}",
        trainer.completed(),
        summary.weights,
        reqs.len(),
        after.es,
        after.gs,
        after.ls,
        w.before.es,
        w.before.gs,
        w.before.ls,
        a.out.join("summary.json").display()
    );
    Ok(())
}
