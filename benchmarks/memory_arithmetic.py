"""Part 4 without a GPU: memory arithmetic (NOT measured) for astra-peft vs PEFT's CorDA computation at 7B-70B.

    .venv/bin/python benchmarks/memory_arithmetic.py            # prints the tables pasted into docs/memory.md

LoRA on all seven projections of every block, rank RANK. Sizes in GB = 1e9 bytes; statistics accumulated in fp32
(astra-peft's default accumulation_dtype and CorDA's default), model weights in bf16. astra-peft under its defaults:
statistic="covariance", statistic_source="auto", eigen_selection="smallest", null_space="keep".

What astra-peft holds (astra_peft/calibration.py, stats.py, spectrum.py, initialization.py):
- the fp32 Grams of every accumulator, from calibration until the initialisation returns. statistic_source="auto"
  gives a group of layers reading the same tensor one d_in x d_in input Gram unless the layers' output Grams (sum of
  d_out^2) are smaller: for LLaMA, q/k/v share one h^2, o_proj one h^2 (a tie goes to input), gate/up share one h^2,
  down_proj its h^2 output Gram. 4 h^2 per block.
- the float64 (d_out x r) basis of every layer already decomposed, until the write phase (counted in full: an
  upper bound by one block's bases).
- one layer's decomposition at a time, all float64, traced step by step in `layer_stages`; the peak is its largest
  step. (On CPU with T > 1 torch threads and no layer wider than 2048, astra_peft/_workers.py decomposes up to
  min(T, 8) layers side by side, one more being prepared: the SmolLM2 cross-check below says what that adds; every
  7B-70B shape here has a wider layer, so those are decomposed one at a time as counted.) The write phase (W in fp32, B·A, W - s·B·A; `_write`) is a second transient, one layer at a time.
Solver workspaces use LAPACK's dsyevd/dsyevr sizes; on a GPU torch calls cuSOLVER, whose workspace query is not
modelled. Per-batch calibration transients (one fp32 Gram, the batch's rows in fp32, the forward's activations) are
not counted for either library: they depend on the batch size, which part 4 does not fix.

CorDA (peft 0.21.2, peft/tuners/lora/corda.py, preprocess_corda): a d_in x d_in fp32 covariance on *every* target
layer, all held until the end; then per layer the largest of its steps (`corda_transient`); U (d_out x min) and
V (d_in x min) of every layer are moved to host memory and kept until they are cropped to r.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self):
        return self.hidden // self.heads

    def projections(self):
        """(name, d_out, d_in) of the seven projections of one block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    def params(self):
        per_block = sum(o * i for _, o, i in self.projections())
        return self.layers * per_block + (1 if self.tied else 2) * self.vocab * self.hidden  # + embeddings, lm_head


SHAPES = [
    Shape("SmolLM2-135M (cross-check with part 1)", 576, 1536, 30, 9, 3, 49152, tied=True),
    Shape("LLaMA-2-7B", 4096, 11008, 32, 32, 32, 32000),
    Shape("LLaMA-3-8B", 4096, 14336, 32, 32, 8, 128256),
    Shape("LLaMA-2-70B", 8192, 28672, 80, 64, 8, 32000),
]
F32, F64, BF16 = 4, 8, 2
GPU = 80e9
RANK = 16  # part 1's rank; it only sizes the bases and the null-space blocks
BLOCK = 8 * RANK  # projector columns spectrum._null_space_basis asks for at a time
GROUPS = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
PART1_STATS_BYTES = 159_252_480  # part 1's measured stats_bytes for SmolLM2-135M (benchmarks/results/init.json)


def astra_plan(shape: Shape):
    """(accumulator dims per block, statistic source per layer) under statistic_source='auto' (calibration._plan)."""
    p = {n: (o, i) for n, o, i in shape.projections()}
    dims, source = [], {}
    for g in GROUPS:
        d_in = p[g[0]][1]
        if d_in ** 2 <= sum(p[n][0] ** 2 for n in g):
            dims.append(d_in)
            source.update({n: "input" for n in g})
        else:
            dims += [p[n][0] for n in g]
            source.update({n: "output" for n in g})
    return dims, source


def syevd_work(n, vectors=True):
    """dsyevd workspace in doubles (its integer workspace counted at half a double each)."""
    return (1 + 6 * n + 2 * n * n) + (3 + 5 * n) / 2 if vectors else 2 * n + 1.5


def layer_stages(d_out, d_in, source, gpu=True):
    """(path, {step: float64 elements alive}) for one layer's decomposition, Grams and bases excluded.

    gpu: where the Grams live decides where the decomposition runs (output_factors moves W to the Gram's device).
    """
    if source == "output":
        # output_statistic: gram.to(f64), moment = gram / tokens, outer(mean, mean), moment - outer
        stages, held, d, path = {"statistic built": 4 * d_out ** 2}, 0, d_out, "dense, output Gram"
        base = d * d  # the statistic M
    else:
        # output_factors: the same four d_in^2 matrices plus W in f64; the caller then keeps F = W and G = C
        stages = {"F, G built": 4 * d_in ** 2 + d_out * d_in}
        held = d_out * d_in + d_in ** 2
        if d_in < d_out:
            p = d_in  # covariance: F has no bias column (second_moment with a bias would make it d_in + 1)
            qr = held + d_out * p + p * p  # thin Q and R
            stages["QR of F"] = qr
            # (R·G)·Rᵀ, then _symmetrised: the product, product + productᵀ and the half alive at the division
            stages["R·G·Rᵀ"] = qr + 3 * p * p
            kept = held + d_out * p + p * p  # Q and the small matrix stay on the spectrum object; R is freed
            if gpu:  # the small matrix's eigenvalues: a solver copy and dsyevd's jobz=N workspace, freed after
                stages["p×p eigenvalues"] = kept + p * p + syevd_work(p, False)
            else:  # _Tridiagonal: one dsytrd copy, kept for eigenvectors the selection might ask for, + dsterf
                kept += p * p
                stages["p×p eigenvalues"] = kept + 4 * p
            # Under the defaults only the d_out − p structural zeros are degenerate, so the projector is I − QQᵀ
            # from Q itself (no small-matrix eigenvector, no Q·v). _complement_projector's columns(cols):
            # Q[cols] (BLOCK x p) and Q @ Q[cols]ᵀ (d_out x BLOCK) alive together, then the product and its
            # negation; the += 1 at (cols[j], j) is in place (three BLOCK-long index/gather temporaries).
            # Other cases (not modelled): degenerate eigenvalues inside the small spectrum add a full p × p eigh
            # and Q·v (d_out x p); `largest` adds only r small-matrix vectors and Q·v (d_out x r).
            stages["null-space block"] = kept + max(BLOCK * p + d_out * BLOCK, 2 * d_out * BLOCK) + 3 * BLOCK
            return "factored", stages
        # select_eigenvectors: product = F·G·Fᵀ (the F·G temporary alive while it is formed), then
        # (product + product.T) / 2: product, the sum and the half alive at the division
        stages["F·G·Fᵀ"] = held + d_out * d_in + d_out ** 2
        stages["symmetrise"] = held + 3 * d_out ** 2
        d, path = d_out, "dense, W C Wᵀ"
        # F, G and M, the symmetrised copy (the unsymmetrised product is freed when _symmetrised returns)
        base = held + d * d
    if gpu:  # eigenvalues(): a solver copy of M + dsyevd's jobz=N workspace; then a full eigh and an r-column clone
        stages["eigenvalues"] = base + d * d + syevd_work(d, False)
        stages["eigh, all vectors"] = base + d * d + syevd_work(d) + d * RANK
    else:  # _Tridiagonal: one dsytrd copy of M serves dsterf (eigenvalues) and dstemr + dormqr (the r vectors:
        # Z, dstemr's 18 d doubles + 10 d ints); a degenerate pick would cost what the GPU column shows
        stages["eigenvalues"] = base + d * d + 4 * d
        stages["MRRR subset"] = base + d * d + d * RANK + 23 * d + 4 * d
    return path, stages


def peak(stages):
    step = max(stages, key=stages.get)
    return stages[step] * F64, step


def write_bytes(d_out, d_in):
    # _write: W in fp32 (a new tensor from bf16), B·A, s·B·A; then the residual while W and s·B·A are alive
    return 3 * d_out * d_in * F32


def corda_transient(d_out, d_in):
    """Bytes of one layer in collect_eigens_for_layer, the larger of its two heaviest steps (all fp32)."""
    n, m = d_in, min(d_out, d_in)
    # inversion check: W.float(), diag(damp), C + damp, its inverse, fix @ inv, torch.eye
    inv = 5 * n * n + d_out * n
    # SVD: diag(damp), C + damp, inverse, W·C and the solver's copy of it, U, Vh; m^2 stands in for the workspace
    svd = 3 * n * n + 2 * d_out * n + (d_out + n) * m + m * m
    return max(inv, svd) * F32


def gb(x):
    return f"{x / 1e9:,.1f}" if x >= 1e9 else f"{x / 1e9:.3f}"


def kinds(shape):
    """Projections grouped by identical (d_out, d_in, source): the rows of the per-layer table."""
    _, source = astra_plan(shape)
    out = {}
    for n, o, i in shape.projections():
        out.setdefault((o, i, source[n]), []).append(n)
    return [(", ".join(ns), o, i, src) for (o, i, src), ns in out.items()]


def model_row(s: Shape):
    proj = s.projections()
    dims, source = astra_plan(s)
    r = dict(name=s.name, shape=f"h={s.hidden}, I={s.intermediate}, L={s.layers}, kv={s.kv_heads}",
             params=s.params(), model=s.params() * BF16)
    r["grams"] = s.layers * sum(d * d for d in dims) * F32
    r["grams_packed"] = s.layers * sum(d * (d + 1) // 2 for d in dims) * F32
    r["bases"] = s.layers * sum(o for _, o, _ in proj) * RANK * F64
    decomp = {n: peak(layer_stages(o, i, source[n])[1])[0] for n, o, i in proj}
    r["decomp_layer"] = max(decomp, key=decomp.get)
    r["decomp"] = decomp[r["decomp_layer"]]
    r["decomp_cpu"] = max(peak(layer_stages(o, i, source[n], gpu=False)[1])[0] for n, o, i in proj)
    r["write"] = max(write_bytes(o, i) for _, o, i in proj)
    r["astra"] = r["grams"] + r["bases"] + max(r["decomp"], r["write"])
    r["astra_cpu"] = r["grams"] + r["bases"] + max(r["decomp_cpu"], r["write"])
    r["astra_packed"] = r["grams_packed"] + r["bases"] + max(r["decomp"], r["write"])  # a what-if
    # max_normalized: per layer its output Gram, or where smaller (d_in + 1 < d_out) its own weighted input Gram of
    # x̃ = [x; 1]; plus, transiently, the per-sequence upper-strip Grams of a shared weighted input (batch 8)
    r["maxnorm"] = s.layers * sum((i + 1) ** 2 if i + 1 < o else o * o for _, o, i in proj) * F32
    r["maxnorm_strips"] = max((8 * 5 * i * i // 8 for _, o, i in proj if i + 1 < o), default=0) * F32
    r["corda_cov"] = s.layers * sum(i * i for _, _, i in proj) * F32
    r["corda_uv"] = s.layers * sum((o + i) * min(o, i) for _, o, i in proj) * F32
    r["corda_decomp"] = max(corda_transient(o, i) for _, o, i in proj)
    r["corda"] = r["corda_cov"] + r["corda_decomp"]
    return r


def per_layer_table():
    print("Decomposition transient of one layer, float64, above the held Grams and bases:")
    print("| model | layers | d_out × d_in | statistic from | path | largest step (GPU) | GPU GB | CPU GB |")
    print("|" + "---|" * 8)
    for s in SHAPES[1:]:
        for names, o, i, src in kinds(s):
            path, stages = layer_stages(o, i, src)
            g, step = peak(stages)
            c, _ = peak(layer_stages(o, i, src, gpu=False)[1])
            print(f"| {s.name} | {names} | {o} × {i} | {src} Gram | {path} | {step} | {gb(g)} | {gb(c)} |")


def main():
    rows = [model_row(s) for s in SHAPES]
    per_layer_table()
    print()
    print("| model | shape | params | weights bf16 GB | astra-peft Grams (4 per block) GB | bases, r=16, f64 GB | "
          "astra decomposition transient, GPU GB (layer) | write transient GB | astra-peft peak above model GB | "
          "CorDA covariances GB | CorDA per-layer transient GB | CorDA peak above model (device) GB | "
          "CorDA U,V kept (host) GB | astra ÷ CorDA, device | astra ÷ CorDA, all on CPU (U,V in the same RAM) |")
    print("|" + "---|" * 15)
    for r in rows:
        print(f"| {r['name']} | {r['shape']} | {r['params'] / 1e9:.2f}B | {gb(r['model'])} | {gb(r['grams'])} | "
              f"{gb(r['bases'])} | {gb(r['decomp'])} ({r['decomp_layer']}) | {gb(r['write'])} | {gb(r['astra'])} | "
              f"{gb(r['corda_cov'])} | {gb(r['corda_decomp'])} | {gb(r['corda'])} | {gb(r['corda_uv'])} | "
              f"{r['astra'] / r['corda']:.2f} | {r['astra_cpu'] / (r['corda'] + r['corda_uv']):.2f} |")
    print()
    print("| model | bf16 weights + astra-peft peak, GB | fits one 80 GB GPU? | bf16 weights + CorDA peak, GB | "
          "fits one 80 GB GPU? | astra-peft, stats_device='cpu': GPU GB (host GB) | 8 x 80 GB, layers split "
          "evenly: astra-peft / CorDA per GPU, GB |")
    print("|" + "---|" * 7)
    fits = lambda x: "yes" if x <= GPU else "no"  # noqa: E731
    for r in rows:
        a, c = r["model"] + r["astra"], r["model"] + r["corda"]
        # with the Grams on the host, W is copied there too and the whole decomposition runs on the CPU;
        # the GPU only sees the write phase
        a_gpu = r["model"] + r["write"]
        a_host = r["grams"] + r["bases"] + r["decomp_cpu"]
        a8 = (r["model"] + r["grams"] + r["bases"]) / 8 + max(r["decomp"], r["write"])
        c8 = (r["model"] + r["corda_cov"]) / 8 + r["corda_decomp"]
        print(f"| {r['name']} | {gb(a)} | {fits(a)} | {gb(c)} | {fits(c)} | {gb(a_gpu)}, {fits(a_gpu)} "
              f"({gb(a_host)}) | {gb(a8)} ({fits(a8)}) / {gb(c8)} ({fits(c8)}) |")
    print()
    print("The ≤ ¼ target, device peak above the model ÷ CorDA's (what-ifs are marked; stats_device='cpu' is an "
          "existing option):")
    print("| model | ¼ of CorDA's peak, GB | astra-peft now (GB above ¼, or met) | its Grams alone | what-if: Grams "
          "stored as packed triangles (GB above ¼, or met) | stats_device='cpu' (GPU: write phase only) |")
    print("|" + "---|" * 6)
    for r in rows:
        c = r["corda"]
        over = lambda x: f"{gb(x - c / 4)} GB over" if x > c / 4 else f"met, {gb(c / 4 - x)} GB under"  # noqa: E731
        print(f"| {r['name']} | {gb(c / 4)} | {r['astra'] / c:.3f} ({over(r['astra'])}) | {r['grams'] / c:.3f} | "
              f"{r['astra_packed'] / c:.3f} ({over(r['astra_packed'])}) | {r['write'] / c:.3f} |")
    print()
    print("max_normalized statistic (per layer the smaller of its d_out^2 output Gram and its own (d_in+1)^2 "
          "weighted input Gram; + the shared input's per-sequence Gram strips of one batch of 8, transient):")
    for r in rows:
        print(f"  {r['name']}: {gb(r['maxnorm'])} GB fp32 (+ {gb(r['maxnorm_strips'])} GB)")
    smol = rows[0]
    print()
    print(f"Cross-check: SmolLM2-135M Grams {smol['grams']:,} B; part 1 measured stats_bytes {PART1_STATS_BYTES:,} B: "
          f"{'match' if smol['grams'] == PART1_STATS_BYTES else 'MISMATCH'}. CPU-path peak above the model by this "
          f"arithmetic: {smol['astra_cpu'] / 1e6:.0f} MB (Grams {smol['grams'] / 1e6:.0f} + bases "
          f"{smol['bases'] / 1e6:.0f} + one layer {max(smol['decomp_cpu'], smol['write']) / 1e6:.0f}) at one thread; "
          f"at T threads up to min(T, 8) + 1 layers' decomposition transients ({smol['decomp_cpu'] / 1e6:.0f} MB "
          f"each) are alive at once (astra_peft/_workers.py), {smol['decomp_cpu'] * 2 / 1e6:.0f} MB more at 2 threads.")
    flops(TOKENS)


TOKENS = 256 * 512  # part 4's calibration set


def decomposition_flops(d_out, d_in, source, gpu=True):
    """Flops of one layer's decomposition (2 per multiply-add), following layer_stages' steps."""
    tri = lambda n: 4 / 3 * n ** 3  # noqa: E731  Householder tridiagonalisation
    if source == "input" and d_in < d_out:
        p = d_in
        qr = 2 * (2 * d_out * p * p - 2 / 3 * p ** 3)  # geqrf + forming the thin Q
        # R·G·Rᵀ, the small matrix's eigenvalues (one reduction), one projector block from Q
        return qr + 4 * p ** 3 + tri(p) + 2 * d_out * BLOCK * p
    build = 0 if source == "output" else 2 * d_out * d_in * d_in + 2 * d_out * d_out * d_in  # F·G·Fᵀ
    d = d_out
    if gpu:  # an eigenvalue pass, then a full eigh (reduction + back-transformation of all d vectors)
        return build + tri(d) + tri(d) + 2 * d ** 3
    return build + tri(d) + 2 * d * d * RANK  # one reduction; MRRR's r vectors back-transformed


def flops(tokens: int) -> None:
    """Multiply-add arithmetic (2 flops each) for a calibration of `tokens` tokens; NOT measured."""
    print()
    print(f"Compute arithmetic for {tokens:,} calibration tokens (2 flops per multiply-add; NOT measured):")
    print("| model | forward, bf16 | astra Grams, fp32 | ÷ forward | CorDA covariances, fp32 | ÷ forward | "
          "astra decomposition, fp64, GPU path (full eigh in dense layers) | of which gate/up (factored) | "
          "CPU path (MRRR subset in dense layers) | of which gate/up |")
    print("|" + "---|" * 10)
    for s in SHAPES:
        proj = s.projections()
        dims, source = astra_plan(s)
        fwd = 2 * tokens * s.layers * sum(o * i for _, o, i in proj)
        grams = 2 * tokens * s.layers * sum(d * d for d in dims)
        corda = 2 * tokens * s.layers * sum(i * i for _, _, i in proj)
        cells = []
        for gpu in (True, False):
            per = {n: s.layers * decomposition_flops(o, i, source[n], gpu) for n, o, i in proj}
            total = sum(per.values())
            cells.append(f"{total:.2e} | {(per['gate_proj'] + per['up_proj']) / total:.0%}")
        print(f"| {s.name} | {fwd:.2e} | {grams:.2e} | {grams / fwd:.2f} | {corda:.2e} | {corda / fwd:.2f} | "
              f"{cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
