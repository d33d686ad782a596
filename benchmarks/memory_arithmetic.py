"""Part 4 without a GPU: memory arithmetic (NOT measured) for astra-peft vs PEFT's CorDA computation at 7B-70B.

    .venv/bin/python benchmarks/memory_arithmetic.py            # prints the markdown tables of docs/memory.md

LoRA on all seven projections of every block. Sizes in GB = 1e9 bytes (and GiB where noted); statistics in fp32
(astra-peft's default accumulation_dtype and CorDA's default), model weights in bf16.

astra-peft, calibration: one fp32 Gram per *accumulator*. AstraConfig(statistic_source="auto") (the default for
covariance / second_moment) gives a group of layers that read the same tensor one d_in x d_in input Gram, unless
the layers' output Grams (sum of d_out^2) are smaller, then one d_out x d_out Gram per layer. For LLaMA blocks this
is: q/k/v share one h^2, o_proj one h^2 (input, a tie), gate/up share one h^2, down_proj one h^2 (output, since
h^2 < I^2): 4 h^2 per block, all held until the decomposition ends (they are the ActivationStats).
astra-peft, decomposition, one layer at a time: the d_out x d_out statistic in fp32 (W C W^T for input-side
layers), its float64 copy (spectrum.select_eigenvectors solves in float64), and, where a degenerate direction is
selected (gate/up with d_out > d_in under eigen_selection="smallest", null_space="keep"), a full float64
divide-and-conquer eigendecomposition: d_out^2 eigenvectors + LAPACK syevd workspace (1 + 6n + 2n^2 doubles).
statistic="max_normalized" cannot share inputs: one d_out^2 output Gram per layer (shown for reference).

CorDA (peft.tuners.lora.corda.preprocess_corda): a d_in x d_in fp32 covariance on *every* target layer, all held
at once until the end; then per layer inv(C + damp), W C (d_out x d_in), a full SVD of it, and U (d_out x
min(d_out, d_in)), V (d_in x min) kept for every layer (PEFT moves U, V to CPU memory) until they are cropped to r.
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


def astra_plan(shape: Shape):
    """Accumulator dims per block under statistic_source='auto' (mirrors calibration._plan)."""
    p = {n: (o, i) for n, o, i in shape.projections()}
    groups = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    dims = []
    for g in groups:
        d_in = p[g[0]][1]
        out_cost = sum(p[n][0] ** 2 for n in g)
        dims += [d_in] if d_in ** 2 <= out_cost else [p[n][0] for n in g]
    return dims


def syevd_bytes(n):
    return (n * n + 1 + 6 * n + 2 * n * n) * F64  # eigenvectors + workspace


def gb(x):
    return f"{x / 1e9:,.1f}" if x >= 1e9 else f"{x / 1e9:.3f}"


def main():
    rows = []
    for s in SHAPES:
        proj = s.projections()
        model = s.params() * BF16
        plan = astra_plan(s)
        astra_stats = s.layers * sum(d * d for d in plan) * F32
        maxnorm_stats = s.layers * sum(o * o for _, o, _ in proj) * F32
        # decomposition transient of the largest layer (gate/up: d_out = intermediate, degenerate directions selected)
        d_big = max(o for _, o, _ in proj)
        d_in_big = max(i for _, o, i in proj if o == d_big)
        astra_decomp = (d_big ** 2 * F32 * 2        # W C Wᵀ in fp32 and its symmetrised copy
                        + d_big * d_in_big * F32 * 2  # W in fp32, W C
                        + d_big ** 2 * F64           # float64 copy handed to the solver
                        + syevd_bytes(d_big))        # full float64 eigenvectors + workspace
        astra_peak = astra_stats + astra_decomp
        corda_cov = s.layers * sum(i * i for _, _, i in proj) * F32
        corda_uv = s.layers * sum((o + i) * min(o, i) for _, o, i in proj) * F32
        # per-layer transient of the largest-d_in layer (down_proj): the diag(damp) matrix, C + damp, its inverse, the
    # identity and product of the inversion check (5 d_in^2), W C and W (d_out x d_in), SVD factors
        dn_out, dn_in = next((o, i) for n, o, i in proj if n == "down_proj")
        m = min(dn_out, dn_in)
        corda_decomp = (5 * dn_in ** 2 + 2 * dn_out * dn_in + (dn_out + dn_in) * m + m * m) * F32
        corda_peak_gpu = corda_cov + corda_decomp
        rows.append(dict(name=s.name, shape=f"h={s.hidden}, I={s.intermediate}, L={s.layers}, kv={s.kv_heads}",
                         params=s.params(), model=model, plan=plan, astra_stats=astra_stats,
                         maxnorm_stats=maxnorm_stats, astra_decomp=astra_decomp, astra_peak=astra_peak,
                         corda_cov=corda_cov, corda_uv=corda_uv, corda_decomp=corda_decomp,
                         corda_peak=corda_peak_gpu, d_big=d_big))
    print("| model | shape | params | weights bf16 GB | astra-peft Grams (4 per block) GB | astra decomposition, "
          "largest layer, GB | astra-peft peak above model GB | CorDA covariances GB | CorDA per-layer transient GB "
          "| CorDA peak above model (device) GB | CorDA U,V kept (host) GB | astra ÷ CorDA, device | astra ÷ CorDA, all on "
          "CPU (U,V in the same RAM) |")
    print("|" + "---|" * 13)
    for r in rows:
        print(f"| {r['name']} | {r['shape']} | {r['params'] / 1e9:.2f}B | {gb(r['model'])} | {gb(r['astra_stats'])} | "
              f"{gb(r['astra_decomp'])} (d_out={r['d_big']}) | {gb(r['astra_peak'])} | {gb(r['corda_cov'])} | "
              f"{gb(r['corda_decomp'])} | {gb(r['corda_peak'])} | {gb(r['corda_uv'])} | "
              f"{r['astra_peak'] / r['corda_peak']:.2f} | {r['astra_peak'] / (r['corda_peak'] + r['corda_uv']):.2f} |")
    print()
    print("| model | bf16 weights + astra-peft peak, GB | fits one 80 GB GPU? | bf16 weights + CorDA peak, GB | "
          "fits one 80 GB GPU? | astra-peft, stats_device='cpu': GPU GB (host GB) | 8 x 80 GB, layers split "
          "evenly: astra-peft / CorDA per GPU, GB |")
    print("|" + "---|" * 7)
    for r in rows:
        a = r["model"] + r["astra_peak"]
        c = r["model"] + r["corda_peak"]
        a_cpu = r["model"] + r["astra_decomp"]
        a8 = (r["model"] + r["astra_stats"]) / 8 + r["astra_decomp"]
        c8 = (r["model"] + r["corda_cov"]) / 8 + r["corda_decomp"]
        fits = lambda x: "yes" if x <= GPU else "no"  # noqa: E731
        print(f"| {r['name']} | {gb(a)} | {fits(a)} | {gb(c)} | {fits(c)} | {gb(a_cpu)}, {fits(a_cpu)} "
              f"({gb(r['astra_stats'])}) | {gb(a8)} ({fits(a8)}) / {gb(c8)} ({fits(c8)}) |")
    print()
    print("max_normalized statistic (no input sharing, one d_out^2 output Gram per layer):")
    for r in rows:
        print(f"  {r['name']}: {gb(r['maxnorm_stats'])} GB fp32")
    flops(TOKENS)


TOKENS = 256 * 512  # part 4's calibration set


def flops(tokens: int) -> None:
    """Multiply-add arithmetic (2 flops each) for a calibration of `tokens` tokens; NOT measured."""
    print()
    print(f"Compute arithmetic for {tokens:,} calibration tokens (2 flops per multiply-add; NOT measured):")
    print("| model | forward, bf16 | astra Grams, fp32 | ÷ forward | CorDA covariances, fp32 | ÷ forward | "
          "astra decomposition, fp64 (eigvalsh + subset, or full eigh where degenerate) | of which d_out > d_in layers |")
    print("|" + "---|" * 8)
    for s in SHAPES:
        proj = s.projections()
        fwd = 2 * tokens * s.layers * sum(o * i for _, o, i in proj)
        grams = 2 * tokens * s.layers * sum(d * d for d in astra_plan(s))
        corda = 2 * tokens * s.layers * sum(i * i for _, _, i in proj)
        dec, dec_wide = 0.0, 0.0
        for _, o, i in proj:
            tri = 4 / 3 * o ** 3  # Householder tridiagonalisation, paid by eigvalsh and again by the subset solver
            if o > i:  # covariance of rank <= d_in: smallest eigenvectors are degenerate -> full D&C eigh
                cost = tri + (tri + 2 * o ** 3)  # eigvalsh + full eigh (tridiagonal + back-transformation)
                dec_wide += s.layers * cost
            else:
                cost = 2 * tri + 2 * o * o * 16  # eigvalsh + subset (r=16 vectors back-transformed)
            dec += s.layers * (cost + 2 * o * i * i + 2 * o * o * i)  # + W C Wᵀ
        print(f"| {s.name} | {fwd:.2e} | {grams:.2e} | {grams / fwd:.2f} | {corda:.2e} | {corda / fwd:.2f} | "
              f"{dec:.2e} | {dec_wide / dec:.0%} |")


if __name__ == "__main__":
    main()
