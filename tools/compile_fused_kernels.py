#!/usr/bin/env python
"""Compile the fused decode layer's Triton kernels for a GPU architecture on a machine without a GPU.

Triton's compiler (front end, MLIR passes, LLVM, and the ptxas it ships) runs on any machine, so this catches
compile errors and shows what the kernels became without a GPU lease: for each kernel at the released model's
shapes (the launch configurations of TUNED_CONFIGS in modeling_mlmamba/generation_mlmamba.py, both SSM state dtypes
where it matters) it prints the shared memory it needs, the registers per thread ptxas allocates (with the shared
memory, what bounds how many of its programs share an SM), and a count of its memory and matrix instructions in the PTX
(e.g. whether the weight tiles are read with 16-byte vector loads `ld.global...v4`, through `cp.async`, and whether
the products use Hopper's `wgmma`). Integer arguments and pointers are specialised as Triton specialises them at
launch for these shapes (divisible by 16; unit strides as constants).

Needs triton (and numpy < 2 for triton 3.6's interpreter helpers on some machines); no CUDA.

  python tools/compile_fused_kernels.py [--arch 90] [--ptx-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the released Mamba-2 2.7B: arguments Triton sees divisible by 16 at launch (sizes, offsets, strides)
DIVISIBLE = {"N", "K", "stride_wn", "conv_start", "conv_dim", "n_parts", "parts_per_group", "group_size",
             "stride_proj_b", "x_start", "b_start", "c_start", "dt_start", "stride_y_b", "head_dim", "state_size",
             "stride_s_h", "stride_s_p", "stride_s_b", "stride_part_b", "stride_cs_b", "stride_px_b", "stride_px_k",
             "stride_pdt_b", "stride_pdt_k", "stride_pb_b", "stride_pb_k"}
# strides equal to 1 at launch, which Triton turns into constants
ONE = {"stride_s_n", "stride_cs_k", "stride_cw_k"}
PATTERN = re.compile(r"\b(ld\.global[.:\w]*|st\.global[.:\w]*|cp\.async\.[a-z]+[.:\w]*|wgmma\.mma_async[.\w]*|"
                     r"mma\.sync[.\w]*|ldmatrix[.\w]*|griddepcontrol\.\w+)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (90: Hopper)")
    p.add_argument("--ptx-dir", type=Path, default=None, help="also write each kernel's PTX here")
    return p.parse_args()


def signature(fn, pointer_dtypes: dict, constants: dict) -> tuple[dict, dict]:
    """Triton's signature and specialisation attributes for `fn` (a JITFunction); fills in default constexprs."""
    params = inspect.signature(fn.fn).parameters
    constants.update({name: 1 for name in params if name in ONE})
    for name, param in params.items():  # defaults as constants, but for pointers a job passes
        if param.default is not inspect.Parameter.empty and name not in pointer_dtypes:
            constants.setdefault(name, param.default)
    sig, attrs = {}, {}
    for index, name in enumerate(params):
        if name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_dtypes.get(name, "bf16")
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if name not in constants and (name.endswith("_ptr") or name in DIVISIBLE):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


def registers(ptx: str, arch: int) -> str:
    """Registers per thread that Triton's ptxas allocates for `ptx` (what limits how many programs share an SM)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        run = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(source),
                              "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    found = re.search(r"Used (\d+) registers", run.stdout + run.stderr)
    return found.group(1) if found else "?"


def jobs() -> list[tuple[str, str, dict, dict, dict]]:
    """(label, kernel name, pointer dtypes, constexprs, launch options) at the released shapes."""
    from modeling_mlmamba.generation_mlmamba import (DEFER_FOLD_COLS, DEFER_LATE_ROWS, DEFERRED_STEPS,
                                                    DEFERRED_STEPS_ROWS, SSM_WARPS, SSM_WARPS_ROWS, TUNED_CONFIGS)

    def tuned(product: str, kind: str, n: int, k: int) -> tuple[dict, dict]:
        config = dict(TUNED_CONFIGS.get(((9, 0), product, kind, n, k, "bfloat16"), {}))
        options = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
        return config, options

    conv = dict(HAS_BIAS=False, HAS_CONV_BIAS=True, SILU=True, D_CONV=4, BLOCK_C=4, USE_PDL=True, LAUNCH_EARLY=True)
    gated = dict(HAS_BIAS=False, BLOCK_G=1, BLOCK_PARTS=512, USE_PDL=True, LAUNCH_EARLY=True)
    residual = dict(res_ptr="fp32", res_out_ptr="fp32")  # residual_in_fp32
    parts = dict(part_ptr="fp32", split_ptr="fp32", count_ptr="i32")
    out = []
    meta, options = tuned("in_proj", "matvec", 10576, 2560)
    out.append(("in_proj, 1 sequence", "norm_in_proj_conv", residual, dict(conv, **meta), options))
    for state in ("fp32", "bf16"):
        out.append((f"SSM update, {state} state", "ssm_step_gate",
                    dict(state_ptr=state, A_log_ptr="fp32", D_ptr="fp32", dt_bias_ptr="fp32", part_ptr="fp32"),
                    dict(HAS_D=True, HAS_DT_BIAS=True, BLOCK_P=16, BLOCK_S=128, USE_PDL=True, LAUNCH_EARLY=True),
                    dict(num_warps=SSM_WARPS)))
    # the state written back every K steps (DeferredUpdates), as the fused layer launches it: 1 sequence K = 16 on
    # the whole state tile; 2-16 sequences K = 8 in 32-column slices with the buffered steps read after the wait
    deferred = (("1 sequence", DEFERRED_STEPS, 0, 0, SSM_WARPS),
                ("2-16 sequences", DEFERRED_STEPS_ROWS, DEFER_FOLD_COLS, DEFER_LATE_ROWS, SSM_WARPS_ROWS))
    for state in ("fp32", "bf16"):
        for rows, steps, fold_cols, b_late, warps in deferred:
            out.append((f"SSM update, {state} state, deferred writes, {rows}", "ssm_step_gate",
                        dict(state_ptr=state, A_log_ptr="fp32", D_ptr="fp32", dt_bias_ptr="fp32", part_ptr="fp32",
                             pend_x_ptr="bf16", pend_dt_ptr="fp32", pend_b_ptr="bf16", count_ptr="i32"),
                        dict(HAS_D=True, HAS_DT_BIAS=True, BLOCK_P=16, BLOCK_S=128, USE_PDL=True,
                             LAUNCH_EARLY=True, DEFER=steps, FOLD_COLS=fold_cols, B_LATE=b_late),
                        dict(num_warps=warps)))
    meta, options = tuned("out_proj", "matvec", 2560, 5120)
    out.append(("out_proj, 1 sequence", "gated_norm_out_proj", parts, dict(gated, **meta), options))
    meta, options = tuned("in_proj", "rows", 10576, 2560)
    packed = dict(conv_state_ptr="i64", conv_w_ptr="i64")  # the conv update on 64-bit words (bf16 states)
    out.append(("in_proj, 2-16 sequences", "norm_in_proj_conv_rows", dict(residual, **packed),
                dict(conv, IEEE=False, BLOCK_M=8, PACKED_CONV=True, **meta), options))
    out.append(("in_proj, 2-16 sequences, chained input", "norm_in_proj_conv_rows",
                dict(res_ptr="bf16", prev_ptr="fp32", res_out_ptr="fp32", **packed),
                dict(conv, IEEE=False, BLOCK_M=8, NORMED=True, BLOCK_SQUARES=64, PACKED_CONV=True, **meta),
                options))
    meta, options = tuned("out_proj", "rows", 2560, 5120)
    out.append(("out_proj, 2-16 sequences", "gated_norm_out_proj_rows", dict(parts, **residual),
                dict(gated, IEEE=False, BLOCK_M=16, **meta), options))
    out.append(("out_proj, 2-16 sequences, forming the next input", "gated_norm_out_proj_rows",
                dict(parts, **residual, squares_ptr="fp32"), dict(gated, IEEE=False, BLOCK_M=16, NEXT=True, **meta),
                options))
    return out


def main():
    args = parse_args()
    import triton
    from triton.backends.compiler import GPUTarget

    from modeling_mlmamba.generation_mlmamba import _fused_kernels

    _, kernels = _fused_kernels(autotune=False)
    by_name = {kernel.fn.__name__: kernel for kernel in kernels}
    target = GPUTarget("cuda", args.arch, 32)
    if args.ptx_dir is not None:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for label, name, pointers, constants, options in jobs():
        fn = by_name[name]
        sig, attrs = signature(fn, pointers, constants)
        source = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs)
        shown = {k: v for k, v in constants.items()
                 if k.startswith(("BLOCK_N", "BLOCK_K", "SPLIT", "PRE", "NORMED", "NEXT", "DEFER", "FOLD", "B_LATE"))}
        try:
            compiled = triton.compile(source, target=target, options=options)
        except Exception as error:  # report every kernel, then fail
            failed += 1
            print(f"FAILED {label} ({name}, {shown}, {options}): {type(error).__name__}: {error}")
            continue
        ptx = compiled.asm["ptx"]
        counts = collections.Counter(PATTERN.findall(ptx))
        print(f"{label}: {name} {shown} {options}, shared memory {compiled.metadata.shared} B, "
              f"{registers(ptx, args.arch)} registers per thread")
        for instruction, count in counts.most_common():
            print(f"    {count:4d}  {instruction}")
        if args.ptx_dir is not None:
            suffix = "".join(f"_{k.lower()}" for k in ("NORMED", "NEXT", "DEFER", "FOLD_COLS", "B_LATE")
                             if constants.get(k))
            suffix += "_" + pointers["state_ptr"] if "state_ptr" in pointers else ""
            (args.ptx_dir / f"{name}{suffix}.ptx").write_text(ptx)
    if failed:
        sys.exit(f"{failed} kernel(s) did not compile")


if __name__ == "__main__":
    main()
