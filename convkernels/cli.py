"""Command line: ``python -m convkernels info`` and ``python -m convkernels verify``."""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> str:
    import torch

    import convkernels
    from convkernels import backend
    from convkernels._extension import HAS_C, _IMPORT_ERROR, cuda_arch_list, has_cuda_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else (
        platform.processor() or platform.machine())
    compiled = []
    if HAS_C:
        compiled.append("cpu")
        if has_cuda_kernels():
            compiled.append(f"cuda (TORCH_CUDA_ARCH_LIST {';'.join(cuda_arch_list())})")
    usable = [n for n in backend.BACKENDS[1:] if backend.available(n, device.type)]
    lines = [
        f"convkernels {convkernels.__version__}",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton      {triton_version}",
        f"python      {platform.python_version()}",
        "compiled    " + (", ".join(compiled) if compiled else f"none (_C not loaded: {_IMPORT_ERROR})"),
        "cpu threads " + (f"{torch.ops.convkernels_C.parallel_threads()} per kernel loop "
                          f"(torch.get_num_threads() = {torch.get_num_threads()})"
                          if HAS_C else "-"),
        "cpu conv    " + (f"direct NHWC kernel: {torch.ops.convkernels_C.conv_isa()}"
                          if HAS_C else "-"),
        f"device      {device.type}: {device_name}",
        f"backends    {', '.join(usable)} usable on {device.type}",
        f"active      {backend.get_backend()} -> {backend.resolve(device)} on {device.type}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled backends, device, active backend")
    ver = sub.add_parser("verify", help="each builder against torchvision's on the same weights")
    ver.add_argument("--models", default="all", help="all, or NAME,NAME,...")
    ver.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ver.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ver.add_argument("--modes", default="eval,train", help="eval, train or both")
    ver.add_argument("--size", type=int, default=64,
                     help="input size (raised to a model's minimum)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "verify":
        return verify(args)
    return 0


def verify(args) -> int:
    from convkernels import verify as v

    known = v.model_names()
    models = known if args.models == "all" else args.models.split(",")
    unknown = [m for m in models if m not in known]
    if unknown:
        print(f"verify: unknown models {', '.join(unknown)} (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    modes = tuple(m for m in args.modes.split(",") if m)
    if not set(modes) <= {"eval", "train"}:
        print(f"verify: --modes takes eval and train, got {args.modes}", file=sys.stderr)
        return 2
    rows, status = v.run(models, args.device, args.dtype, modes, args.size)
    print(v.table(rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
