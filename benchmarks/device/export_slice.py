"""Export a slice of the reference preset: release widths, fewer DiT blocks and vocoder layers.

    python -m benchmarks.device.export_slice --out DIR [--dit-depth 2] [--vocoder-layers 2] [--fp16]

Every block of the reference model has the same shapes, so per-block kernel costs measured on
the slice hold for the full model at a fraction of the export time (a profiling aid; the
committed results always use the full preset).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dit-depth", type=int, default=2)
    parser.add_argument("--vocoder-layers", type=int, default=2)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--generic", action="store_true",
                        help="the forms before the kernel-count work (A/B baseline): generic DiT graphs, "
                             "BiasNorm channel means as ReduceMean")
    parser.add_argument("--cuda-kernels", nargs="?", const="all", choices=["all", "vocoder"], default=None,
                        help="semvoc's CUDA ops, as semvoc-export --cuda-kernels (nvcc: the cuda-kernels extra)")
    args = parser.parse_args()

    import torch

    from semvoc.export.engine import ExportOptions, ModelSource, export_engine
    from semvoc.models.config import preset
    from semvoc.models.model import build_model

    cfg = preset("reference")
    cfg = dataclasses.replace(
        cfg, dit=dataclasses.replace(cfg.dit, depth=args.dit_depth),
        vocoder=dataclasses.replace(cfg.vocoder, num_layers=(args.vocoder_layers,) * len(cfg.vocoder.num_layers)))
    torch.set_grad_enabled(False)
    if args.generic:
        from semvoc.models.vocoder import Vocoder

        Vocoder.use_export_kernels = Vocoder.use_conv_spectral  # keep ReduceMean in BiasNorm
    model = build_model(cfg, seed=0)
    source = ModelSource(model, f"reference slice (DiT depth {args.dit_depth}, vocoder layers "
                                f"{args.vocoder_layers}; UNTRAINED)", untrained=True)
    options = ExportOptions(out=args.out, dtype="float16" if args.fp16 else "float32", batch_sizes=(1,),
                            components=("dit", "vocoder"), parity_steps=1, force=True, device=args.device,
                            dit_form="generic" if args.generic else "auto",
                            cuda_kernels=args.cuda_kernels is not None,
                            cuda_dit_kernels=True if args.cuda_kernels == "all" else False,
                            cuda_arch="native")  # this GPU only: an A/B needs no portable library
    export_engine(source, options)


if __name__ == "__main__":
    main()
