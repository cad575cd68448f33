"""Make plugins/datasets/cifar10_sample.tar, the CIFAR-10 sample shipped with kdreg.

A stratified random sample (fixed seed) of the CIFAR-10 JPEG archive, kept as the original JPEG
files in an uncompressed tar with the layout train/<class>/NNNN.jpg, test/<class>/NNNN.jpg.
Members are written in sorted order with fixed metadata, so the same input gives the same bytes.

    python tools/make_cifar10_sample.py --source PATH/TO/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUT = ROOT / "plugins" / "datasets" / "cifar10_sample.tar"
MAX_BYTES = 8_000_000
MTIME = 1_700_000_000  # fixed, so that the tar (and the decode cache key) is reproducible


def sample_members(source: Path, per_split: dict[str, int], seed: int) -> dict[str, bytes]:
    """``{member name: JPEG bytes}`` of a per-class random sample of each split."""
    with tarfile.open(source, "r:*") as tar:
        groups: dict[tuple[str, str], list[tarfile.TarInfo]] = defaultdict(list)
        for member in tar.getmembers():
            parts = member.name.strip("/").split("/")
            if member.isfile() and len(parts) == 3 and parts[0] in per_split:
                groups[(parts[0], parts[1])].append(member)
        rng = random.Random(seed)
        chosen: dict[str, bytes] = {}
        for (split, _cls), members in sorted(groups.items()):
            members.sort(key=lambda m: m.name)
            take = per_split[split]
            if take > len(members):
                raise SystemExit(f"{split}/{_cls} has only {len(members)} images, need {take}")
            for member in sorted(rng.sample(members, take), key=lambda m: m.name):
                handle = tar.extractfile(member)
                assert handle is not None
                chosen[member.name.strip("/")] = handle.read()
    return chosen


def write_tar(out: Path, files: dict[str, bytes]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = sample_members(args.source, {"train": args.train_per_class,
                                         "test": args.test_per_class}, args.seed)
    write_tar(args.out, files)
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {len(files)} images, {size:,} bytes")
    if size > MAX_BYTES:
        print(f"error: larger than {MAX_BYTES:,} bytes; take fewer images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
