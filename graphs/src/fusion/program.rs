//! A fused elementwise kernel as a register program and its text encoding
//! (the `program` attribute of an `ai.metac` `FusedElementwise` ONNX node).
//! The runtime's interpreter (`metac_runtime::backend::fused`) runs it.
//!
//! The interpreter walks the output in chunks of `CHUNK` (256) elements. For
//! each chunk every instruction runs over whole register rows, so the inner
//! loops are plain slices the compiler vectorises, and every intermediate
//! stays in a few kilobytes of cache instead of a tensor-sized buffer.
//! Inputs broadcast to the output shape with numpy rules; after merging
//! adjacent dimensions that broadcast alike, a chunk of an input is either a
//! contiguous run or one repeated element.
//!
//! A *column-stacked* program (`columns: Some(n)`) computes `[rows, n]`
//! tensors column by column: a register holds a chunk of one row, a tensor
//! of `k` rows is `k` registers, so stacking tensors along rows (`Concat`,
//! `Slice`, `Expand` along axis 0) costs no instruction, and a product
//! `W[a, b] @ X[b, n]` is `a` [`Instr::Dot`]s over `X`'s row registers. Its
//! inputs are `[k, n]` or `[n]` tensors (read row by row), per-row scalars
//! `[k, 1]`, scalars, and the `[a, b]` matrices of its products; its outputs
//! are `[rows, n]` tensors and then the `[p, q]` results of its
//! contractions ([`Instr::Contract`], sums over all columns of products of
//! rows, added up chunk by chunk).

use std::fmt::Write as _;

/// At most this many rows of `W` in one [`Instr::Dot`] (the runtime's
/// product kernel keeps them in registers).
pub const MAX_INNER: usize = 64;

/// The ONNX domain and op type of fused nodes.
pub const FUSED_DOMAIN: &str = "ai.metac";
pub const FUSED_OP: &str = "FusedElementwise";

/// Functions of one register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fn1 {
    Neg,
    Exp,
    Log,
    Sqrt,
    Sigmoid,
    Tanh,
    Relu,
    Abs,
    Sign,
    Asinh,
}

/// Functions of two registers; comparisons give 1.0 or 0.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fn2 {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Less,
    Greater,
    Equal,
}

const FN1: [(Fn1, &str); 10] = [
    (Fn1::Neg, "neg"),
    (Fn1::Exp, "exp"),
    (Fn1::Log, "log"),
    (Fn1::Sqrt, "sqrt"),
    (Fn1::Sigmoid, "sigmoid"),
    (Fn1::Tanh, "tanh"),
    (Fn1::Relu, "relu"),
    (Fn1::Abs, "abs"),
    (Fn1::Sign, "sign"),
    (Fn1::Asinh, "asinh"),
];
const FN2: [(Fn2, &str); 9] = [
    (Fn2::Add, "add"),
    (Fn2::Sub, "sub"),
    (Fn2::Mul, "mul"),
    (Fn2::Div, "div"),
    (Fn2::Min, "min"),
    (Fn2::Max, "max"),
    (Fn2::Less, "less"),
    (Fn2::Greater, "greater"),
    (Fn2::Equal, "equal"),
];

/// One instruction; `dst` never equals an operand register.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instr {
    /// The chunk of input `input`, broadcast.
    Load {
        dst: u16,
        input: u16,
    },
    Const {
        dst: u16,
        value: f32,
    },
    Unary {
        f: Fn1,
        dst: u16,
        a: u16,
    },
    Binary {
        f: Fn2,
        dst: u16,
        a: u16,
        b: u16,
    },
    /// `c != 0 ? a : b`.
    Where {
        dst: u16,
        c: u16,
        a: u16,
        b: u16,
    },
    /// Column-stacked programs: row `row` of input `input` (a chunk of a
    /// `[k, n]` or `[n]` input, or element `row` of a per-row scalar input,
    /// broadcast).
    LoadRow {
        dst: u16,
        input: u16,
        row: u32,
    },
    /// Column-stacked programs: `sum_j W[row, j] * list[j]`, with `W` the
    /// `[a, b]` input `input` and `list` (index into
    /// [`FusedProgram::lists`]) its `b` source registers.
    Dot {
        dst: u16,
        input: u16,
        row: u32,
        list: u16,
    },
    /// Column-stacked programs: the chunk's share of contraction output
    /// `out`, `A @ B^T` summed over the columns, with `A`'s rows the
    /// registers of list `a` and `B`'s those of list `b` (the runtime's
    /// contraction kernel).
    Contract {
        out: u16,
        a: u16,
        b: u16,
    },
}

/// A fused kernel: output shape, input shapes, instructions, and the
/// registers that hold the outputs at the end of a chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedProgram {
    pub shape: Vec<usize>,
    /// The shapes of the tensors the node receives.
    pub inputs: Vec<Vec<usize>>,
    /// Per input, the block of it the program reads, when not all of it:
    /// a slice (the node reads the sliced tensor in place, so the slice is
    /// never copied out).
    pub views: Vec<Option<View>>,
    pub instrs: Vec<Instr>,
    /// The registers holding the outputs at the end of a chunk: one per
    /// output, or in a column-stacked program the rows of every output in
    /// turn (`out_rows` of them each).
    pub outputs: Vec<u16>,
    pub registers: usize,
    /// `Some(n)`: a column-stacked program over `[rows, n]` tensors.
    pub columns: Option<usize>,
    /// Rows of each output of a column-stacked program.
    pub out_rows: Vec<usize>,
    /// The source registers of [`Instr::Dot`]s and [`Instr::Contract`]s.
    pub lists: Vec<Vec<u16>>,
    /// The shapes `[p, q]` of the contraction outputs, which follow the
    /// row outputs (derived from the [`Instr::Contract`]s).
    pub sums: Vec<[usize; 2]>,
}

/// A block of an input: `shape`, with the input's own (row-major) strides,
/// starting at element `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub shape: Vec<usize>,
    pub offset: usize,
}

/// Row-major strides of a shape.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// A number that must fit a register or input index.
fn small(v: usize, stmt: &str) -> Result<u16, ProgramError> {
    u16::try_from(v).map_err(|_| ProgramError(format!("'{stmt}': {v} is out of range")))
}

/// A row index.
fn row32(v: usize, stmt: &str) -> Result<u32, ProgramError> {
    u32::try_from(v).map_err(|_| ProgramError(format!("'{stmt}': row {v} is out of range")))
}

/// A program whose text does not parse or whose registers are inconsistent.
#[derive(Debug, thiserror::Error)]
#[error("fused program: {0}")]
pub struct ProgramError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ProgramError> {
    Err(ProgramError(msg.into()))
}

impl FusedProgram {
    /// The text form: `;`-separated statements, f32 constants as bit
    /// patterns so that they round-trip exactly.
    pub fn encode(&self) -> String {
        let dims = |s: &[usize]| s.iter().map(|d| format!(" {d}")).collect::<String>();
        let mut out = format!("shape{};regs {}", dims(&self.shape), self.registers);
        if let Some(n) = self.columns {
            let _ = write!(out, ";cols {n};rows{}", dims(&self.out_rows));
        }
        for s in &self.inputs {
            let _ = write!(out, ";in{}", dims(s));
        }
        for (k, v) in self.views.iter().enumerate() {
            if let Some(v) = v {
                let _ = write!(out, ";view {k} {}{}", v.offset, dims(&v.shape));
            }
        }
        for i in &self.instrs {
            let _ = match *i {
                Instr::Load { dst, input } => write!(out, ";ld {dst} {input}"),
                Instr::Const { dst, value } => write!(out, ";c {dst} {:08x}", value.to_bits()),
                Instr::Unary { f, dst, a } => write!(out, ";{} {dst} {a}", name1(f)),
                Instr::Binary { f, dst, a, b } => write!(out, ";{} {dst} {a} {b}", name2(f)),
                Instr::Where { dst, c, a, b } => write!(out, ";where {dst} {c} {a} {b}"),
                Instr::LoadRow { dst, input, row } => write!(out, ";ldr {dst} {input} {row}"),
                Instr::Dot {
                    dst,
                    input,
                    row,
                    list,
                } => {
                    let regs: Vec<usize> = self.lists[list as usize]
                        .iter()
                        .map(|&r| r as usize)
                        .collect();
                    write!(out, ";dot {dst} {input} {row}{}", dims(&regs))
                }
                Instr::Contract { out: o, a, b } => {
                    let (a, b) = (&self.lists[a as usize], &self.lists[b as usize]);
                    let regs: Vec<usize> = a.iter().chain(b).map(|&r| r as usize).collect();
                    write!(out, ";ctr {o} {}{}", a.len(), dims(&regs))
                }
            };
        }
        let _ = write!(
            out,
            ";out{}",
            self.outputs
                .iter()
                .map(|r| format!(" {r}"))
                .collect::<String>()
        );
        out
    }

    pub fn decode(text: &str) -> Result<FusedProgram, ProgramError> {
        let mut p = FusedProgram {
            shape: vec![],
            inputs: vec![],
            views: vec![],
            instrs: vec![],
            outputs: vec![],
            registers: 0,
            columns: None,
            out_rows: vec![],
            lists: vec![],
            sums: vec![],
        };
        let mut seen_shape = false;
        let mut views = vec![];
        for stmt in text.split(';') {
            let mut words = stmt.split_whitespace();
            let Some(head) = words.next() else {
                return err("empty statement");
            };
            let rest: Vec<&str> = words.collect();
            let nums = |what: &str| -> Result<Vec<usize>, ProgramError> {
                rest.iter()
                    .map(|w| {
                        w.parse::<usize>()
                            .map_err(|_| ProgramError(format!("'{what}': bad number '{w}'")))
                    })
                    .collect()
            };
            let regs = |n: usize| -> Result<Vec<u16>, ProgramError> {
                if rest.len() != n {
                    return err(format!("'{stmt}': expected {n} operands"));
                }
                rest.iter()
                    .map(|w| {
                        w.parse::<u16>()
                            .map_err(|_| ProgramError(format!("'{stmt}': bad register '{w}'")))
                    })
                    .collect()
            };
            match head {
                "shape" => {
                    p.shape = nums("shape")?;
                    seen_shape = true;
                }
                "regs" => {
                    p.registers = *nums("regs")?.first().ok_or(ProgramError("regs".into()))?
                }
                "in" => p.inputs.push(nums("in")?),
                "cols" => p.columns = nums("cols")?.first().copied(),
                "rows" => p.out_rows = nums("rows")?,
                "ldr" => {
                    let v = nums("ldr")?;
                    if v.len() != 3 {
                        return err(format!("'{stmt}': expected 3 operands"));
                    }
                    p.instrs.push(Instr::LoadRow {
                        dst: small(v[0], stmt)?,
                        input: small(v[1], stmt)?,
                        row: row32(v[2], stmt)?,
                    });
                }
                "dot" => {
                    let v = nums("dot")?;
                    if v.len() < 4 {
                        return err(format!("'{stmt}': expected 3 operands and a list"));
                    }
                    let list = v[3..]
                        .iter()
                        .map(|&r| small(r, stmt))
                        .collect::<Result<Vec<u16>, _>>()?;
                    p.lists.push(list);
                    p.instrs.push(Instr::Dot {
                        dst: small(v[0], stmt)?,
                        input: small(v[1], stmt)?,
                        row: row32(v[2], stmt)?,
                        list: small(p.lists.len() - 1, stmt)?,
                    });
                }
                "ctr" => {
                    let v = nums("ctr")?;
                    let regs = v
                        .iter()
                        .skip(2)
                        .map(|&r| small(r, stmt))
                        .collect::<Result<Vec<u16>, _>>()?;
                    match v.get(1) {
                        Some(&p_rows) if p_rows >= 1 && p_rows < regs.len() => {
                            p.lists.push(regs[..p_rows].to_vec());
                            p.lists.push(regs[p_rows..].to_vec());
                        }
                        _ => {
                            return err(format!(
                                "'{stmt}': expected an output, a row count and two lists"
                            ))
                        }
                    }
                    let b = small(p.lists.len() - 1, stmt)?;
                    p.instrs.push(Instr::Contract {
                        out: small(v[0], stmt)?,
                        a: b - 1,
                        b,
                    });
                }
                "view" => {
                    let v = nums("view")?;
                    if v.len() < 2 {
                        return err(format!(
                            "'{stmt}': expected an input, an offset and a shape"
                        ));
                    }
                    views.push((
                        v[0],
                        View {
                            offset: v[1],
                            shape: v[2..].to_vec(),
                        },
                    ));
                }
                "out" => p.outputs = regs(rest.len())?,
                "ld" => {
                    let r = regs(2)?;
                    p.instrs.push(Instr::Load {
                        dst: r[0],
                        input: r[1],
                    });
                }
                "c" => {
                    if rest.len() != 2 {
                        return err(format!("'{stmt}': expected 2 operands"));
                    }
                    let dst = rest[0]
                        .parse()
                        .map_err(|_| ProgramError(format!("'{stmt}': bad register")))?;
                    let bits = u32::from_str_radix(rest[1], 16)
                        .map_err(|_| ProgramError(format!("'{stmt}': bad constant")))?;
                    p.instrs.push(Instr::Const {
                        dst,
                        value: f32::from_bits(bits),
                    });
                }
                "where" => {
                    let r = regs(4)?;
                    p.instrs.push(Instr::Where {
                        dst: r[0],
                        c: r[1],
                        a: r[2],
                        b: r[3],
                    });
                }
                other => {
                    if let Some(&(f, _)) = FN1.iter().find(|(_, n)| *n == other) {
                        let r = regs(2)?;
                        p.instrs.push(Instr::Unary {
                            f,
                            dst: r[0],
                            a: r[1],
                        });
                    } else if let Some(&(f, _)) = FN2.iter().find(|(_, n)| *n == other) {
                        let r = regs(3)?;
                        p.instrs.push(Instr::Binary {
                            f,
                            dst: r[0],
                            a: r[1],
                            b: r[2],
                        });
                    } else {
                        return err(format!("unknown instruction '{other}'"));
                    }
                }
            }
        }
        if !seen_shape {
            return err("no shape");
        }
        p.views = vec![None; p.inputs.len()];
        for (k, v) in views {
            if k >= p.inputs.len() {
                return err(format!("view of input {k} of {}", p.inputs.len()));
            }
            p.views[k] = Some(v);
        }
        p.sums = sum_shapes(&p.instrs, &p.lists)?;
        p.validate()?;
        Ok(p)
    }

    /// Registers in range, operands distinct from the destination, inputs
    /// broadcastable to the output shape (or, column-stacked, readable row
    /// by row).
    fn validate(&self) -> Result<(), ProgramError> {
        let n = self.registers;
        let ok = |r: u16| (r as usize) < n;
        let stacked = self.columns.is_some();
        for i in &self.instrs {
            match *i {
                Instr::Load { input, .. } if stacked || input as usize >= self.inputs.len() => {
                    return err(format!("bad load {i:?}"));
                }
                Instr::LoadRow { input, row, .. } => {
                    let rows = self.input_rows(input as usize);
                    if !stacked || rows.is_none_or(|k| row as usize >= k) {
                        return err(format!("bad row load {i:?}"));
                    }
                }
                Instr::Dot {
                    input, row, list, ..
                } => {
                    let w = self.inputs.get(input as usize);
                    let srcs = self.lists.get(list as usize);
                    let fits = match (w, srcs) {
                        (Some(w), Some(l)) => {
                            w.len() == 2 && w[1] == l.len() && (row as usize) < w[0]
                        }
                        _ => false,
                    };
                    if !stacked || !fits {
                        return err(format!("bad product {i:?}"));
                    }
                }
                Instr::Contract { a, b, .. } => {
                    let lists = self.lists.len();
                    if !stacked || a as usize >= lists || b as usize >= lists {
                        return err(format!("bad contraction {i:?}"));
                    }
                }
                _ => {}
            }
            let dst = destination(i);
            let ops = self.operands(i);
            if dst.is_some_and(|d| !ok(d)) || ops.iter().any(|&r| !ok(r) || Some(r) == dst) {
                return err(format!("bad registers in {i:?} ({n} registers)"));
            }
        }
        if (self.outputs.is_empty() && self.sums.is_empty()) || self.outputs.iter().any(|&r| !ok(r))
        {
            return err("bad output registers");
        }
        if self.views.len() != self.inputs.len() {
            return err("one view entry per input expected");
        }
        if let Some(cols) = self.columns {
            if cols == 0
                || self.shape != [cols]
                || self.out_rows.contains(&0)
                || self.out_rows.iter().sum::<usize>() != self.outputs.len()
                || self.views.iter().any(Option::is_some)
            {
                return err("inconsistent column-stacked program");
            }
            return Ok(());
        }
        if !self.out_rows.is_empty() || !self.lists.is_empty() || !self.sums.is_empty() {
            return err("rows or products outside a column-stacked program");
        }
        for (s, v) in self.inputs.iter().zip(&self.views) {
            let read = match v {
                None => s,
                Some(v) => {
                    let st = strides_of(s);
                    let last = v.offset
                        + v.shape
                            .iter()
                            .zip(&st)
                            .map(|(d, t)| d.saturating_sub(1) * t)
                            .sum::<usize>();
                    let len: usize = s.iter().product();
                    if v.shape.len() != s.len()
                        || v.shape.iter().zip(s).any(|(a, b)| a > b)
                        || v.shape.contains(&0)
                        || last >= len
                    {
                        return err(format!(
                            "view {v:?} does not fit in an input of shape {s:?}"
                        ));
                    }
                    &v.shape
                }
            };
            if broadcast_strides(read, &strides_of(s), &self.shape).is_none() {
                return err(format!(
                    "input shape {read:?} does not broadcast to {:?}",
                    self.shape
                ));
            }
        }
        Ok(())
    }

    /// The registers an instruction reads.
    pub fn operands(&self, i: &Instr) -> Vec<u16> {
        match *i {
            Instr::Dot { list, .. } => self.lists[list as usize].clone(),
            Instr::Contract { a, b, .. } => {
                let (a, b) = (&self.lists[a as usize], &self.lists[b as usize]);
                a.iter().chain(b).copied().collect()
            }
            _ => operands(i),
        }
    }

    /// Column-stacked programs: the rows input `k` offers to `LoadRow`
    /// (`[r, n]`: `r`; `[n]`: 1; per-row scalars `[r, 1]`: `r`; scalars:
    /// 1), or `None` for a shape it cannot read row by row.
    pub fn input_rows(&self, k: usize) -> Option<usize> {
        let n = self.columns?;
        let s = self.inputs.get(k)?;
        match s.as_slice() {
            [] => Some(1),
            [m] if *m == n || *m == 1 => Some(1),
            [r, m] if *m == n || *m == 1 => Some(*r),
            _ => None,
        }
    }

    /// Number of outputs.
    pub fn output_count(&self) -> usize {
        match self.columns {
            Some(_) => self.out_rows.len() + self.sums.len(),
            None => self.outputs.len(),
        }
    }

    /// The shape of output `k`: rows first, then contractions.
    pub fn output_shape(&self, k: usize) -> Vec<usize> {
        match self.columns {
            Some(n) => match self.out_rows.get(k) {
                Some(&rows) => vec![rows, n],
                None => self.sums[k - self.out_rows.len()].to_vec(),
            },
            None => self.shape.clone(),
        }
    }

    /// Number of output elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The register an instruction writes (a contraction writes none).
pub fn destination(i: &Instr) -> Option<u16> {
    match *i {
        Instr::Load { dst, .. }
        | Instr::Const { dst, .. }
        | Instr::Unary { dst, .. }
        | Instr::Binary { dst, .. }
        | Instr::Where { dst, .. }
        | Instr::LoadRow { dst, .. }
        | Instr::Dot { dst, .. } => Some(dst),
        Instr::Contract { .. } => None,
    }
}

/// The register of an instruction that writes one.
pub fn written(i: &Instr) -> u16 {
    destination(i).expect("a contraction is run by the interpreter loop")
}

/// The shapes of the contraction outputs of `instrs`, which must number
/// them `0..m`, each once.
pub(crate) fn sum_shapes(
    instrs: &[Instr],
    lists: &[Vec<u16>],
) -> Result<Vec<[usize; 2]>, ProgramError> {
    let mut shapes: Vec<Option<[usize; 2]>> = vec![];
    for i in instrs {
        if let Instr::Contract { out, a, b } = *i {
            let len = |l: u16| lists.get(l as usize).map_or(0, Vec::len);
            let o = out as usize;
            if shapes.len() <= o {
                shapes.resize(o + 1, None);
            }
            if shapes[o].replace([len(a), len(b)]).is_some() {
                return err(format!("contraction output {o} computed twice"));
            }
        }
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(o, s)| s.ok_or_else(|| ProgramError(format!("no contraction for output {o}"))))
        .collect()
}

/// The registers an instruction reads (a `Dot`'s are in its list).
fn operands(i: &Instr) -> Vec<u16> {
    match *i {
        Instr::Load { .. }
        | Instr::Const { .. }
        | Instr::LoadRow { .. }
        | Instr::Dot { .. }
        | Instr::Contract { .. } => vec![],
        Instr::Unary { a, .. } => vec![a],
        Instr::Binary { a, b, .. } => vec![a, b],
        Instr::Where { c, a, b, .. } => vec![c, a, b],
    }
}

fn name1(f: Fn1) -> &'static str {
    FN1.iter()
        .find(|(g, _)| *g == f)
        .expect("every Fn1 has a name")
        .1
}

fn name2(f: Fn2) -> &'static str {
    FN2.iter()
        .find(|(g, _)| *g == f)
        .expect("every Fn2 has a name")
        .1
}

/// Strides of an input of shape `input` (with element strides `strides`)
/// read at the coordinates of `shape` (numpy broadcasting: 0 along broadcast
/// dimensions), or `None` if it does not broadcast.
pub fn broadcast_strides(
    input: &[usize],
    strides: &[usize],
    shape: &[usize],
) -> Option<Vec<usize>> {
    if input.len() > shape.len() {
        return None;
    }
    let lead = shape.len() - input.len();
    let mut out = vec![0; shape.len()];
    for (k, &d) in input.iter().enumerate() {
        let s = shape[lead + k];
        if d == s && d != 1 {
            out[lead + k] = strides[k];
        } else if d != 1 {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes() {
        let p = FusedProgram {
            shape: vec![3, 5],
            inputs: vec![vec![3, 1], vec![5], vec![3, 7]],
            // Columns 1..6 of the third input.
            views: vec![
                None,
                None,
                Some(View {
                    shape: vec![3, 5],
                    offset: 1,
                }),
            ],
            instrs: vec![
                Instr::Load { dst: 0, input: 0 },
                Instr::Load { dst: 1, input: 1 },
                Instr::Binary {
                    f: Fn2::Add,
                    dst: 2,
                    a: 0,
                    b: 1,
                },
                Instr::Const { dst: 0, value: 0.1 },
                Instr::Binary {
                    f: Fn2::Less,
                    dst: 1,
                    a: 2,
                    b: 0,
                },
                Instr::Load { dst: 0, input: 2 },
                Instr::Unary {
                    f: Fn1::Tanh,
                    dst: 3,
                    a: 0,
                },
                Instr::Where {
                    dst: 0,
                    c: 1,
                    a: 2,
                    b: 3,
                },
            ],
            outputs: vec![0, 2],
            registers: 4,
            columns: None,
            out_rows: vec![],
            lists: vec![],
            sums: vec![],
        };
        let q = FusedProgram::decode(&p.encode()).unwrap();
        assert_eq!(p, q);
    }

    #[test]
    fn rejects_bad_programs() {
        for bad in [
            "regs 2;ld 0 0;out 0",
            "shape 4;regs 2;in 3;ld 0 0;out 0",
            "shape 4;regs 1;in 4;ld 0 0;exp 0 0;out 0",
            "shape 4;regs 2;in 4;ld 0 0;frob 1 0;out 1",
            "shape 4;regs 2;in 4;ld 0 1;out 0",
            "shape 4;regs 2;in 4;ld 0 0;out 5",
            "shape 4;regs 2;in 6;view 0 3 4;ld 0 0;out 0",
            "shape 4;regs 2;in 6;view 1 0 4;ld 0 0;out 0",
            // Row loads and products only in column-stacked programs, with
            // rows that exist and lists as long as the matrix is wide.
            "shape 4;regs 2;in 4;ldr 0 0 0;out 0",
            "shape 8;regs 2;cols 8;rows 1;in 2 8;ldr 0 0 2;out 0",
            "shape 8;regs 2;cols 8;rows 1;in 2 8;ld 0 0;out 0",
            "shape 8;regs 3;cols 8;rows 1;in 2 8;in 1 3;ldr 0 0 0;ldr 1 0 1;dot 2 1 0 0 1;out 2",
            "shape 8;regs 3;cols 8;rows 2;in 2 8;ldr 0 0 0;out 0",
            "shape 8;regs 3;cols 8;rows 1;in 3 5;ldr 0 0 0;out 0",
            // Contractions: column-stacked, each output once, from 0 on,
            // two non-empty lists.
            "shape 4;regs 2;in 4;ld 0 0;ctr 0 1 0 0;out 0",
            "shape 8;regs 2;cols 8;rows 1;in 2 8;ldr 0 0 0;ctr 0 1 0 0;ctr 0 1 0 0;out 0",
            "shape 8;regs 2;cols 8;rows 1;in 2 8;ldr 0 0 0;ctr 1 1 0 0;out 0",
            "shape 8;regs 2;cols 8;rows 1;in 2 8;ldr 0 0 0;ctr 0 1 0;out 0",
            "shape 8;regs 2;cols 8;rows 1;in 2 8;ldr 0 0 0;ctr 0 1 0 7;out 0",
        ] {
            assert!(FusedProgram::decode(bad).is_err(), "{bad}");
        }
    }
}
