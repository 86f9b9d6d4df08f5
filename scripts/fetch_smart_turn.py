"""Extract smart-turn v3.2 (int8 ONNX) from the pipecat-ai 1.14.0 wheel and check its sha256.

The model ships inside that wheel (BSD-2, Daily); pipecat itself is not installed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.assets import ASSET_DIR, SMART_TURN_SHA256, place_verified, sha256_of  # noqa: E402

MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def main() -> int:
    target = ASSET_DIR / "smart-turn-v3.2-cpu.onnx"
    if target.exists() and sha256_of(target) == SMART_TURN_SHA256:
        print(f"smart-turn present: {target}")
        return 0
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "pipecat-ai==1.14.0", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("pipecat_ai-1.14.0-*.whl"))
        with zipfile.ZipFile(wheel) as zf, open(target.with_suffix(".part"), "wb") as out:
            out.write(zf.read(MEMBER))
    if not place_verified(target.with_suffix(".part"), target, SMART_TURN_SHA256):
        return 1
    print(f"smart-turn extracted and verified: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
