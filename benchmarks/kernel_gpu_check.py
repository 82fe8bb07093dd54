"""The fused chunk kernels (``model.kernel: triton``) on a CUDA GPU: equal to the naive path, and how fast.

    python benchmarks/kernel_gpu_check.py [--repeats 20]

CI checks the kernels in Triton's CPU interpreter (tests/test_model_kernel*.py); the interpreter accepts code the GPU
compiler may reject and does not round bf16 as the GPU does. This script runs the same cases
(tests/test_model_kernel_backward.py's ``CASES``: reads, erase, bound, plain eta, padded chunks and tiles, the anchor)
compiled for the GPU it finds, against the naive ``memory.chunk_update`` on the same GPU:

- fp32: forward (every field of ChunkResult) and every input's gradient within 1e-5 relative of the naive path
  (the tests' tolerance); the 64-tile case has no fp32 backward kernel (it recomputes in PyTorch) and is skipped;
- bf16: against the fp32 naive gradients, the kernel within 5e-2 and no further than the naive bf16 path plus 2e-2
  (the tests' tolerance);
- no chunk fell back to the naive path (every fallback warns once; the reasons are printed).

The main memory's sequence kernel (``kernels/sequence_update.py``, a forward's whole chunks in one launch) is checked
the same way on tests/test_model_kernel_sequence.py's ``CASES`` against ``titans.scan_chunks`` with the naive chunk
step (fp32: every output and gradient within 1e-5; bf16: within 5e-2 of the fp32 result and no further than the naive
bf16 scan plus 2e-2), and so is the projection memories' scan kernel (``kernels/projection_scan.py``) on
tests/test_model_kernel_projection_scan.py's ``CASES`` against ``titans.scan_projection_chunks`` in PyTorch: on
a GPU a program's threads run concurrently, so this is what checks the scan kernel's barriers. The
chunk-coefficient and projection-reads kernels (``kernels/coefficients.py``, ``kernels/projection_reads.py``) on
their tests' cases against a float64 reference (fp32: within 2e-5, or twice the naive fp32 path's error; bf16:
within 2e-2, or the naive bf16 path's error plus 1e-2).

Then it times forward + backward (bf16) at the shipped 760m/1.3b memory shapes: one chunk, kernel vs naive, of the
main memory (batch 1 x 24 heads, C = 16, d = h = 64, reads) and of the stacked projection memories (x 5, C = 64, no
reads); and the main memory's scan over a 4096-token forward (256 chunks): one naive chunk step each, one per-chunk
kernel step each, and the sequence kernel; and the projection memories over a 4096-token forward (64 chunks of
64) chunk by chunk in PyTorch, with the per-chunk kernels, and in the scan kernel. ``--parts`` picks what runs.
Exits 1 if a case fails, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hope_scale.model import memory
from hope_scale.model.kernels import chunk_update as kernel_module
from hope_scale.model.kernels.sequence_update import kernel_scan_chunks
from hope_scale.model.titans import scan_chunks
from tests import test_model_kernel_coefficients as coefficient_tests
from tests import test_model_kernel_projection as projection_tests
from tests import test_model_kernel_projection_scan as projection_scan_tests
from tests import test_model_kernel_sequence as sequence_tests
from tests.test_model_kernel import RESULT_FIELDS, rel_err
from tests.test_model_kernel_backward import CASES, chunk_leaves, update_with_grads

PARTS = ("sequence", "sequence-timing", "projection-scan", "projection-scan-timing", "projection", "chunk",
         "chunk-timing")
SHAPES = {  # name: chunk_leaves kwargs at the shipped models' memory shapes
    "main memory (1 x 24, C16 d64 h64, reads)": dict(batch=(1, 24), c=16, d=64, hid=64),
    "projection memories (1 x 24 x 5, C64 d64 h64)": dict(batch=(1, 24, 5), c=64, d=64, hid=64, reads=False,
                                                          shared_keys_axis=True),
}


def on_cuda(x: dict) -> dict:
    return {k: v.cuda() if v is not None else None for k, v in x.items()}


def run(update, x, rule, n_valid, dtype):
    """update_with_grads, and the fallback reasons it raised (empty: the kernel ran)."""
    kernel_module._warned.clear()
    r, g = update_with_grads(update, x, rule, n_valid, dtype=dtype)
    return r, g, set(kernel_module._warned)


def forward_err(r, ref) -> float:
    return max(rel_err(getattr(r, f), getattr(ref, f)) for f in RESULT_FIELDS if getattr(ref, f) is not None)


def grad_errs(g: dict, ref: dict) -> dict[str, float]:
    """Each input's gradient error against ``ref`` (not s1, s2: with beta = 0 their gradients are exactly zero)."""
    return {k: rel_err(g[k], v) for k, v in ref.items() if v is not None and k not in ("s1", "s2")}


def worst(errs: dict[str, float]) -> tuple[float, str]:
    name = max(errs, key=errs.get)
    return errs[name], name


def bf16_ok(kernel: dict[str, float], naive: dict[str, float], fell: set) -> bool:
    """The tests' bf16 criterion on gradient errors against the fp32 reference: the kernel within 5e-2, no further
    than the naive bf16 path plus 2e-2, and no fallback."""
    return max(kernel.values()) < 5e-2 and all(kernel[k] <= naive[k] + 2e-2 for k in naive) and not fell


def cuda_ms(run, repeats: int, warmup: int) -> float:
    """Milliseconds per call of ``run()`` on the GPU, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def check_cases() -> bool:
    print("| case | dtype | forward rel. err | worst gradient rel. err (input) | naive bf16 err | fallbacks | ok |")
    print("|---|---|---|---|---|---|---|")
    ok_all = True
    for name, (inputs, rule, n_valid) in CASES.items():
        x = on_cuda(chunk_leaves(**inputs))
        ref_r, ref_g, _ = run(memory.chunk_update, x, rule, n_valid, torch.float32)
        if "16-bit" not in name:
            r, g, fell = run(kernel_module.kernel_chunk_update, x, rule, n_valid, torch.float32)
            fe, (ge, at) = forward_err(r, ref_r), worst(grad_errs(g, ref_g))
            ok = fe < 1e-5 and ge < 1e-5 and not fell
            print(f"| {name} | fp32 | {fe:.1e} | {ge:.1e} ({at}) | | {'; '.join(fell) or 'none'} | "
                  f"{'yes' if ok else 'NO'} |", flush=True)
            ok_all &= ok
        r16, g16, fell = run(kernel_module.kernel_chunk_update, x, rule, n_valid, torch.bfloat16)
        _, n16, _ = run(memory.chunk_update, x, rule, n_valid, torch.bfloat16)
        kernel, naive = grad_errs(g16, ref_g), grad_errs(n16, ref_g)
        fe, (ge, at) = forward_err(r16, ref_r), worst(kernel)
        ok = bf16_ok(kernel, naive, fell)
        print(f"| {name} | bf16 | {fe:.1e} | {ge:.1e} ({at}) | {max(naive.values()):.1e} | "
              f"{'; '.join(fell) or 'none'} | {'yes' if ok else 'NO'} |", flush=True)
        ok_all &= ok
    return ok_all


def check_sequence_cases() -> bool:
    """The sequence kernel against the naive scan on the GPU (tests/test_model_kernel_sequence.py's cases)."""
    print("\n| sequence case | dtype | worst output rel. err | worst gradient rel. err (input) | naive bf16 err | "
          "fallbacks | ok |")
    print("|---|---|---|---|---|---|---|")
    ok_all = True
    for name, (overrides, self_modifying, kw) in sequence_tests.CASES.items():
        x, n_valid = sequence_tests.scan_inputs(**kw)
        x = on_cuda(x)
        layer = sequence_tests.make_layer(overrides, self_modifying).cuda()
        results = {}
        for label, fn, dtype in (("ref", scan_chunks, torch.float32), ("fp32", kernel_scan_chunks, torch.float32),
                                 ("naive bf16", scan_chunks, torch.bfloat16), ("bf16", kernel_scan_chunks,
                                                                           torch.bfloat16)):
            kernel_module._warned.clear()
            out, grads = sequence_tests.scan(layer, fn, x, n_valid, dtype=dtype)
            results[label] = (out, grads, set(kernel_module._warned))  # (scan casts the layer: fp32 runs first)
        ref_out, ref_grads, _ = results["ref"]
        errs = {}
        for label in ("fp32", "naive bf16", "bf16"):
            out, grads, _ = results[label]
            errs[label] = ({k: rel_err(out[k], v) for k, v in ref_out.items() if v is not None and v.abs().max() > 0},
                           {k: rel_err(grads[k], v) for k, v in ref_grads.items() if v is not None and v.any()})
        for label in ("fp32", "bf16"):
            (fe, _), (ge, at) = worst(errs[label][0]), worst(errs[label][1])
            fell = results[label][2]
            if label == "fp32":
                ok, naive = fe < 1e-5 and ge < 1e-5 and not fell, ""
            else:
                naive_g = errs["naive bf16"][1]
                ok = bf16_ok(errs[label][1], naive_g, fell)
                naive = f"{max(naive_g.values()):.1e}"
            print(f"| {name} | {label} | {fe:.1e} | {ge:.1e} ({at}) | {naive} | {'; '.join(fell) or 'none'} | "
                  f"{'yes' if ok else 'NO'} |", flush=True)
            ok_all &= ok
    return ok_all


def check_projection_scan_cases() -> bool:
    """The projection scan kernel against the chunk-by-chunk PyTorch scan on the GPU (its tests' cases): fp32
    within 2e-5; bf16: its worst error against the fp32 result (over outputs and gradients) no larger than the
    PyTorch bf16 scan's (x 1.05, plus 8e-3). Per value the two bf16 paths trade places: with raw v and no erase
    both are 5-60% from fp32, the inputs' rounding to bf16 amplified over the chunks. On a GPU the kernel's
    threads run concurrently, so this is what checks its barriers."""
    from hope_scale.model.kernels.projection_scan import kernel_scan_projection_chunks
    from hope_scale.model.titans import scan_projection_chunks

    print("\n| projection scan case | dtype | worst output rel. err | worst gradient rel. err (what) | "
          "PyTorch bf16 err | fallbacks | ok |")
    print("|---|---|---|---|---|---|---|")
    ok_all = True
    for name, (overrides, kw) in projection_scan_tests.CASES.items():
        layer = projection_scan_tests.make_layer(overrides).cuda()
        results = {}
        for label, fn, dtype in (("ref", scan_projection_chunks, torch.float32),
                                 ("fp32", kernel_scan_projection_chunks, torch.float32),
                                 ("naive bf16", scan_projection_chunks, torch.bfloat16),
                                 ("bf16", kernel_scan_projection_chunks, torch.bfloat16)):
            kernel_module._warned.clear()
            out, grads = projection_scan_tests.scan(layer, fn, dtype=dtype, **kw)
            results[label] = (out, grads, set(kernel_module._warned))  # (scan casts the layer: fp32 runs first)
        ref_out, ref_grads, _ = results["ref"]
        errs = {}
        for label in ("fp32", "naive bf16", "bf16"):
            out, grads, _ = results[label]
            errs[label] = {f"output {k}": rel_err(out[k], v.expand_as(out[k])) for k, v in ref_out.items()
                           if v.abs().max() > 0}
            errs[label].update({k: rel_err(grads[k], v) for k, v in ref_grads.items() if v.abs().max() > 0})
        for label in ("fp32", "bf16"):
            err, at = worst(errs[label])
            fell = results[label][2]
            if label == "fp32":
                ok, naive = err < 2e-5 and not fell, ""
            else:
                naive_errs = errs["naive bf16"]
                ok = not fell and err <= 1.05 * max(naive_errs.values()) + 8e-3
                naive = f"{max(naive_errs.values()):.1e}"
            out_err = max(e for k, e in errs[label].items() if k.startswith("output"))
            print(f"| {name} | {label} | {out_err:.1e} | {err:.1e} ({at}) | {naive} | {'; '.join(fell) or 'none'} | "
                  f"{'yes' if ok else 'NO'} |", flush=True)
            ok_all &= ok
    return ok_all


def time_projection_scan(repeats: int, n_chunks: int = 64) -> None:
    """Forward + backward of the projection memories over ``n_chunks`` chunks of 64 at the shipped shape (bf16,
    1 x 24 heads, d = h = 64, five memories): PyTorch chunk by chunk, the per-chunk kernels, the scan kernel."""
    from hope_scale.model.kernels import apply_kernel
    from hope_scale.model.kernels.projection_scan import kernel_scan_projection_chunks
    from hope_scale.model.titans import scan_projection_chunks

    naive = projection_scan_tests.make_layer(dict(d_model=1536, n_heads=24, chunk_size_projection=64)).cuda()
    kernels = apply_kernel(projection_scan_tests.make_layer(dict(d_model=1536, n_heads=24,
                                                                 chunk_size_projection=64)).cuda(), "triton")
    print(f"\n| projection memories, 1 x 24 heads x 5, {n_chunks} chunks of 64, d = h = 64, bf16 | ms (fwd+bwd) | "
          "PyTorch / this |")
    print("|---|---|---|")
    ms = {}
    for label, layer, fn in (("PyTorch, chunk by chunk", naive, scan_projection_chunks),
                             ("per-chunk kernels, chunk by chunk", kernels, scan_projection_chunks),
                             ("scan kernel", kernels, kernel_scan_projection_chunks)):
        ms[label] = cuda_ms(lambda: projection_scan_tests.scan(layer, fn, n_chunks=n_chunks, dtype=torch.bfloat16,
                                                               batch=1), repeats, 2)
        print(f"| {label} | {ms[label]:.1f} | {ms['PyTorch, chunk by chunk'] / ms[label]:.1f} |", flush=True)


def reference_errs(got, want) -> dict[str, float]:
    """Relative errors of every output and gradient of ``got`` against ``want`` ((outputs, gradients) as the
    coefficient and projection-reads tests' ``run`` return them)."""
    (outs, grads), (ref_outs, ref_grads) = got, want
    items = ref_outs.items() if isinstance(ref_outs, dict) else enumerate(ref_outs)
    errs = {f"output {k}": rel_err(outs[k], v) for k, v in items if v is not None and v.abs().max() > 0}
    errs.update({k: rel_err(grads[k], v) for k, v in ref_grads.items() if v is not None and v.abs().max() > 0})
    return errs


def check_projection_cases() -> bool:
    """The coefficient and projection-reads kernels against float64 on the GPU (their tests' cases)."""
    from hope_scale.model.kernels.coefficients import kernel_chunk_coefficients
    from hope_scale.model.kernels.projection_reads import kernel_projection_reads
    from hope_scale.model.titans import projection_reads

    print("\n| kernel case | dtype | worst rel. err vs float64 (what) | naive err | fallbacks | ok |")
    print("|---|---|---|---|---|---|")
    runs = []  # (name, run(fn, dtype) -> (outputs, gradients), kernel fn, naive fn)
    for name, (c, d, erase, reads) in coefficient_tests.CASES.items():
        x = on_cuda(coefficient_tests.inputs(c, d))
        runs.append((f"coefficients: {name}", lambda fn, dtype, x=x, e=erase, r=reads:
                     coefficient_tests.run(fn, x, e, r, dtype), kernel_chunk_coefficients, memory.chunk_coefficients))
    for name, (overrides, frozen) in projection_tests.CASES.items():
        layer = projection_tests.make_layer(overrides, frozen)
        x = on_cuda(projection_tests.inputs(layer))
        layer.cuda()
        runs.append((f"projection reads: {name}", lambda fn, dtype, x=x, layer=layer:
                     projection_tests.run(layer, fn, x, dtype), kernel_projection_reads, projection_reads))
    ok_all = True
    for name, run_case, kernel, naive in runs:
        ref = run_case(naive, torch.float64)
        for dtype, tol, slack in ((torch.float32, 2e-5, None), (torch.bfloat16, 2e-2, 1e-2)):
            kernel_module._warned.clear()
            errs = reference_errs(run_case(kernel, dtype), ref)
            fell = set(kernel_module._warned)
            naive_errs = reference_errs(run_case(naive, dtype), ref)
            limit = {k: max(tol, 2 * naive_errs[k] if slack is None else naive_errs[k] + slack) for k in errs}
            ok = all(errs[k] <= limit[k] for k in errs) and not fell
            err, at = worst(errs)
            print(f"| {name} | {str(dtype).split('.')[-1]} | {err:.1e} ({at}) | {max(naive_errs.values()):.1e} | "
                  f"{'; '.join(fell) or 'none'} | {'yes' if ok else 'NO'} |", flush=True)
            ok_all &= ok
    return ok_all


def time_scan(repeats: int, n_chunks: int = 256) -> None:
    """Forward + backward of the main memory's scan over ``n_chunks`` chunks at the shipped shape (bf16)."""
    from hope_scale.model.kernels.chunk_update import kernel_chunk_step
    from hope_scale.model.memory import chunk_step

    layer = sequence_tests.make_layer(dict(d_model=1536, n_heads=24), True).cuda()
    x, n_valid = sequence_tests.scan_inputs(n_chunks=n_chunks, batch=(1, 24), c=16, d=64, hid=64)
    x = on_cuda(x)
    print(f"\n| main memory scan, 1 x 24 heads, {n_chunks} chunks of 16, d = h = 64, bf16 | ms (fwd+bwd) | "
          "naive / this |")
    print("|---|---|---|")
    ms = {}
    for label, step, fn in (("naive chunk steps", chunk_step, scan_chunks),
                            ("per-chunk kernel steps", kernel_chunk_step, scan_chunks),
                            ("sequence kernel", kernel_chunk_step, kernel_scan_chunks)):
        layer.chunk_step = step
        ms[label] = cuda_ms(lambda: sequence_tests.scan(layer, fn, x, n_valid, dtype=torch.bfloat16), repeats, 2)
        print(f"| {label} | {ms[label]:.1f} | {ms['naive chunk steps'] / ms[label]:.1f} |", flush=True)


def time_shapes(repeats: int) -> None:
    rule = CASES["reads, default rule (bound 1)"][1]
    print("\n| memory shape | naive ms (fwd+bwd) | kernel ms (fwd+bwd) | naive / kernel |")
    print("|---|---|---|---|")
    for name, kwargs in SHAPES.items():
        x = on_cuda(chunk_leaves(**kwargs))
        ms = {}
        for label, update in (("naive", memory.chunk_update), ("kernel", kernel_module.kernel_chunk_update)):
            ms[label] = cuda_ms(lambda: update_with_grads(update, x, rule, None, dtype=torch.bfloat16), repeats, 3)
        print(f"| {name} | {ms['naive']:.2f} | {ms['kernel']:.2f} | {ms['naive'] / ms['kernel']:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed forward + backward passes per shape")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to run, in this order")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_gpu_check.py: no CUDA device is visible; tests/test_model_kernel*.py check the kernels in "
              "Triton's CPU interpreter.", file=sys.stderr)
        return 2
    print(f"## {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    if "sequence" in args.parts:
        ok &= check_sequence_cases()
    if "sequence-timing" in args.parts:
        time_scan(max(1, args.repeats // 4))
    if "projection-scan" in args.parts:
        ok &= check_projection_scan_cases()
    if "projection-scan-timing" in args.parts:
        time_projection_scan(max(1, args.repeats // 4))
    if "projection" in args.parts:
        ok &= check_projection_cases()
    if "chunk" in args.parts:
        ok &= check_cases()
    if "chunk-timing" in args.parts:
        time_shapes(args.repeats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
