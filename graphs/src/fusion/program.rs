//! A fused elementwise kernel as a register program, its text encoding (the
//! `program` attribute of an `ai.metac` `FusedElementwise` ONNX node) and its
//! interpreter.
//!
//! The interpreter walks the output in chunks of [`CHUNK`] elements. For
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

use super::math;

/// The ONNX domain and op type of fused nodes.
pub const FUSED_DOMAIN: &str = "ai.metac";
pub const FUSED_OP: &str = "FusedElementwise";

/// Elements per register row.
pub const CHUNK: usize = 256;

/// Columns per register row of a column-stacked program. Its rows are
/// separate streams through memory (a hundred or more in the
/// HierarchicalRNN's VJP); runs of 4 KB per row keep writes and page walks
/// per byte low, where 1 KB runs were measured 2-3x slower to write out.
pub const STACKED_CHUNK: usize = 1024;

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
    /// registers of list `a` and `B`'s those of list `b` (see
    /// [`super::contract`]).
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
fn strides_of(shape: &[usize]) -> Vec<usize> {
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

    /// Floats of contraction partials `run_units` writes: one block of
    /// every contraction's sums per unit of `walk`.
    pub fn partials_len(&self, walk: &Walk) -> usize {
        walk.units() * self.sums_len()
    }

    /// Floats of one unit's contraction partials.
    fn sums_len(&self) -> usize {
        self.sums.iter().map(|[p, q]| p * q).sum()
    }

    /// Adds the units' partials (see [`Self::partials_len`]) into the
    /// contraction outputs, in unit order.
    ///
    /// # Safety
    /// `outputs` must address every output's writable floats.
    pub unsafe fn finish_sums(&self, walk: &Walk, partials: &[f32], outputs: &[*mut f32]) {
        let per_unit = self.sums_len();
        let mut off = 0;
        for (k, [p, q]) in self.sums.iter().enumerate() {
            let o = std::slice::from_raw_parts_mut(outputs[self.out_rows.len() + k], p * q);
            o.fill(0.0);
            for u in 0..walk.units() {
                let part = &partials[u * per_unit + off..u * per_unit + off + p * q];
                for (d, &v) in o.iter_mut().zip(part) {
                    *d += v;
                }
            }
            off += p * q;
        }
    }

    /// Number of output elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Floats of register storage the interpreter needs.
    pub fn register_len(&self) -> usize {
        self.registers
            * match self.columns {
                Some(_) => STACKED_CHUNK,
                None => CHUNK,
            }
    }

    /// How the output is walked: see [`Walk`].
    pub fn walk(&self) -> Walk {
        match self.columns {
            // Chunks of columns; inputs are addressed by row, not walked.
            Some(n) => Walk::columns(n, self),
            None => Walk::new(&self.shape, &self.inputs, &self.views),
        }
    }

    /// Runs the whole program on one thread.
    pub fn run(&self, inputs: &[&[f32]], outputs: &mut [&mut [f32]]) {
        let walk = self.walk();
        let ptrs: Vec<*mut f32> = outputs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        assert_eq!(
            inputs.len(),
            self.inputs.len(),
            "fused program: input count"
        );
        assert_eq!(outputs.len(), self.output_count(), "fused program: outputs");
        for (k, o) in outputs.iter().enumerate() {
            let want: usize = self.output_shape(k).iter().product();
            assert_eq!(o.len(), want, "fused program: output length");
        }
        for (x, s) in inputs.iter().zip(&self.inputs) {
            assert_eq!(
                x.len(),
                s.iter().product::<usize>(),
                "fused program: input length"
            );
        }
        let mut regs = vec![0.0f32; self.register_len()];
        let mut partials = vec![0.0f32; self.partials_len(&walk)];
        // SAFETY: lengths checked above; one thread writes every unit.
        unsafe {
            let units = 0..walk.units();
            self.run_units(
                &walk,
                inputs,
                &ptrs,
                units,
                &mut regs,
                partials.as_mut_ptr(),
            );
            self.finish_sums(&walk, &partials, &ptrs);
        }
    }

    /// Runs the units `units` of `walk` (a chunk of one row each), with the
    /// widest vector instructions the CPU has (the body is compiled once per
    /// instruction set; the crate itself targets baseline x86-64).
    ///
    /// # Safety
    /// `inputs` must have the program's input lengths and every pointer in
    /// `outputs` must address its output's writable floats; units run
    /// concurrently must be disjoint. `regs` holds [`Self::register_len`]
    /// floats, `partials` [`Self::partials_len`] (each unit writes its own
    /// block; [`Self::finish_sums`] adds them up once all units ran).
    pub unsafe fn run_units(
        &self,
        walk: &Walk,
        inputs: &[&[f32]],
        outputs: &[*mut f32],
        units: std::ops::Range<usize>,
        regs: &mut [f32],
        partials: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return self.run_units_avx512(walk, inputs, outputs, units, regs, partials);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return self.run_units_avx2(walk, inputs, outputs, units, regs, partials);
            }
        }
        self.run_units_generic(walk, inputs, outputs, units, regs, partials)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_units_avx512(
        &self,
        walk: &Walk,
        inputs: &[&[f32]],
        outputs: &[*mut f32],
        units: std::ops::Range<usize>,
        regs: &mut [f32],
        partials: *mut f32,
    ) {
        self.run_units_generic(walk, inputs, outputs, units, regs, partials)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_units_avx2(
        &self,
        walk: &Walk,
        inputs: &[&[f32]],
        outputs: &[*mut f32],
        units: std::ops::Range<usize>,
        regs: &mut [f32],
        partials: *mut f32,
    ) {
        self.run_units_generic(walk, inputs, outputs, units, regs, partials)
    }

    #[inline(always)]
    unsafe fn run_units_generic(
        &self,
        walk: &Walk,
        inputs: &[&[f32]],
        outputs: &[*mut f32],
        units: std::ops::Range<usize>,
        regs: &mut [f32],
        partials: *mut f32,
    ) {
        if self.columns.is_some() {
            return self.run_stacked(walk, inputs, outputs, units, regs, partials);
        }
        let base = regs.as_mut_ptr();
        let scratch = |r: u16| base.add(r as usize * CHUNK);
        // Where each register's row is: its scratch row, or (for a load of a
        // contiguous run) the input itself, read in place.
        let mut at: Vec<*const f32> = (0..self.registers as u16)
            .map(|r| scratch(r) as *const f32)
            .collect();
        let mut offs = vec![0usize; inputs.len()];
        for u in units {
            let rows = walk.rows(u);
            let (out_off, len) = match rows {
                Some((first, count)) => (first * walk.inner, count * walk.inner),
                None => walk.unit(u, &mut offs),
            };
            for i in &self.instrs {
                match *i {
                    Instr::Load { dst, input } if rows.is_some() => {
                        let (first, count) = rows.expect("multi-row unit");
                        let k = input as usize;
                        let (x, n) = (inputs[k], walk.inner);
                        let (so, si) = (walk.outer_strides[k][0], walk.inner_stride[k]);
                        let base = walk.base[k];
                        if si == 1 && so == n {
                            at[dst as usize] = x[base + first * n..base + first * n + len].as_ptr();
                        } else {
                            at[dst as usize] = scratch(dst);
                            let d = std::slice::from_raw_parts_mut(scratch(dst), len);
                            for (j, row) in d.chunks_exact_mut(n).enumerate().take(count) {
                                let off = base + (first + j) * so;
                                if si == 1 {
                                    row.copy_from_slice(&x[off..off + n]);
                                } else {
                                    row.fill(x[off]);
                                }
                            }
                        }
                    }
                    Instr::Load { dst, input } => {
                        let x = inputs[input as usize];
                        let off = offs[input as usize];
                        if walk.inner_stride[input as usize] == 0 {
                            at[dst as usize] = scratch(dst);
                            std::slice::from_raw_parts_mut(scratch(dst), len).fill(x[off]);
                        } else {
                            at[dst as usize] = x[off..off + len].as_ptr();
                        }
                    }
                    ref other => compute(other, &mut at, scratch(written(other)), len),
                }
            }
            for (&r, &o) in self.outputs.iter().zip(outputs) {
                std::ptr::copy_nonoverlapping(at[r as usize], o.add(out_off), len);
            }
        }
    }

    /// [`Self::run_units_generic`] for a column-stacked program: each unit is
    /// a chunk of columns of every row.
    #[inline(always)]
    unsafe fn run_stacked(
        &self,
        walk: &Walk,
        inputs: &[&[f32]],
        outputs: &[*mut f32],
        units: std::ops::Range<usize>,
        regs: &mut [f32],
        partials: *mut f32,
    ) {
        let n = self.columns.expect("a column-stacked program");
        let base = regs.as_mut_ptr();
        let scratch = |r: u16| base.add(r as usize * STACKED_CHUNK);
        let mut at: Vec<*const f32> = (0..self.registers as u16)
            .map(|r| scratch(r) as *const f32)
            .collect();
        // Per input: read by rows of `n` (else one element per row).
        let by_rows: Vec<bool> = self
            .inputs
            .iter()
            .map(|s| s.last() == Some(&n) && n > 1)
            .collect();
        let mut no_offsets: [usize; 0] = [];
        // A product's and a contraction's operands, reused from unit to unit.
        let (mut srcs, mut dsts, mut weights) = (vec![], vec![], vec![]);
        let (mut rows_a, mut rows_b) = (vec![], vec![]);
        // Where each contraction's block starts in a unit's partials.
        let sums_len = self.sums_len();
        let sum_offsets: Vec<usize> = self
            .sums
            .iter()
            .scan(0, |off, [p, q]| {
                *off += p * q;
                Some(*off - p * q)
            })
            .collect();
        // Output row `s` (counted over all outputs' rows): its output and row.
        let slots: Vec<(usize, usize)> = self
            .out_rows
            .iter()
            .enumerate()
            .flat_map(|(o, &rows)| (0..rows).map(move |r| (o, r)))
            .collect();
        for u in units {
            let (start, len) = walk.unit(u, &mut no_offsets);
            // Where instruction `k`'s result goes: its output row, or its
            // register's scratch row.
            let target = |k: usize, dst: u16| match walk.direct[k] {
                Some(s) => {
                    let (o, r) = slots[s];
                    outputs[o].add(r * n + start)
                }
                None => scratch(dst),
            };
            for (k, i) in self.instrs.iter().enumerate() {
                match *i {
                    Instr::LoadRow { dst, input, row } => {
                        let x = inputs[input as usize];
                        if by_rows[input as usize] {
                            let off = row as usize * n + start;
                            at[dst as usize] = x[off..off + len].as_ptr();
                        } else {
                            at[dst as usize] = scratch(dst);
                            std::slice::from_raw_parts_mut(scratch(dst), len).fill(x[row as usize]);
                        }
                    }
                    Instr::Dot { input, list, .. } => {
                        // The first of a group computes the whole product.
                        let group = &self.instrs[k..k + walk.groups[k]];
                        if group.is_empty() {
                            continue;
                        }
                        srcs.clear();
                        srcs.extend(self.lists[list as usize].iter().map(|&r| at[r as usize]));
                        let b = srcs.len();
                        let w = inputs[input as usize];
                        dsts.clear();
                        weights.clear();
                        for (g, instr) in group.iter().enumerate() {
                            if let Instr::Dot { dst, row, .. } = *instr {
                                dsts.push(target(k + g, dst));
                                weights.push(&w[row as usize * b..(row as usize + 1) * b]);
                            }
                        }
                        super::dot::dot_rows(&dsts, &weights, &srcs, len);
                        for (g, &d) in group.iter().zip(&dsts) {
                            at[written(g) as usize] = d;
                        }
                    }
                    Instr::Contract { out, a, b } => {
                        for (rows, l) in [(&mut rows_a, a), (&mut rows_b, b)] {
                            rows.clear();
                            rows.extend(self.lists[l as usize].iter().map(|&r| at[r as usize]));
                        }
                        let part = partials.add(u * sums_len + sum_offsets[out as usize]);
                        super::contract::contract_rows(part, &rows_a, &rows_b, len);
                    }
                    ref other => compute(other, &mut at, target(k, written(other)), len),
                }
            }
            for (s, &reg) in self.outputs.iter().enumerate() {
                if !walk.written_in_place[s] {
                    let (o, r) = slots[s];
                    std::ptr::copy_nonoverlapping(
                        at[reg as usize],
                        outputs[o].add(r * n + start),
                        len,
                    );
                }
            }
        }
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
fn written(i: &Instr) -> u16 {
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

/// Runs an arithmetic instruction over `len` elements into `dst` (its
/// destination's scratch row).
#[inline(always)]
unsafe fn compute(i: &Instr, at: &mut [*const f32], dst: *mut f32, len: usize) {
    let d = std::slice::from_raw_parts_mut(dst, len);
    let row = |r: u16| std::slice::from_raw_parts(at[r as usize], len);
    match *i {
        Instr::Const { value, .. } => d.fill(value),
        Instr::Unary { f, a, .. } => unary(f, d, row(a)),
        Instr::Binary { f, a, b, .. } => binary(f, d, row(a), row(b)),
        Instr::Where { c, a, b, .. } => {
            for (((d, &c), &a), &b) in d.iter_mut().zip(row(c)).zip(row(a)).zip(row(b)) {
                *d = if c != 0.0 { a } else { b };
            }
        }
        Instr::Load { .. } | Instr::LoadRow { .. } | Instr::Dot { .. } | Instr::Contract { .. } => {
            unreachable!("loads and products are run by the interpreter loop")
        }
    }
    at[written(i) as usize] = dst;
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

#[inline(always)]
fn map1(d: &mut [f32], a: &[f32], f: impl Fn(f32) -> f32) {
    for (d, &a) in d.iter_mut().zip(a) {
        *d = f(a);
    }
}

#[inline(always)]
fn map2(d: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
        *d = f(a, b);
    }
}

/// `asinh` as the ONNX export lowers it (a series near 0, the log form
/// elsewhere), so fused and unfused graphs agree.
#[inline(always)]
fn asinh(x: f32) -> f32 {
    let x2 = x * x;
    let small = x * (x2 * (x2 * (3.0 / 40.0) + (-1.0 / 6.0)) + 1.0);
    let big = sign(x) * math::ln(x.abs() + (x2 + 1.0).sqrt());
    if x.abs() < 0.1 {
        small
    } else {
        big
    }
}

#[inline(always)]
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x
    }
}

#[inline(always)]
fn unary(f: Fn1, d: &mut [f32], a: &[f32]) {
    match f {
        Fn1::Neg => map1(d, a, |x| -x),
        Fn1::Exp => map1(d, a, math::exp),
        Fn1::Log => map1(d, a, math::ln),
        Fn1::Sqrt => map1(d, a, f32::sqrt),
        Fn1::Sigmoid => map1(d, a, math::sigmoid),
        Fn1::Tanh => map1(d, a, math::tanh),
        // NaN stays NaN, like Min and Max below.
        Fn1::Relu => map1(d, a, |x| if x > 0.0 || x.is_nan() { x } else { 0.0 }),
        Fn1::Abs => map1(d, a, f32::abs),
        Fn1::Sign => map1(d, a, sign),
        Fn1::Asinh => map1(d, a, asinh),
    }
}

#[inline(always)]
fn binary(f: Fn2, d: &mut [f32], a: &[f32], b: &[f32]) {
    let bool01 = |c: bool| if c { 1.0 } else { 0.0 };
    match f {
        Fn2::Add => map2(d, a, b, |x, y| x + y),
        Fn2::Sub => map2(d, a, b, |x, y| x - y),
        Fn2::Mul => map2(d, a, b, |x, y| x * y),
        Fn2::Div => map2(d, a, b, |x, y| x / y),
        // NaN in either operand gives NaN.
        Fn2::Min => map2(d, a, b, |x, y| if x < y || x.is_nan() { x } else { y }),
        Fn2::Max => map2(d, a, b, |x, y| if x > y || x.is_nan() { x } else { y }),
        Fn2::Less => map2(d, a, b, |x, y| bool01(x < y)),
        Fn2::Greater => map2(d, a, b, |x, y| bool01(x > y)),
        Fn2::Equal => map2(d, a, b, |x, y| bool01(x == y)),
    }
}

/// Strides of an input of shape `input` (with element strides `strides`)
/// read at the coordinates of `shape` (numpy broadcasting: 0 along broadcast
/// dimensions), or `None` if it does not broadcast.
fn broadcast_strides(input: &[usize], strides: &[usize], shape: &[usize]) -> Option<Vec<usize>> {
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

/// The output walked as rows of `inner` contiguous elements, each cut into
/// units of at most [`CHUNK`]; per input, its strides over the outer
/// (row) dimensions and along a row (0 or 1).
#[derive(Clone, Debug)]
pub struct Walk {
    outer: Vec<usize>,
    inner: usize,
    /// Elements per unit along a row.
    chunk: usize,
    chunks_per_row: usize,
    /// Rows per unit: short rows (a `[10000, 20]` tensor with a bias) are
    /// walked several at a time so a unit still holds about a chunk.
    rows_per_unit: usize,
    outer_strides: Vec<Vec<usize>>,
    pub inner_stride: Vec<usize>,
    /// Per input, the element its view starts at.
    base: Vec<usize>,
    /// Column-stacked programs: per instruction, the number of `Dot`s from
    /// it on that form one product (the same matrix and sources), 0 inside
    /// such a group.
    groups: Vec<usize>,
    /// Column-stacked programs: per instruction, the output row (its index
    /// among all outputs' rows) it writes straight into, when it computes
    /// that row's final value; per output row, whether it is written so.
    direct: Vec<Option<usize>>,
    written_in_place: Vec<bool>,
}

impl Walk {
    fn new(shape: &[usize], inputs: &[Vec<usize>], views: &[Option<View>]) -> Walk {
        let strides: Vec<Vec<usize>> = inputs
            .iter()
            .zip(views)
            .map(|(s, v)| {
                let read = v.as_ref().map_or(s, |v| &v.shape);
                broadcast_strides(read, &strides_of(s), shape).expect("validated input shape")
            })
            .collect();
        let base = views
            .iter()
            .map(|v| v.as_ref().map_or(0, |v| v.offset))
            .collect();
        // Drop size-1 dimensions, then merge neighbours every input walks
        // alike (both contiguous with each other, or both broadcast).
        let mut dims: Vec<(usize, Vec<usize>)> = vec![];
        for (d, &n) in shape.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let st: Vec<usize> = strides.iter().map(|s| s[d]).collect();
            if let Some((pn, pst)) = dims.last_mut() {
                if pst.iter().zip(&st).all(|(&p, &c)| p == c * n) {
                    *pn *= n;
                    *pst = st;
                    continue;
                }
            }
            dims.push((n, st));
        }
        let (inner, inner_stride) = dims.pop().unwrap_or((1, vec![0; inputs.len()]));
        let outer: Vec<usize> = dims.iter().map(|(n, _)| *n).collect();
        let outer_strides = (0..inputs.len())
            .map(|k| dims.iter().map(|(_, st)| st[k]).collect())
            .collect();
        // Several rows per unit only over one outer dimension, where a row's
        // input offsets are a multiple of its index.
        let rows_per_unit = if outer.len() == 1 && inner < CHUNK / 2 {
            CHUNK / inner
        } else {
            1
        };
        Walk {
            outer,
            inner,
            chunk: CHUNK,
            chunks_per_row: inner.div_ceil(CHUNK).max(1),
            rows_per_unit,
            outer_strides,
            inner_stride,
            base,
            groups: vec![],
            direct: vec![],
            written_in_place: vec![],
        }
    }

    /// The columns of a column-stacked program over `n` columns, in units
    /// of [`STACKED_CHUNK`].
    fn columns(n: usize, p: &FusedProgram) -> Walk {
        let mut groups = vec![0; p.instrs.len()];
        let mut k = 0;
        while k < p.instrs.len() {
            let Instr::Dot { input, list, .. } = p.instrs[k] else {
                k += 1;
                continue;
            };
            let same = |i: &Instr| {
                matches!(*i, Instr::Dot { input: i2, list: l2, .. }
                if i2 == input && p.lists[l2 as usize] == p.lists[list as usize])
            };
            let len = p.instrs[k..].iter().take_while(|i| same(i)).count();
            groups[k] = len;
            k += len;
        }
        // Each output row is computed straight into the output by the last
        // instruction that writes its register, saving a copy of the row;
        // rows that are loads or repeat another row's register are copied.
        let mut direct = vec![None; p.instrs.len()];
        let mut written_in_place = vec![false; p.outputs.len()];
        for (slot, &reg) in p.outputs.iter().enumerate() {
            let last = p.instrs.iter().rposition(|i| destination(i) == Some(reg));
            if let Some(k) = last {
                let computes = !matches!(p.instrs[k], Instr::LoadRow { .. } | Instr::Load { .. });
                if computes && direct[k].is_none() {
                    direct[k] = Some(slot);
                    written_in_place[slot] = true;
                }
            }
        }
        Walk {
            groups,
            direct,
            written_in_place,
            outer: vec![],
            inner: n,
            chunk: STACKED_CHUNK,
            chunks_per_row: n.div_ceil(STACKED_CHUNK).max(1),
            rows_per_unit: 1,
            outer_strides: vec![],
            inner_stride: vec![],
            base: vec![],
        }
    }

    /// Number of units.
    pub fn units(&self) -> usize {
        if self.rows_per_unit > 1 {
            return self.outer[0].div_ceil(self.rows_per_unit);
        }
        self.outer.iter().product::<usize>() * self.chunks_per_row
    }

    /// The rows `(first, count)` of unit `u` when units span several rows.
    #[inline(always)]
    fn rows(&self, u: usize) -> Option<(usize, usize)> {
        (self.rows_per_unit > 1).then(|| {
            let first = u * self.rows_per_unit;
            (first, self.rows_per_unit.min(self.outer[0] - first))
        })
    }

    /// Output offset and length of unit `u`; its per-input offsets go to
    /// `offs`.
    #[inline(always)]
    fn unit(&self, u: usize, offs: &mut [usize]) -> (usize, usize) {
        let (row, chunk) = (u / self.chunks_per_row, u % self.chunks_per_row);
        let start = chunk * self.chunk;
        let len = (self.inner - start).min(self.chunk);
        for (k, off) in offs.iter_mut().enumerate() {
            *off = self.base[k] + start * self.inner_stride[k];
        }
        let mut r = row;
        for d in (0..self.outer.len()).rev() {
            let c = r % self.outer[d];
            r /= self.outer[d];
            for (k, off) in offs.iter_mut().enumerate() {
                *off += c * self.outer_strides[k][d];
            }
        }
        (row * self.inner + start, len)
    }
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
        let x0 = [1.0, -2.0, 0.0];
        let x1 = [0.0, -0.5, 0.05, -3.0, 1.0];
        let x2: Vec<f32> = (0..21).map(|i| i as f32 * 0.1 - 0.7).collect();
        let (mut o0, mut o1) = (vec![0.0; 15], vec![0.0; 15]);
        q.run(&[&x0, &x1, &x2], &mut [&mut o0, &mut o1]);
        for i in 0..3 {
            for j in 0..5 {
                let s = x0[i] + x1[j];
                assert_eq!(o1[i * 5 + j], s);
                let want = if s < 0.1 { s } else { x2[i * 7 + j + 1].tanh() };
                assert!((o0[i * 5 + j] - want).abs() < 1e-6);
            }
        }
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

    #[test]
    fn runs_a_column_stacked_program() {
        // Rows of x [2, 5], a per-row scalar s [2, 1]; out0 = x * s (two
        // rows), out1 = W [1, 2] @ (x * s).
        let text = "shape 5;regs 6;cols 5;rows 2 1;in 2 5;in 2 1;in 1 2;\
                    ldr 0 0 0;ldr 1 1 0;mul 2 0 1;ldr 0 0 1;ldr 1 1 1;mul 3 0 1;\
                    dot 4 2 0 2 3;out 2 3 4";
        let p = FusedProgram::decode(text).unwrap();
        assert_eq!(p.encode(), text);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, -1.0, -2.0, -3.0, -4.0, -5.0];
        let (s, w) = ([2.0, 3.0], [0.5, 1.0]);
        let (mut o0, mut o1) = (vec![0.0; 10], vec![0.0; 5]);
        p.run(&[&x, &s, &w], &mut [&mut o0, &mut o1]);
        assert_eq!(
            o0,
            [2.0, 4.0, 6.0, 8.0, 10.0, -3.0, -6.0, -9.0, -12.0, -15.0]
        );
        assert_eq!(o1, [-2.0, -4.0, -6.0, -8.0, -10.0]);
    }

    #[test]
    fn sums_contractions_over_chunks() {
        // x [2, n], y [3, n] over several chunks: out0 = x * x (two rows),
        // sums (x * x) @ y^T [2, 3] and x @ x^T [2, 2].
        let n = 2 * STACKED_CHUNK + 37;
        let text = format!(
            "shape {n};regs 7;cols {n};rows 2;in 2 {n};in 3 {n};\
             ldr 0 0 0;ldr 1 0 1;mul 2 0 0;mul 3 1 1;ldr 4 1 0;ldr 5 1 1;ldr 6 1 2;\
             ctr 0 2 2 3 4 5 6;ctr 1 2 0 1 0 1;out 2 3"
        );
        let p = FusedProgram::decode(&text).unwrap();
        assert_eq!(p.encode(), text);
        assert_eq!(p.output_count(), 3);
        assert_eq!(
            (p.output_shape(1), p.output_shape(2)),
            (vec![2, 3], vec![2, 2])
        );
        let x: Vec<f32> = (0..2 * n)
            .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let y: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let (mut sq, mut s0, mut s1) = (vec![0.0; 2 * n], vec![f32::NAN; 6], vec![f32::NAN; 4]);
        p.run(&[&x, &y], &mut [&mut sq, &mut s0, &mut s1]);
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>()
        };
        let (xr, yr) = (
            |i: usize| &x[i * n..(i + 1) * n],
            |j: usize| &y[j * n..(j + 1) * n],
        );
        for i in 0..2 {
            assert_eq!(sq[i * n + 5], xr(i)[5] * xr(i)[5]);
            let sqr: Vec<f32> = xr(i).iter().map(|v| v * v).collect();
            for j in 0..3 {
                let want = dot(&sqr, yr(j));
                assert!((s0[i * 3 + j] as f64 - want).abs() < 1e-3, "{i} {j}");
            }
            for j in 0..2 {
                let want = dot(xr(i), xr(j));
                assert!((s1[i * 2 + j] as f64 - want).abs() < 1e-3, "{i} {j}");
            }
        }
        // A program whose only outputs are contractions.
        let only =
            format!("shape {n};regs 2;cols {n};rows;in 2 {n};ldr 0 0 0;ldr 1 0 1;ctr 0 1 0 1;out");
        let p = FusedProgram::decode(&only).unwrap();
        let mut s = vec![f32::NAN];
        p.run(&[&x], &mut [&mut s]);
        assert!((s[0] as f64 - dot(xr(0), xr(1))).abs() < 1e-3);
    }

    #[test]
    fn walks_broadcasts_in_units() {
        // [2, 3, 600] with a per-row input [2, 3, 1]: 6 rows of 3 chunks.
        let w = Walk::new(
            &[2, 3, 600],
            &[vec![2, 3, 1], vec![600], vec![2, 3, 600]],
            &[None, None, None],
        );
        assert_eq!(w.units(), 6 * 3);
        let mut ins = vec![0; 3];
        let (off, len) = w.unit(4, &mut ins);
        assert_eq!((off, len), (600 + 256, 256));
        assert_eq!(ins, vec![1, 256, 600 + 256]);
        let (_, len) = w.unit(5, &mut ins);
        assert_eq!(len, 600 - 512);
        // Short rows: several per unit.
        let w = Walk::new(
            &[1000, 20],
            &[vec![20], vec![1000, 1], vec![1000, 20]],
            &[None, None, None],
        );
        assert_eq!((w.rows_per_unit, w.units()), (12, 84));
        assert_eq!(w.rows(83), Some((996, 4)));
        // Inputs of the full shape merge every dimension into one row.
        let w = Walk::new(&[4, 5, 6], &[vec![4, 5, 6], vec![]], &[None, None]);
        assert_eq!((w.outer.len(), w.inner), (0, 120));
    }
}
