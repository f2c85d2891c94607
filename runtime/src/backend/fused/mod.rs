//! The interpreter of fused programs (`metac_graphs::fusion::FusedProgram`):
//! it runs them over the tensors of an ONNX Runtime custom node
//! (`super::fused_kernel`), chunk by chunk, with the vector math, product
//! and contraction kernels beside it. The IR crate finds the clusters and
//! writes their programs; running them is the runtime's.

mod contract;
mod dot;
pub(crate) mod math;

use metac_graphs::fusion::program::{
    broadcast_strides, destination, strides_of, written, Fn1, Fn2, FusedProgram, Instr, View,
};

/// Elements per register row.
pub const CHUNK: usize = 256;
/// Columns per register row of a column-stacked program. Its rows are
/// separate streams through memory (a hundred or more in the
/// HierarchicalRNN's VJP); runs of 4 KB per row keep writes and page walks
/// per byte low, where 1 KB runs were measured 2-3x slower to write out.
pub const STACKED_CHUNK: usize = 1024;

/// Running a fused program (an extension of the IR's [`FusedProgram`]).
pub trait Execute {
    /// Floats of contraction partials `run_units` writes: one block of
    /// every contraction's sums per unit of `walk`.
    fn partials_len(&self, walk: &Walk) -> usize;
    /// Adds the units' partials (see [`Execute::partials_len`]) into the
    /// contraction outputs, in unit order.
    ///
    /// # Safety
    /// `outputs` must address every output's writable floats.
    unsafe fn finish_sums(&self, walk: &Walk, partials: &[f32], outputs: &[*mut f32]);
    /// Floats of register storage the interpreter needs.
    fn register_len(&self) -> usize;
    /// How the output is walked: see [`Walk`].
    fn walk(&self) -> Walk;
    /// Runs the whole program on one thread.
    fn run(&self, inputs: &[&[f32]], outputs: &mut [&mut [f32]]);
    /// Runs units `units` of `walk` (see the implementation).
    ///
    /// # Safety
    /// As the implementation documents.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_units(
        &self,
        walk: &Walk,
        inputs: &[&[f32]],
        outputs: &[*mut f32],
        units: std::ops::Range<usize>,
        regs: &mut [f32],
        partials: *mut f32,
    );
}

impl Execute for FusedProgram {
    /// Floats of contraction partials `run_units` writes: one block of
    /// every contraction's sums per unit of `walk`.
    fn partials_len(&self, walk: &Walk) -> usize {
        walk.units() * sums_len(self)
    }

    /// Adds the units' partials (see [`Self::partials_len`]) into the
    /// contraction outputs, in unit order.
    ///
    /// # Safety
    /// `outputs` must address every output's writable floats.
    unsafe fn finish_sums(&self, walk: &Walk, partials: &[f32], outputs: &[*mut f32]) {
        let per_unit = sums_len(self);
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

    /// Floats of register storage the interpreter needs.
    fn register_len(&self) -> usize {
        self.registers
            * match self.columns {
                Some(_) => STACKED_CHUNK,
                None => CHUNK,
            }
    }

    /// How the output is walked: see [`Walk`].
    fn walk(&self) -> Walk {
        match self.columns {
            // Chunks of columns; inputs are addressed by row, not walked.
            Some(n) => Walk::columns(n, self),
            None => Walk::new(&self.shape, &self.inputs, &self.views),
        }
    }

    /// Runs the whole program on one thread.
    fn run(&self, inputs: &[&[f32]], outputs: &mut [&mut [f32]]) {
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
    unsafe fn run_units(
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
                return run_units_avx512(self, walk, inputs, outputs, units, regs, partials);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return run_units_avx2(self, walk, inputs, outputs, units, regs, partials);
            }
        }
        run_units_generic(self, walk, inputs, outputs, units, regs, partials)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_units_avx512(
    p: &FusedProgram,
    walk: &Walk,
    inputs: &[&[f32]],
    outputs: &[*mut f32],
    units: std::ops::Range<usize>,
    regs: &mut [f32],
    partials: *mut f32,
) {
    run_units_generic(p, walk, inputs, outputs, units, regs, partials)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_units_avx2(
    p: &FusedProgram,
    walk: &Walk,
    inputs: &[&[f32]],
    outputs: &[*mut f32],
    units: std::ops::Range<usize>,
    regs: &mut [f32],
    partials: *mut f32,
) {
    run_units_generic(p, walk, inputs, outputs, units, regs, partials)
}

#[inline(always)]
unsafe fn run_units_generic(
    p: &FusedProgram,
    walk: &Walk,
    inputs: &[&[f32]],
    outputs: &[*mut f32],
    units: std::ops::Range<usize>,
    regs: &mut [f32],
    partials: *mut f32,
) {
    if p.columns.is_some() {
        return run_stacked(p, walk, inputs, outputs, units, regs, partials);
    }
    let base = regs.as_mut_ptr();
    let scratch = |r: u16| base.add(r as usize * CHUNK);
    // Where each register's row is: its scratch row, or (for a load of a
    // contiguous run) the input itself, read in place.
    let mut at: Vec<*const f32> = (0..p.registers as u16)
        .map(|r| scratch(r) as *const f32)
        .collect();
    let mut offs = vec![0usize; inputs.len()];
    for u in units {
        let rows = walk.rows(u);
        let (out_off, len) = match rows {
            Some((first, count)) => (first * walk.inner, count * walk.inner),
            None => walk.unit(u, &mut offs),
        };
        for i in &p.instrs {
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
        for (&r, &o) in p.outputs.iter().zip(outputs) {
            std::ptr::copy_nonoverlapping(at[r as usize], o.add(out_off), len);
        }
    }
}

/// [`run_units_generic`] for a column-stacked program: each unit is
/// a chunk of columns of every row.
#[inline(always)]
unsafe fn run_stacked(
    p: &FusedProgram,
    walk: &Walk,
    inputs: &[&[f32]],
    outputs: &[*mut f32],
    units: std::ops::Range<usize>,
    regs: &mut [f32],
    partials: *mut f32,
) {
    let n = p.columns.expect("a column-stacked program");
    let base = regs.as_mut_ptr();
    let scratch = |r: u16| base.add(r as usize * STACKED_CHUNK);
    let mut at: Vec<*const f32> = (0..p.registers as u16)
        .map(|r| scratch(r) as *const f32)
        .collect();
    // Per input: read by rows of `n` (else one element per row).
    let by_rows: Vec<bool> = p
        .inputs
        .iter()
        .map(|s| s.last() == Some(&n) && n > 1)
        .collect();
    let mut no_offsets: [usize; 0] = [];
    // A product's and a contraction's operands, reused from unit to unit.
    let (mut srcs, mut dsts, mut weights) = (vec![], vec![], vec![]);
    let (mut rows_a, mut rows_b) = (vec![], vec![]);
    // Where each contraction's block starts in a unit's partials.
    let sums_len = sums_len(p);
    let sum_offsets: Vec<usize> = p
        .sums
        .iter()
        .scan(0, |off, [p, q]| {
            *off += p * q;
            Some(*off - p * q)
        })
        .collect();
    // Output row `s` (counted over all outputs' rows): its output and row.
    let slots: Vec<(usize, usize)> = p
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
        for (k, i) in p.instrs.iter().enumerate() {
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
                    let group = &p.instrs[k..k + walk.groups[k]];
                    if group.is_empty() {
                        continue;
                    }
                    srcs.clear();
                    srcs.extend(p.lists[list as usize].iter().map(|&r| at[r as usize]));
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
                    dot::dot_rows(&dsts, &weights, &srcs, len);
                    for (g, &d) in group.iter().zip(&dsts) {
                        at[written(g) as usize] = d;
                    }
                }
                Instr::Contract { out, a, b } => {
                    for (rows, l) in [(&mut rows_a, a), (&mut rows_b, b)] {
                        rows.clear();
                        rows.extend(p.lists[l as usize].iter().map(|&r| at[r as usize]));
                    }
                    let part = partials.add(u * sums_len + sum_offsets[out as usize]);
                    contract::contract_rows(part, &rows_a, &rows_b, len);
                }
                ref other => compute(other, &mut at, target(k, written(other)), len),
            }
        }
        for (s, &reg) in p.outputs.iter().enumerate() {
            if !walk.written_in_place[s] {
                let (o, r) = slots[s];
                std::ptr::copy_nonoverlapping(at[reg as usize], outputs[o].add(r * n + start), len);
            }
        }
    }
}

/// Floats of one unit's contraction partials.
fn sums_len(p: &FusedProgram) -> usize {
    p.sums.iter().map(|[p, q]| p * q).sum()
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
        // A row is read as contiguous (stride 1) or broadcast (0). A view
        // whose innermost dimension has a larger stride (a slice of length
        // 1 along the source's last axis) is walked one element per row.
        let (inner, inner_stride) = match dims.last() {
            Some((_, st)) if st.iter().any(|&s| s > 1) => (1, vec![0; inputs.len()]),
            _ => dims.pop().unwrap_or((1, vec![0; inputs.len()])),
        };
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

    /// A program with broadcast inputs and a view, decoded from its text
    /// (the one `metac_graphs`' encoding test builds), computes what its
    /// instructions say.
    #[test]
    fn runs_broadcasts_and_views() {
        // `a + b` of broadcast inputs, and where it is below 0.1, itself,
        // else the tanh of columns 1..6 of the third input (a view).
        let q = FusedProgram::decode(
            "shape 3 5;regs 4;in 3 1;in 5;in 3 7;view 2 1 3 5;ld 0 0;ld 1 1;add 2 0 1;\
             c 0 3dcccccd;less 1 2 0;ld 0 2;tanh 3 0;where 0 1 2 3;out 0 2",
        )
        .unwrap();
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
