//! What the import tests share: a small JSON reader for the reference
//! files, evaluation helpers, and builders of small ONNX models.

#![allow(dead_code)]

pub use std::collections::HashMap;

pub use metac_graphs::autodiff::{grad, hvp_forward_over_reverse, hvp_reverse_over_reverse};
pub use metac_graphs::eval::{eval_graph, Value};
pub use metac_graphs::onnx::pb::{
    self, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
pub use metac_graphs::onnx::{export_bytes, import_bytes, import_file, ImportError, ImportedModel};
pub use metac_graphs::passes::optimize;
pub use metac_graphs::{DType, Graph, NodeId};
pub use ndarray::{ArrayD, IxDyn};
pub use prost::Message;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/onnx/");

// ---- a small JSON reader for the reference files ------------------------------

#[derive(Debug)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn at(&self, key: &str) -> &Json {
        self.get(key)
            .unwrap_or_else(|| panic!("missing key '{key}'"))
    }
    pub fn num(&self) -> f64 {
        match self {
            Json::Num(x) => *x,
            other => panic!("expected a number, got {other:?}"),
        }
    }
    pub fn nums(&self) -> Vec<f64> {
        match self {
            Json::Arr(v) => v.iter().map(Json::num).collect(),
            other => panic!("expected an array, got {other:?}"),
        }
    }
    pub fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
    pub fn entries(&self) -> &[(String, Json)] {
        match self {
            Json::Obj(kv) => kv,
            other => panic!("expected an object, got {other:?}"),
        }
    }
}

pub struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    pub fn parse(text: &str) -> Json {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing characters in JSON");
        v
    }
    pub fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    pub fn eat(&mut self, c: u8) {
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
    pub fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.i).expect("JSON: unexpected end")
    }
    pub fn value(&mut self) -> Json {
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
    pub fn string(&mut self) -> String {
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

// ---- helpers --------------------------------------------------------------------

pub fn fvalue(shape: &[usize], data: Vec<f64>) -> Value {
    Value::F(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap())
}

pub fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::F(a) => a.iter().copied().collect(),
        Value::I(a) => a.iter().map(|&x| x as f64).collect(),
        Value::B(a) => a.iter().map(|&x| x as u8 as f64).collect(),
    }
}

/// Max |got - want| relative to max |want| (with an absolute floor).
pub fn rel_err(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(floor);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

pub fn outputs_by_name(g: &Graph, feeds: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, feeds)
        .expect("evaluation")
        .into_iter()
        .collect()
}

/// The reference's data inputs as interpreter values (x as float32, y int64).
pub fn ref_inputs(r: &Json) -> HashMap<String, Value> {
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
pub fn derivative_graph(model: &ImportedModel, optimize_first: bool) -> Graph {
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

pub fn fixture_feeds(model: &ImportedModel, r: &Json) -> HashMap<String, Value> {
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
pub fn check_fixture(name: &str) -> (f64, f64, f64) {
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

// ---- export / import round trip ----------------------------------------------

/// Export `g`, import the bytes again and check that every output agrees.
/// The exporter writes the graph's float constants as initializers, which
/// the importer reads as parameters: they are fed from `initializers`.
pub fn round_trip(g: &Graph, feeds: &HashMap<String, Value>, what: &str) -> f64 {
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

// ---- building small models ------------------------------------------------------

pub fn vinfo(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
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

pub fn out(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        ..Default::default()
    }
}

pub fn tf32(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn ti64(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 7,
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

pub enum A {
    I(i64),
    F(f32),
    Is(Vec<i64>),
    S(&'static str),
    T(Box<TensorProto>),
}

pub fn node(op: &str, ins: &[&str], outs: &[&str], attrs: Vec<(&str, A)>) -> NodeProto {
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

pub fn konst(name: &str, t: TensorProto) -> NodeProto {
    node("Constant", &[], &[name], vec![("value", A::T(Box::new(t)))])
}

pub fn model_bytes(
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

pub fn import(bytes: &[u8]) -> ImportedModel {
    import_bytes(bytes, "test.onnx").unwrap_or_else(|e| panic!("{e}"))
}

/// Evaluate a model with the given data inputs (parameters from its
/// initializers).
pub fn run(m: &ImportedModel, data: Vec<(&str, Value)>) -> HashMap<String, Value> {
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

pub fn arange(shape: &[usize]) -> Value {
    let n: usize = shape.iter().product();
    fvalue(shape, (0..n).map(|i| i as f64).collect())
}

pub fn assert_close(got: &Value, shape: &[usize], want: &[f64]) {
    assert_eq!(got.shape(), shape);
    let g = flat(got);
    assert!(rel_err(&g, want, 1e-6) < 1e-6, "got {g:?}, want {want:?}");
}
