//! The model-editing program (`metac compile editor`): the MALMEN editor of
//! `crate::models::editor` compiled into a bundle (graph names and the
//! record in `metac_contract::editor`).
//!
//! The language model's shape, sequence length and prompts per edit come
//! from its data, which the caller generates.

use std::path::Path;

use anyhow::{Context, Result};
use metac_contract::bundle::{BundleBuilder, Manifest, Port, StateBuffer};
use metac_contract::editor::{
    EditorConfig, EditorMeta, LayerMeta, CACHE, EDITOR_KIND, EVALUATE, FT_ADAM, HYPER_ADAM, LOGP,
    META_LOSS, VALUES, VALUES_VJP,
};
use metac_contract::lm::{GptConfig, WorldConfig};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph};

use crate::lm::build_lm_evaluate;
use crate::models::baselines::{constant_rules, Adam, StepOptimizer};
use crate::models::editor::{Editor, EditorSpec};
use crate::models::transformer::Gpt;

/// The prefix of `ft_adam`'s state names (apart from the hypernetwork's
/// Adam state).
const FT_STATE: &str = "ft.";

/// What the caller knows about the edited model and its data.
pub struct EditedModel {
    pub model: GptConfig,
    pub world: WorldConfig,
    /// Longest prompt, in tokens.
    pub seq: usize,
    /// Equivalent prompts per edit (the world's held-out paraphrases).
    pub equivalents: usize,
    pub weights_sha256: String,
}

/// One Adam step on named parameters: inputs the parameters, `grad.{name}`
/// and Adam's state (its names after `state_prefix`); outputs `new.{name}`
/// for parameters and state.
pub fn build_adam_step(adam: &Adam, shapes: &[(String, Vec<usize>)], state_prefix: &str) -> Graph {
    let mut g = Graph::new();
    let params: Vec<_> = shapes
        .iter()
        .map(|(n, s)| g.input(n, DType::F32, s))
        .collect();
    let grads: Vec<_> = shapes
        .iter()
        .map(|(n, s)| g.input(&format!("grad.{n}"), DType::F32, s))
        .collect();
    let only: Vec<Vec<usize>> = shapes.iter().map(|(_, s)| s.clone()).collect();
    let state_specs: Vec<(String, Vec<usize>)> = adam
        .state_specs(&only)
        .into_iter()
        .map(|(n, s)| (format!("{state_prefix}{n}"), s))
        .collect();
    let state: Vec<_> = state_specs
        .iter()
        .map(|(n, s)| g.input(n, DType::F32, s))
        .collect();
    let (new_p, new_s) = adam.step(&mut g, &params, &grads, &state);
    for ((n, _), id) in shapes.iter().zip(new_p) {
        g.output(&format!("new.{n}"), id);
    }
    for ((n, _), id) in state_specs.iter().zip(new_s) {
        g.output(&format!("new.{n}"), id);
    }
    g
}

/// Compile the editor of `config` for `lm` into a bundle in `out`.
pub fn compile_editor(config: &EditorConfig, lm: &EditedModel, out: &Path) -> Result<Manifest> {
    config.validate()?;
    let gpt = Gpt::new(lm.model.clone()).map_err(anyhow::Error::msg)?;
    let e = &config.editor;
    let editor = Editor::new(
        gpt.clone(),
        EditorSpec {
            layers: e.layers.clone(),
            rank: e.rank,
            blocks: e.blocks,
            lr_init: e.lr_init as f32,
            log_lr: e.log_lr,
        },
    )
    .map_err(|m| anyhow::anyhow!("config key 'editor.layers': {m}"))?;
    let (c, seq) = (e.chunk, lm.seq);
    let ce = c * (1 + lm.equivalents);
    let kl = c * e.unrelated;
    let adam = Adam::with_lr(config.meta.lr as f32);
    let hyper_shapes = editor.hyper_shapes();
    // Fine-tuning (the baseline): Adam on the edited weights at the rate
    // the host passes as `lr_scale`.
    let ft = Adam {
        lr: 1.0,
        scaled_lr: true,
        ..Adam::default()
    };
    let ft_shapes: Vec<(String, Vec<usize>)> = editor
        .layers
        .iter()
        .map(|l| (format!("{}.w", l.name), vec![l.d_in, l.d_out]))
        .collect();
    let graphs: Vec<(&str, Graph)> = vec![
        (CACHE, editor.build_cache(c, seq)),
        (VALUES, editor.build_values(c)),
        (VALUES_VJP, editor.build_values_vjp(c)),
        (META_LOSS, editor.build_meta_loss(ce, kl, seq)),
        (LOGP, editor.build_logp(kl, seq)),
        (EVALUATE, build_lm_evaluate(&gpt, ce, seq)),
        (HYPER_ADAM, build_adam_step(&adam, &hyper_shapes, "")),
        (FT_ADAM, build_adam_step(&ft, &ft_shapes, FT_STATE)),
    ];
    let mut b = BundleBuilder::new(EDITOR_KIND);
    for (name, g) in &graphs {
        b.graph(name, &optimize(g))
            .with_context(|| format!("exporting {name}"))?;
    }
    let port = |graph: &str, tensor: &str| Port {
        graph: graph.into(),
        tensor: tensor.into(),
    };
    let reads = |name: &str| -> Vec<Port> {
        graphs
            .iter()
            .filter(|(_, g)| g.find_input(name).is_some())
            .map(|(gn, _)| port(gn, name))
            .collect()
    };
    // The LM's parameters come from its weights file; the host shifts them.
    for (name, shape) in gpt.param_shapes() {
        b.state(StateBuffer {
            reads: reads(&name),
            name,
            dtype: "f32".into(),
            shape,
            init: None,
            updated_by: None,
        });
    }
    let hyper_init = editor.hyper_init_rules();
    let only: Vec<Vec<usize>> = hyper_shapes.iter().map(|(_, s)| s.clone()).collect();
    let adam_init = constant_rules(adam.initial_state(&only))?;
    for r in hyper_init.iter().chain(&adam_init) {
        b.state(StateBuffer {
            name: r.name.clone(),
            dtype: "f32".into(),
            shape: r.shape.clone(),
            init: None,
            reads: reads(&r.name),
            updated_by: Some(port(HYPER_ADAM, &format!("new.{}", r.name))),
        });
    }
    let mut shown = serde_json::to_value(config)?;
    if let Some(o) = shown.as_object_mut() {
        o.remove("run");
    }
    let meta = EditorMeta {
        config: shown,
        model: lm.model.clone(),
        world: lm.world.clone(),
        lm_weights: config.lm.weights.clone(),
        lm_weights_sha256: lm.weights_sha256.clone(),
        layers: editor
            .layers
            .iter()
            .map(|l| LayerMeta {
                name: l.name.clone(),
                d_in: l.d_in,
                d_out: l.d_out,
                group: l.group,
            })
            .collect(),
        chunk: c,
        seq,
        equivalents: lm.equivalents,
        unrelated: e.unrelated,
        norm_dims: editor.groups.iter().map(|((i, o), _)| i + o).collect(),
        meta: config.meta.clone(),
        hyper_init,
        adam_init,
        solver: e.solver,
        preserve: e.preserve,
        ft_adam_init: constant_rules(
            ft.initial_state(&ft_shapes.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>())
                .into_iter()
                .map(|(n, t)| (format!("{FT_STATE}{n}"), t))
                .collect(),
        )?,
    };
    b.meta(meta.to_meta());
    b.write(out)
}
