//! ONNX import: the PyTorch-exported fixtures in `tests/fixtures/onnx/`
//! reproduce torch's float64 loss, gradient and both HVPs (raw and optimised
//! graphs); an export/import round trip preserves evaluations; single-op
//! models check the composite lowerings; bad models give clear errors.

use std::collections::HashMap;

use metac_graphs::autodiff::{grad, hvp_forward_over_reverse, hvp_reverse_over_reverse};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::onnx::pb::{
    self, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use metac_graphs::onnx::{export_bytes, import_bytes, import_file, ImportError, ImportedModel};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph, NodeId};
use ndarray::{ArrayD, IxDyn};
use prost::Message;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/onnx/");

// ---- a small JSON reader for the reference files ------------------------------

#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn at(&self, key: &str) -> &Json {
        self.get(key)
            .unwrap_or_else(|| panic!("missing key '{key}'"))
    }
    fn num(&self) -> f64 {
        match self {
            Json::Num(x) => *x,
            other => panic!("expected a number, got {other:?}"),
        }
    }
    fn nums(&self) -> Vec<f64> {
        match self {
            Json::Arr(v) => v.iter().map(Json::num).collect(),
            other => panic!("expected an array, got {other:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
    fn entries(&self) -> &[(String, Json)] {
        match self {
            Json::Obj(kv) => kv,
            other => panic!("expected an object, got {other:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn parse(text: &str) -> Json {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing characters in JSON");
        v
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(
            self.s.get(self.i),
            Some(&c),
            "JSON: expected '{}' at byte {}",
            c as char,
            self.i
        );
        self.i += 1;
    }
    fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.i).expect("JSON: unexpected end")
    }
    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.eat(b'{');
                let mut kv = vec![];
                if self.peek() != b'}' {
                    loop {
                        let k = self.string();
                        self.eat(b':');
                        kv.push((k, self.value()));
                        if self.peek() == b',' {
                            self.eat(b',');
                        } else {
                            break;
                        }
                    }
                }
                self.eat(b'}');
                Json::Obj(kv)
            }
            b'[' => {
                self.eat(b'[');
                let mut v = vec![];
                if self.peek() != b']' {
                    loop {
                        v.push(self.value());
                        if self.peek() == b',' {
                            self.eat(b',');
                        } else {
                            break;
                        }
                    }
                }
                self.eat(b']');
                Json::Arr(v)
            }
            b'"' => Json::Str(self.string()),
            b't' | b'f' | b'n' => {
                for (word, v) in [
                    ("true", Json::Bool(true)),
                    ("false", Json::Bool(false)),
                    ("null", Json::Null),
                ] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return v;
                    }
                }
                panic!("JSON: bad literal at byte {}", self.i)
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(
                    t.parse()
                        .unwrap_or_else(|_| panic!("JSON: bad number '{t}'")),
                )
            }
        }
    }
    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => return out,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'u' => {
                            let h = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            self.i += 4;
                            out.push(
                                char::from_u32(u32::from_str_radix(h, 16).unwrap())
                                    .unwrap_or('\u{fffd}'),
                            );
                        }
                        other => out.push(other as char),
                    }
                }
                _ => {
                    // Copy a whole UTF-8 sequence.
                    let start = self.i - 1;
                    while self.i < self.s.len() && (self.s[self.i] & 0xC0) == 0x80 {
                        self.i += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..self.i]).unwrap());
                }
            }
        }
    }
}

#[test]
fn json_reader() {
    let j = Parser::parse(
        r#" {"a": [1, -2.5e-3, 3E2], "b": {"c": "x\"y\u0041"}, "d": [], "e": true, "f": null} "#,
    );
    assert_eq!(j.at("a").nums(), vec![1.0, -2.5e-3, 300.0]);
    assert_eq!(j.at("b").at("c").str(), "x\"yA");
    assert!(matches!(j.at("e"), Json::Bool(true)));
    assert!(matches!(j.at("f"), Json::Null));
    assert!(matches!(j.at("d"), Json::Arr(v) if v.is_empty()));
}

// ---- helpers --------------------------------------------------------------------

fn fvalue(shape: &[usize], data: Vec<f64>) -> Value {
    Value::F(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap())
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::F(a) => a.iter().copied().collect(),
        Value::I(a) => a.iter().map(|&x| x as f64).collect(),
        Value::B(a) => a.iter().map(|&x| x as u8 as f64).collect(),
    }
}

/// Max |got - want| relative to max |want| (with an absolute floor).
fn rel_err(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(floor);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn outputs_by_name(g: &Graph, feeds: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, feeds)
        .expect("evaluation")
        .into_iter()
        .collect()
}

/// The reference's data inputs as interpreter values (x as float32, y int64).
fn ref_inputs(r: &Json) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    for (name, t) in r.at("inputs").entries() {
        let shape: Vec<usize> = t.at("shape").nums().iter().map(|&d| d as usize).collect();
        let data = t.at("data").nums();
        let v = match t.at("dtype").str() {
            "float32" => fvalue(&shape, data.iter().map(|&x| x as f32 as f64).collect()),
            "int64" => Value::I(
                ArrayD::from_shape_vec(IxDyn(&shape), data.iter().map(|&x| x as i64).collect())
                    .unwrap(),
            ),
            other => panic!("dtype {other}"),
        };
        m.insert(name.clone(), v);
    }
    m
}

/// A fixture's loss, gradient and HVP graph: the imported model plus one
/// `v:<param>` input per parameter and outputs `grad:<p>`, `hvp_fr:<p>`,
/// `hvp_rr:<p>`.
fn derivative_graph(model: &ImportedModel, optimize_first: bool) -> Graph {
    let mut g = if optimize_first {
        optimize(&model.graph)
    } else {
        model.graph.clone()
    };
    let loss = g.find_output("loss").expect("loss output");
    let params: Vec<NodeId> = model
        .initializers
        .iter()
        .map(|(n, _)| g.find_input(n).expect("parameter input"))
        .collect();
    let vs: Vec<NodeId> = model
        .initializers
        .iter()
        .map(|(n, t)| g.input(&format!("v:{n}"), DType::F32, &t.shape))
        .collect();
    let gr = grad(&mut g, loss, &params);
    let fr = hvp_forward_over_reverse(&mut g, loss, &params, &vs);
    let rr = hvp_reverse_over_reverse(&mut g, loss, &params, &vs);
    for (i, (n, _)) in model.initializers.iter().enumerate() {
        g.output(&format!("grad:{n}"), gr[i]);
        g.output(&format!("hvp_fr:{n}"), fr[i]);
        g.output(&format!("hvp_rr:{n}"), rr[i]);
    }
    g
}

fn fixture_feeds(model: &ImportedModel, r: &Json) -> HashMap<String, Value> {
    let mut feeds = ref_inputs(r);
    for (n, t) in &model.initializers {
        feeds.insert(n.clone(), Value::from_tensor(t));
        let v = r.at("v").at(n).nums();
        feeds.insert(format!("v:{n}"), fvalue(&t.shape, v));
    }
    feeds
}

/// Import a fixture, check loss, gradient and HVPs against torch; returns
/// (loss rel error, max grad rel error, max HVP rel error) over both graphs.
fn check_fixture(name: &str) -> (f64, f64, f64) {
    let path = format!("{FIXTURES}{name}.onnx");
    let r = Parser::parse(&std::fs::read_to_string(format!("{FIXTURES}{name}.ref.json")).unwrap());
    let model = import_file(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.data_inputs, vec!["x".to_string(), "y".to_string()]);
    assert_eq!(model.opset, r.at("opset").num() as i64);
    // The parameters are the float initializers, with torch's values.
    let ref_params = r.at("params").entries();
    assert_eq!(
        model.initializers.len(),
        ref_params.len(),
        "{name}: parameter count"
    );
    for (n, t) in &model.initializers {
        let want = r.at("params").at(n);
        let shape: Vec<usize> = want
            .at("shape")
            .nums()
            .iter()
            .map(|&d| d as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}: shape of {n}");
        // 9 significant digits: exact once read as float32.
        let want: Vec<f32> = want.at("data").nums().iter().map(|&x| x as f32).collect();
        assert!(
            t.as_f32().unwrap() == want.as_slice(),
            "{name}: value of {n}"
        );
    }
    let want_loss = r.at("loss").num();
    let feeds = fixture_feeds(&model, &r);
    let (mut e_loss, mut e_grad, mut e_hvp) = (0.0f64, 0.0f64, 0.0f64);
    for optimized in [false, true] {
        let g = derivative_graph(&model, optimized);
        let g = if optimized { optimize(&g) } else { g };
        let out = outputs_by_name(&g, &feeds);
        let loss = flat(&out["loss"])[0];
        let el = ((loss - want_loss) / want_loss).abs();
        assert!(
            el < 1e-5,
            "{name} (optimized={optimized}): loss {loss} vs torch {want_loss}"
        );
        e_loss = e_loss.max(el);
        for (n, _) in &model.initializers {
            let check = |what: &str, key: &str| -> f64 {
                let want = r.at(key).at(n).nums();
                let got = flat(&out[&format!("{what}:{n}")]);
                // Relative to the block's scale, with a floor for blocks
                // that are analytically zero (k.bias in the transformer).
                let e = rel_err(&got, &want, 1e-2);
                assert!(
                    e < 1e-4,
                    "{name} (optimized={optimized}): {what} of {n}: rel err {e:.3e}"
                );
                // Reported: the plain relative error of the non-zero blocks.
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                if scale > 1e-12 {
                    rel_err(&got, &want, 0.0)
                } else {
                    0.0
                }
            };
            e_grad = e_grad.max(check("grad", "grad"));
            e_hvp = e_hvp
                .max(check("hvp_fr", "hvp"))
                .max(check("hvp_rr", "hvp"));
        }
    }
    (e_loss, e_grad, e_hvp)
}

#[test]
fn fixtures_match_torch() {
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let f = p.file_name()?.to_str()?.to_string();
            let stem = f.strip_suffix(".onnx")?.to_string();
            let has_loss = std::fs::read_to_string(format!("{FIXTURES}{stem}.ref.json"))
                .map(|s| s.contains("\"loss\""))
                .unwrap_or(false);
            (has_loss && (stem.ends_with("_opset18") || stem.ends_with("_opset20"))).then_some(stem)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "fixtures found: {names:?}");
    for n in &names {
        let (l, g, h) = check_fixture(n);
        println!("{n}: loss rel err {l:.2e}, grad {g:.2e}, hvp {h:.2e}");
    }
}

#[test]
fn logits_fixture_imports() {
    let model = import_file(std::path::Path::new(&format!(
        "{FIXTURES}mlp_logits_opset18.onnx"
    )))
    .unwrap();
    let r = Parser::parse(
        &std::fs::read_to_string(format!("{FIXTURES}mlp_logits_opset18.ref.json")).unwrap(),
    );
    assert_eq!(model.data_inputs, vec!["x".to_string()]);
    let out = model.graph.find_output("logits").unwrap();
    assert_eq!(model.graph.shape(out), &[8, 10]);
    if let Some(want) = r.get("logits") {
        let mut feeds = ref_inputs(&r);
        for (n, t) in &model.initializers {
            feeds.insert(n.clone(), Value::from_tensor(t));
        }
        let got = outputs_by_name(&model.graph, &feeds);
        let want = match want {
            Json::Obj(_) => want.at("data").nums(),
            _ => want.nums(),
        };
        let e = rel_err(&flat(&got["logits"]), &want, 1e-6);
        assert!(e < 1e-5, "logits rel err {e}");
    }
}

// ---- export / import round trip ----------------------------------------------

/// Export `g`, import the bytes again and check that every output agrees.
/// The exporter writes the graph's float constants as initializers, which
/// the importer reads as parameters: they are fed from `initializers`.
fn round_trip(g: &Graph, feeds: &HashMap<String, Value>, what: &str) -> f64 {
    let bytes = export_bytes(g, what).unwrap();
    let back = import_bytes(&bytes, what).unwrap_or_else(|e| panic!("{e}"));
    let mut feeds2 = feeds.clone();
    for (n, t) in &back.initializers {
        assert!(
            !feeds.contains_key(n),
            "{what}: initializer {n} shadows an input"
        );
        feeds2.insert(n.clone(), Value::from_tensor(t));
    }
    let want_inputs: Vec<String> = g.inputs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(back.data_inputs, want_inputs, "{what}: data inputs");
    let a = outputs_by_name(g, feeds);
    let b = outputs_by_name(&back.graph, &feeds2);
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (n, (_, id)) in g
        .outputs()
        .iter()
        .enumerate()
        .map(|(i, o)| (o.0.clone(), (i, o.1)))
    {
        let id2 = back.graph.find_output(&n).unwrap();
        assert_eq!(g.ty(id), back.graph.ty(id2), "{what}: type of {n}");
        let e = rel_err(&flat(&b[&n]), &flat(&a[&n]), 1e-3);
        assert!(
            e < 1e-6,
            "{what}: output {n} differs after the round trip: {e:.2e}"
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn export_import_round_trip() {
    for name in [
        "transformer_block_opset18",
        "convnet_opset18",
        "transformer_block_opset20",
    ] {
        let r =
            Parser::parse(&std::fs::read_to_string(format!("{FIXTURES}{name}.ref.json")).unwrap());
        let model = import_file(std::path::Path::new(&format!("{FIXTURES}{name}.onnx"))).unwrap();
        let feeds = fixture_feeds(&model, &r);
        // The model itself, then its optimised gradient and HVP graph
        // (which exercises the import of ConvTranspose, Fill, Identity...).
        round_trip(&model.graph, &feeds, name);
        let d = optimize(&derivative_graph(&model, false));
        let e = round_trip(&d, &feeds, &format!("{name}-derivatives"));
        println!("{name}: round trip of the derivative graph, max rel diff {e:.2e}");
    }
}

// ---- building small models ------------------------------------------------------

fn vinfo(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn out(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        ..Default::default()
    }
}

fn tf32(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn ti64(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 7,
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

enum A {
    I(i64),
    F(f32),
    Is(Vec<i64>),
    S(&'static str),
    T(Box<TensorProto>),
}

fn node(op: &str, ins: &[&str], outs: &[&str], attrs: Vec<(&str, A)>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{}", outs[0]),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs
            .into_iter()
            .map(|(n, a)| {
                let mut p = AttributeProto {
                    name: n.into(),
                    ..Default::default()
                };
                match a {
                    A::I(i) => (p.i, p.r#type) = (i, 2),
                    A::F(f) => (p.f, p.r#type) = (f, 1),
                    A::Is(v) => (p.ints, p.r#type) = (v, 7),
                    A::S(s) => (p.s, p.r#type) = (s.as_bytes().to_vec(), 3),
                    A::T(t) => (p.t, p.r#type) = (Some(*t), 4),
                }
                p
            })
            .collect(),
        ..Default::default()
    }
}

fn konst(name: &str, t: TensorProto) -> NodeProto {
    node("Constant", &[], &[name], vec![("value", A::T(Box::new(t)))])
}

fn model_bytes(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    inits: Vec<TensorProto>,
    outputs: &[&str],
    opset: i64,
) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            name: "t".into(),
            node: nodes,
            input: inputs,
            initializer: inits,
            output: outputs.iter().map(|o| out(o)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn import(bytes: &[u8]) -> ImportedModel {
    import_bytes(bytes, "test.onnx").unwrap_or_else(|e| panic!("{e}"))
}

/// Evaluate a model with the given data inputs (parameters from its
/// initializers).
fn run(m: &ImportedModel, data: Vec<(&str, Value)>) -> HashMap<String, Value> {
    let mut feeds: HashMap<String, Value> =
        data.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    for (n, t) in &m.initializers {
        feeds.insert(n.clone(), Value::from_tensor(t));
    }
    let a = outputs_by_name(&m.graph, &feeds);
    let b = outputs_by_name(&optimize(&m.graph), &feeds);
    for (n, v) in &a {
        assert_eq!(v.shape(), b[n].shape());
        assert!(
            rel_err(&flat(&b[n]), &flat(v), 1e-6) < 1e-6,
            "{n}: optimize changed the value"
        );
    }
    a
}

fn arange(shape: &[usize]) -> Value {
    let n: usize = shape.iter().product();
    fvalue(shape, (0..n).map(|i| i as f64).collect())
}

fn assert_close(got: &Value, shape: &[usize], want: &[f64]) {
    assert_eq!(got.shape(), shape);
    let g = flat(got);
    assert!(rel_err(&g, want, 1e-6) < 1e-6, "got {g:?}, want {want:?}");
}

// ---- single-op semantics --------------------------------------------------------

#[test]
fn reshape_slice_gather_semantics() {
    let nodes = vec![
        konst("s", ti64("", &[2], &[0, -1])),
        node("Reshape", &["x", "s"], &["r"], vec![]),
        konst("st", ti64("", &[2], &[-100, 1])),
        konst("en", ti64("", &[2], &[2, i64::MAX])),
        konst("ax", ti64("", &[2], &[0, -1])),
        konst("sp", ti64("", &[2], &[1, 2])),
        node("Slice", &["r", "st", "en", "ax"], &["sl"], vec![]),
        node("Slice", &["r", "st", "en", "ax", "sp"], &["sl2"], vec![]),
        konst("i", ti64("", &[2], &[-1, 0])),
        node("Gather", &["x", "i"], &["g"], vec![("axis", A::I(1))]),
        node("Gather", &["x", "j"], &["gd"], vec![("axis", A::I(-1))]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 3, 4]), vinfo("j", 7, &[2])],
        vec![],
        &["r", "sl", "sl2", "g", "gd"],
        18,
    );
    let m = import(&b);
    let j = Value::I(ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1, 1]).unwrap());
    let o = run(&m, vec![("x", arange(&[2, 3, 4])), ("j", j)]);
    assert_close(
        &o["r"],
        &[2, 12],
        &(0..24).map(|i| i as f64).collect::<Vec<_>>(),
    );
    let want: Vec<f64> = (1..12).chain(13..24).map(|i| i as f64).collect();
    assert_close(&o["sl"], &[2, 11], &want);
    assert_close(
        &o["sl2"],
        &[2, 6],
        &[1., 3., 5., 7., 9., 11., 13., 15., 17., 19., 21., 23.],
    );
    // x[:, [-1, 0], :]
    assert_close(
        &o["g"],
        &[2, 2, 4],
        &[
            8., 9., 10., 11., 0., 1., 2., 3., 20., 21., 22., 23., 12., 13., 14., 15.,
        ],
    );
    assert_close(
        &o["gd"],
        &[2, 3, 2],
        &[3., 1., 7., 5., 11., 9., 15., 13., 19., 17., 23., 21.],
    );

    // The gradient through a Gather with negative runtime indices.
    let mut g = m.graph.clone();
    let x = g.find_input("x").unwrap();
    let gd = g.find_output("gd").unwrap();
    let loss = g.sum_all(gd);
    let dx = grad(&mut g, loss, &[x])[0];
    g.set_outputs(vec![("dx".into(), dx)]);
    let j = Value::I(ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1, 1]).unwrap());
    let feeds = HashMap::from([("x".to_string(), arange(&[2, 3, 4])), ("j".to_string(), j)]);
    let d = outputs_by_name(&g, &feeds);
    assert_close(&d["dx"], &[2, 3, 4], &[0., 1., 0., 1.].repeat(6));
}

#[test]
fn matmul_gemm_semantics() {
    let nodes = vec![
        node("MatMul", &["a", "b"], &["vm"], vec![]),
        node("MatMul", &["a", "a"], &["vv"], vec![]),
        node("MatMul", &["b3", "a"], &["mv"], vec![]),
        node(
            "Gemm",
            &["ga", "gb", "gc"],
            &["gemm"],
            vec![
                ("alpha", A::F(2.0)),
                ("beta", A::F(0.5)),
                ("transA", A::I(1)),
                ("transB", A::I(1)),
            ],
        ),
    ];
    let inits = vec![
        tf32("b", &[3, 2], &[1., 0., 0., 1., 1., 1.]),
        tf32(
            "b3",
            &[2, 2, 3],
            &[1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 1.],
        ),
        tf32("ga", &[3, 2], &[1., 2., 3., 4., 5., 6.]),
        tf32("gb", &[2, 3], &[1., 0., 1., 0., 1., 0.]),
        tf32("gc", &[2], &[1., -1.]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("a", 1, &[3])],
        inits,
        &["vm", "vv", "mv", "gemm"],
        18,
    );
    let m = import(&b);
    let names: Vec<&str> = m.initializers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "b3", "ga", "gb", "gc"]);
    let o = run(&m, vec![("a", fvalue(&[3], vec![1., 2., 3.]))]);
    assert_close(&o["vm"], &[2], &[4., 5.]);
    assert_close(&o["vv"], &[], &[14.]);
    assert_close(&o["mv"], &[2, 2], &[1., 2., 3., 6.]);
    assert_close(&o["gemm"], &[2, 2], &[12.5, 5.5, 16.5, 7.5]);
}

#[test]
fn cross_entropy_semantics() {
    let ln = f64::ln;
    let (l0, l1) = (ln(4.0), ln(4.0 / 3.0)); // -log softmax([0, ln 3])
    let ln3 = ln(3.0) as f32;
    let mk = |reduction: &'static str, ignore: Option<i64>, weight: bool| {
        let mut attrs = vec![("reduction", A::S(reduction))];
        if let Some(i) = ignore {
            attrs.push(("ignore_index", A::I(i)));
        }
        let ins: &[&str] = if weight {
            &["s", "y", "w"]
        } else {
            &["s", "y"]
        };
        let nodes = vec![node("SoftmaxCrossEntropyLoss", ins, &["loss", "lp"], attrs)];
        let inits = if weight {
            vec![tf32("w", &[2], &[1., 3.])]
        } else {
            vec![]
        };
        import(&model_bytes(
            nodes,
            vec![vinfo("s", 1, &[3, 2]), vinfo("y", 7, &[3])],
            inits,
            &["loss", "lp"],
            18,
        ))
    };
    let s = fvalue(
        &[3, 2],
        [0.0, ln3].repeat(3).iter().map(|&x| x as f64).collect(),
    );
    let lab = |v: Vec<i64>| Value::I(ArrayD::from_shape_vec(IxDyn(&[3]), v).unwrap());
    // (reduction, ignore_index, class weights, labels, loss shape, loss)
    type Case = (
        &'static str,
        Option<i64>,
        bool,
        Vec<i64>,
        Vec<usize>,
        Vec<f64>,
    );
    let cases: Vec<Case> = vec![
        (
            "mean",
            Some(-100),
            false,
            vec![0, -100, 1],
            vec![],
            vec![(l0 + l1) / 2.0],
        ),
        (
            "sum",
            Some(-100),
            false,
            vec![0, -100, 1],
            vec![],
            vec![l0 + l1],
        ),
        (
            "none",
            Some(-100),
            false,
            vec![0, -100, 1],
            vec![3],
            vec![l0, 0.0, l1],
        ),
        (
            "mean",
            None,
            false,
            vec![0, 1, 1],
            vec![],
            vec![(l0 + 2.0 * l1) / 3.0],
        ),
        ("mean", Some(1), false, vec![0, 1, 1], vec![], vec![l0]),
        (
            "mean",
            None,
            true,
            vec![0, 1, 1],
            vec![],
            vec![(l0 + 6.0 * l1) / 7.0],
        ),
        ("mean", Some(0), true, vec![0, 1, 1], vec![], vec![l1]),
    ];
    for (red, ign, w, labels, shape, want) in cases {
        let m = mk(red, ign, w);
        let o = run(&m, vec![("s", s.clone()), ("y", lab(labels))]);
        assert_close(&o["loss"], &shape, &want);
        assert_close(&o["lp"], &[3, 2], &[-l0, -l1].repeat(3));
    }
}

#[test]
fn shape_computations_fold() {
    // A dynamic-export style chain: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])).
    let nodes = vec![
        node("Shape", &["x"], &["s"], vec![]),
        konst("zero", ti64("", &[], &[0])),
        node("Gather", &["s", "zero"], &["s0"], vec![]),
        konst("ax", ti64("", &[1], &[0])),
        node("Unsqueeze", &["s0", "ax"], &["s0u"], vec![]),
        konst("m1", ti64("", &[1], &[-1])),
        node("Concat", &["s0u", "m1"], &["ns"], vec![("axis", A::I(0))]),
        node("Reshape", &["x", "ns"], &["y"], vec![]),
        node("Squeeze", &["u"], &["sq"], vec![("axes", A::Is(vec![1]))]),
        node(
            "Unsqueeze",
            &["sq"],
            &["us"],
            vec![("axes", A::Is(vec![0, -1]))],
        ),
        node(
            "Split",
            &["x"],
            &["p0", "p1"],
            vec![("axis", A::I(-1)), ("split", A::Is(vec![1, 3]))],
        ),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 3, 4]), vinfo("u", 1, &[3, 1])],
        vec![],
        &["y", "us", "p0", "p1"],
        11,
    );
    let m = import(&b);
    let g = &m.graph;
    let y = g.find_output("y").unwrap();
    assert_eq!(g.shape(y), &[2, 12]);
    // Everything but the Reshape itself was folded away (no live shape ops).
    let live = metac_graphs::passes::dce(g);
    let ops: Vec<&str> = live
        .nodes()
        .iter()
        .map(|n| n.op.name())
        .filter(|&n| n != "Input")
        .collect();
    assert!(
        ops.iter().all(|&o| matches!(o, "Reshape" | "Slice")),
        "{ops:?}"
    );
    assert_eq!(g.shape(g.find_output("us").unwrap()), &[1, 3, 1]);
    let o = run(&m, vec![("x", arange(&[2, 3, 4])), ("u", arange(&[3, 1]))]);
    assert_close(&o["p0"], &[2, 3, 1], &[0., 4., 8., 12., 16., 20.]);
    assert_eq!(o["p1"].shape(), &[2, 3, 3]);
}

#[test]
fn initializer_kinds() {
    // int32 shape initializer (read as int64), bool mask from int32_data,
    // float parameter from float_data, and an old-style initializer that is
    // also listed as a graph input.
    let shape = TensorProto {
        name: "shape".into(),
        dims: vec![2],
        data_type: 6,
        int32_data: vec![3, 2],
        ..Default::default()
    };
    let mask = TensorProto {
        name: "mask".into(),
        dims: vec![3, 2],
        data_type: 9,
        int32_data: vec![1, 0, 0, 1, 1, 1],
        ..Default::default()
    };
    let w = TensorProto {
        name: "w".into(),
        dims: vec![2],
        data_type: 1,
        float_data: vec![10.0, 20.0],
        ..Default::default()
    };
    let bias = tf32("bias", &[1], &[0.5]);
    let nodes = vec![
        node("Reshape", &["x", "shape"], &["r"], vec![]),
        node("Mul", &["r", "w"], &["rw"], vec![]),
        node("Add", &["rw", "bias"], &["rb"], vec![]),
        node("Constant", &[], &["zero"], vec![("value_float", A::F(0.0))]),
        node("Where", &["mask", "rb", "zero"], &["y"], vec![]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[6]), vinfo("bias", 1, &[1])],
        vec![shape, mask, w, bias],
        &["y"],
        13,
    );
    let m = import(&b);
    assert_eq!(m.data_inputs, ["x"]);
    let names: Vec<&str> = m.initializers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w", "bias"]);
    assert!(m.graph.find_input("w").is_some() && m.graph.find_input("bias").is_some());
    assert!(m.graph.find_input("shape").is_none() && m.graph.find_input("mask").is_none());
    let o = run(&m, vec![("x", arange(&[6]))]);
    assert_close(&o["y"], &[3, 2], &[0.5, 0., 0., 60.5, 40.5, 100.5]);
}

// ---- errors ------------------------------------------------------------------------

#[test]
fn garbage_is_not_onnx() {
    for bytes in [
        &b"\xff\xfe this is certainly not a protobuf \x00\x01"[..],
        &b""[..],
        &b"hello"[..],
    ] {
        let e = import_bytes(bytes, "junk.bin").unwrap_err();
        assert!(matches!(e, ImportError::NotOnnx { .. }), "{e:?}");
        assert!(e.to_string().contains("junk.bin"), "{e}");
    }
    let e = import_file(std::path::Path::new("/nonexistent/model.onnx")).unwrap_err();
    assert!(
        matches!(e, ImportError::NotOnnx { .. })
            && e.to_string().contains("/nonexistent/model.onnx")
    );
}

#[test]
fn unsupported_op_is_named() {
    let mut nms = node("NonMaxSuppression", &["boxes", "scores"], &["sel"], vec![]);
    nms.name = "nms0".into();
    let b = model_bytes(
        vec![nms],
        vec![
            vinfo("boxes", 1, &[1, 4, 4]),
            vinfo("scores", 1, &[1, 1, 4]),
        ],
        vec![],
        &["sel"],
        18,
    );
    let e = import_bytes(&b, "nms.onnx").unwrap_err();
    match &e {
        ImportError::UnsupportedOp { file, op, node } => {
            assert_eq!(
                (file.as_str(), op.as_str(), node.as_str()),
                ("nms.onnx", "NonMaxSuppression", "nms0")
            )
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("NonMaxSuppression") && msg.contains("nms0") && msg.contains("nms.onnx"),
        "{msg}"
    );

    // An unnamed node is named by its first output.
    let mut es = node(
        "Einsum",
        &["boxes"],
        &["es_out"],
        vec![("equation", A::S("ij->ji"))],
    );
    es.name = String::new();
    let b = model_bytes(
        vec![es],
        vec![vinfo("boxes", 1, &[2, 3])],
        vec![],
        &["es_out"],
        18,
    );
    let e = import_bytes(&b, "e.onnx").unwrap_err();
    assert!(
        matches!(&e, ImportError::UnsupportedOp { node, op, .. } if node == "es_out" && op == "Einsum"),
        "{e:?}"
    );

    // Nodes the outputs do not need are not imported at all.
    let b = model_bytes(
        vec![
            node("NonMaxSuppression", &["x", "x"], &["dead"], vec![]),
            node("Relu", &["x"], &["y"], vec![]),
        ],
        vec![vinfo("x", 1, &[2, 3])],
        vec![],
        &["y"],
        18,
    );
    import(&b);
}

#[test]
fn dynamic_dims_are_rejected() {
    let mut x = vinfo("tokens", 1, &[0, 16]);
    if let Some(type_proto::Value::TensorType(t)) = x.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[0].value = Some(
            tensor_shape_proto::dimension::Value::DimParam("batch".into()),
        );
    }
    let b = model_bytes(
        vec![node("Relu", &["tokens"], &["y"], vec![])],
        vec![x.clone()],
        vec![],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "dyn.onnx").unwrap_err().to_string();
    assert!(
        msg.contains("'tokens'") && msg.contains("axis 0") && msg.contains("batch"),
        "{msg}"
    );

    if let Some(type_proto::Value::TensorType(t)) = x.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[1].value = None;
        t.shape.as_mut().unwrap().dim[0].value =
            Some(tensor_shape_proto::dimension::Value::DimValue(2));
    }
    let b = model_bytes(
        vec![node("Relu", &["tokens"], &["y"], vec![])],
        vec![x],
        vec![],
        &["y"],
        18,
    );
    let msg = import_bytes(&b, "dyn.onnx").unwrap_err().to_string();
    assert!(msg.contains("'tokens'") && msg.contains("axis 1"), "{msg}");
}

#[test]
fn other_errors_are_clear() {
    let relu = || vec![node("Relu", &["x"], &["y"], vec![])];
    let expect = |b: Vec<u8>, parts: &[&str]| {
        let msg = import_bytes(&b, "m.onnx").unwrap_err().to_string();
        for p in parts {
            assert!(msg.contains(p), "'{p}' not in: {msg}");
        }
    };
    // Element types.
    expect(
        model_bytes(relu(), vec![vinfo("x", 11, &[2])], vec![], &["y"], 18),
        &["'x'", "double"],
    );
    let half = TensorProto {
        name: "h".into(),
        dims: vec![1],
        data_type: 10,
        raw_data: vec![0, 0],
        ..Default::default()
    };
    expect(
        model_bytes(relu(), vec![vinfo("x", 1, &[2])], vec![half], &["y"], 18),
        &["'h'", "float16"],
    );
    // External data.
    let mut ext = tf32("big", &[2], &[]);
    ext.data_location = Some(1);
    ext.external_data = vec![pb::StringStringEntryProto {
        key: "location".into(),
        value: "weights.bin".into(),
    }];
    expect(
        model_bytes(relu(), vec![vinfo("x", 1, &[2])], vec![ext], &["y"], 18),
        &["'big'", "external"],
    );
    // Another domain.
    let mut n = node("FusedMatMul", &["x", "x"], &["y"], vec![]);
    n.domain = "com.microsoft".into();
    expect(
        model_bytes(vec![n], vec![vinfo("x", 1, &[2, 2])], vec![], &["y"], 18),
        &["com.microsoft", "FusedMatMul_y"],
    );
    // A shape operand that is not constant.
    let b = model_bytes(
        vec![node("Reshape", &["x", "s"], &["y"], vec![])],
        vec![vinfo("x", 1, &[6]), vinfo("s", 7, &[2])],
        vec![],
        &["y"],
        18,
    );
    expect(b, &["Reshape_y", "(Reshape)", "input 1", "constant"]);
    // Shape errors name the node.
    let b = model_bytes(
        vec![node("MatMul", &["x", "x"], &["y"], vec![])],
        vec![vinfo("x", 1, &[2, 3])],
        vec![],
        &["y"],
        18,
    );
    expect(b, &["MatMul_y", "inner dimensions"]);
    // Unsupported attribute values.
    let b = model_bytes(
        vec![node(
            "Gelu",
            &["x"],
            &["y"],
            vec![("approximate", A::S("cubic"))],
        )],
        vec![vinfo("x", 1, &[2])],
        vec![],
        &["y"],
        20,
    );
    expect(b, &["Gelu_y", "cubic"]);
}

#[test]
fn torch_export_idioms() {
    // Constant(double) -> Cast(float); Trilu of a constant and of an input;
    // ReduceProd of a Shape (the element count).
    let half = TensorProto {
        dims: vec![],
        data_type: 11,
        double_data: vec![0.5],
        ..Default::default()
    };
    let nodes = vec![
        konst("h", half),
        node("Cast", &["h"], &["hf"], vec![("to", A::I(1))]),
        node("Mul", &["x", "hf"], &["xh"], vec![]),
        node("Trilu", &["xh"], &["up"], vec![]),
        konst("k", ti64("", &[], &[-1])),
        node("Trilu", &["x", "k"], &["lo"], vec![("upper", A::I(0))]),
        node("Shape", &["x"], &["s"], vec![]),
        node("ReduceProd", &["s"], &["n"], vec![("keepdims", A::I(0))]),
        node("Cast", &["n"], &["nf"], vec![("to", A::I(1))]),
        node("Div", &["x", "nf"], &["xn"], vec![]),
    ];
    let b = model_bytes(
        nodes,
        vec![vinfo("x", 1, &[2, 3])],
        vec![],
        &["up", "lo", "xn"],
        18,
    );
    let m = import(&b);
    let o = run(&m, vec![("x", arange(&[2, 3]))]);
    assert_close(&o["up"], &[2, 3], &[0., 0.5, 1., 0., 2., 2.5]);
    assert_close(&o["lo"], &[2, 3], &[0., 0., 0., 3., 0., 0.]);
    assert_close(
        &o["xn"],
        &[2, 3],
        &[0., 1. / 6., 2. / 6., 3. / 6., 4. / 6., 5. / 6.],
    );
}
