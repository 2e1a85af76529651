"""Compiles every Triton kernel of mmvae_fast.kernels ahead of time for NVIDIA GPUs (sm_80, sm_90)
without a GPU: triton.compile on an explicit GPUTarget runs the real code generator, the MLIR
passes and ptxas, i.e. everything the interpreter skips (constexpr-only globals, static control
flow, integer specialisation of arguments equal to 1, every autotune config, register allocation).

    python scripts/check_triton_compile.py            # every config, sm_80 and sm_90
    python scripts/check_triton_compile.py --quick    # one config per variant, sm_90

Exits non-zero if any variant fails to compile. Must run without TRITON_INTERPRET=1.
"""
import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def variants(W, X, Lk, E, quick):
    """(name, autotuner, {arg: type or constexpr value}) for each kernel variant worth compiling."""
    P = lambda t: "*" + t  # noqa: E731
    out = []
    for dt, acc in [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")]:
        out.append((f"iw_fwd {dt}", W._iw_fwd_kernel, dict(x_ptr=P(dt), w_ptr=P(acc), w2_ptr=P(acc), lse_ptr=P(acc), lo_ptr=P(acc), R="i32", N="i32")))
        out.append((f"iw_bwd {dt}", W._iw_bwd_kernel, dict(
            x_ptr=P(dt), lse_ptr=P(acc), lo_ptr=P(acc), gb_ptr=P(acc), gw_ptr=P(acc), gw2_ptr=P(acc), gx_ptr=P(dt), R="i32", N="i32",
            HAS_GB=True, HAS_GW=dt != "fp16", HAS_GW2=dt != "bf16")))
    out.append(("iw_fwd N=1", W._iw_fwd_kernel, dict(x_ptr="*fp32", w_ptr="*fp32", w2_ptr="*fp32", lse_ptr="*fp32", lo_ptr="*fp32", R="i32", N=1)))
    sizes = dict(M="i32", K="i32", B="i32", L="i32")
    ones = dict(M=1, K=1, B=1, L="i32")  # arguments equal to 1 are specialised as constants
    for dt, acc in [("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")]:
        for normal, mask, write_a, stats, dims in [(True, True, True, False, sizes), (False, False, False, False, sizes),
                                                   (True, False, True, False, ones), (False, True, False, True, sizes)]:
            out.append((f"mixture_fwd {dt} normal={normal} mask={mask} a={write_a} stats={stats} ones={dims is ones}",
                        X.mixture_fwd, dict(
                z_ptr=P(acc if dt == "fp64" else dt), loc_ptr=P(dt), scale_ptr=P(dt), mask_ptr="*i8", lq_ptr=P(acc),
                a_ptr=P(acc), sum_ptr=P(acc), **dims, NORMAL=normal, HAS_MASK=mask, WRITE_A=write_a, STATS=stats,
                K_CHUNK=4, BLOCK_L=64)))
        out.append((f"ratios_fwd {dt}", X.ratios_fwd, dict(
            z_ptr=P(dt), loc_ptr=P(dt), scale_ptr=P(dt), ratio_ptr=P(acc), **sizes, NORMAL=False, K_CHUNK=4, BLOCK_L=32)))
        for ratios, mask, g, ga, dims in [(False, True, True, True, sizes), (False, False, False, True, ones), (True, False, True, False, sizes)]:
            out.append((f"pairwise_bwd {dt} ratios={ratios} mask={mask} g={g} ga={ga} ones={dims is ones}", X.pairwise_bwd, dict(
                z_ptr=P(dt), loc_ptr=P(dt), scale_ptr=P(dt), mask_ptr="*i8", stat_ptr=P(acc), sum_ptr=P(acc), g_ptr=P(acc),
                ga_ptr=P(acc),
                dz_ptr=P(acc), ploc_ptr=P(acc), pscale_ptr=P(acc), **dims,
                RATIOS=ratios, NORMAL=not ratios, HAS_MASK=mask, HAS_G=g, HAS_GA=ga, K_CHUNK=8, BLOCK_L=16)))
        for fam in (0, 1, 2):
            out.append((f"dense_fwd {dt} fam={fam}", Lk._dense_fwd_kernel, dict(
                x_ptr=P(acc), p_ptr=P(dt), sc_ptr=P(acc), out_ptr=P(acc), R="i32", B="i32", E="i32",
                ss_s="i32", ss_b="i32", ss_e="i32", FAM=fam)))
            out.append((f"dense_bwd {dt} fam={fam}", Lk._dense_bwd_kernel, dict(
                x_ptr=P(acc), p_ptr=P(dt), sc_ptr=P(acc), g_ptr=P(acc), dp_ptr=P(dt), dsc_ptr=P(acc), R="i32", B="i32",
                E="i32", ss_s=0, ss_b=0, ss_e=1, FAM=fam, SCALE_GRAD=fam < 2)))
        out.append((f"cat_fwd {dt}", Lk._cat_fwd_kernel, dict(
            x_ptr="*i64", p_ptr=P(dt), out_ptr=P(acc), lse_ptr=P(acc), R="i32", B="i32", E="i32", V="i32")))
        out.append((f"cat_bwd {dt}", Lk._cat_bwd_kernel, dict(
            x_ptr="*i64", p_ptr=P(dt), lse_ptr=P(acc), g_ptr=P(acc), dp_ptr=P(dt), RE="i32", B="i32", E="i32", V="i32")))
    for dt, acc in [("fp32", "fp32"), ("fp64", "fp64")]:  # moe_estimator (its entry casts half to float32)
        for normal, mask, est, dims in [(True, True, 2, sizes), (False, False, 0, sizes), (False, True, 3, ones)]:
            tag = f"{dt} normal={normal} mask={mask} est={est} ones={dims is ones}"
            out.append((f"moe_fwd_samples {tag}", E.fwd_samples, dict(
                z_ptr=P(dt), loc_ptr=P(dt), scale_ptr=P(dt), ploc_ptr=P(dt), pscale_ptr=P(dt), lpx_ptr=P(acc),
                mask_ptr="*i8", lw_ptr=P(acc), lq_ptr=P(acc), pi_ptr=P(acc), **dims, NORMAL=normal, PNORMAL=not normal,
                HAS_MASK=mask, WRITE_PI=est in (2, 3), K_CHUNK=4, BLOCK_L=32)))
            out.append((f"moe_bwd {tag}", E.bwd, dict(
                g_ptr=P(acc), z_ptr=P(dt), loc_ptr=P(dt), scale_ptr=P(dt), ploc_ptr=P(dt), pscale_ptr=P(dt),
                mask_ptr="*i8", lw_ptr=P(acc), nrm_ptr=P(acc), stats_ptr=P(acc), gz_ptr=P(acc), glpx_ptr=P(acc),
                gl_ptr=P(acc), gs_ptr=P(acc), gpl_ptr=P(acc), gps_ptr=P(acc), **dims, Kc="i32", K_TILE="i32",
                NORMAL=normal, PNORMAL=normal, HAS_MASK=mask, LOOSER=est != 3, EST=est, ALIAS=est in (2, 3),
                SCORE=est in (0, 2, 3), BLOCK_L=32)))
        for looser, est, mask, lse in [(True, 2, True, False), (False, 1, False, True), (True, 0, False, False)]:
            out.append((f"moe_fwd_stats {dt} looser={looser} est={est} mask={mask} lse={lse}", E.fwd_stats, dict(
                lw_ptr=P(acc), pi_ptr=P(acc), mask_ptr="*i8", lse_ptr=P(acc), bound_ptr=P(acc), zw_ptr=P(acc),
                stats_ptr=P(acc), M="i32", K="i32", B="i32", Kc="i32", LOOSER=looser, EST=est, HAS_MASK=mask, HAS_LSE=lse,
                WRITE_ZW=est in (1, 2, 3))))
    out.append(("cat_fwd E=1", Lk._cat_fwd_kernel, dict(
        x_ptr="*i64", p_ptr="*fp32", out_ptr="*fp32", lse_ptr="*fp32", R="i32", B="i32", E=1, V="i32")))
    if quick:
        out = [v for v in out if " fp32" in v[0] or "ones=True" in v[0] or "=1" in v[0]]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one config per variant, sm_90 only")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("check_triton_compile: unset TRITON_INTERPRET (the interpreter has nothing to compile)")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    warnings.simplefilter("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmvae_fast.kernels import _mixture_rows as X
    from mmvae_fast.kernels import importance_weights as W
    from mmvae_fast.kernels import likelihood_sum as Lk
    from mmvae_fast.kernels import moe_estimator as E
    archs = [90] if args.quick else [80, 90]
    failed, n, t0 = [], 0, time.time()
    for name, tuner, spec in variants(W, X, Lk, E, args.quick):
        fn = tuner.fn
        configs = tuner.configs[:1] if args.quick else tuner.configs
        for cfg in configs:
            kw = {**spec, **cfg.kwargs}
            if "BLOCK_L" in kw and "BLOCK_B" in kw and kw["BLOCK_B"] * kw["BLOCK_L"] > X._TILE:
                continue  # pruned at run time, never compiled
            sig = {a: ("constexpr" if not isinstance(kw[a], str) else kw[a]) for a in fn.arg_names}
            consts = {a: v for a, v in kw.items() if not isinstance(v, str)}
            for arch in archs:
                n += 1
                try:
                    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                   target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps})
                except Exception as e:  # report every failure, not just the first
                    failed.append(f"{name} {cfg.kwargs} sm_{arch}: {type(e).__name__}: {str(e).strip()[:400]}")
    print(f"check_triton_compile: {n} compilations (triton {triton.__version__}, sm_{'/sm_'.join(map(str, archs))}) in {time.time() - t0:.0f} s")
    for f in failed:
        print("  FAIL", f)
    print("check_triton_compile:", "FAILED" if failed else "every kernel compiles")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
