"""A cached virtualenv with the stock EnOS Python SDK, for tests that run `tests/enos_device.py`.

The SDK needs `paho-mqtt<2`, which must never meet otabox's own MQTT dependencies, so it
lives in its own venv under `<repo>/.cache/enos-venv` (gitignored). The venv is reused
while its stamp (requirements + the Python that built it) matches, and rebuilt otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".cache" / "enos-venv"
DEVICE_SCRIPT = REPO / "tests" / "enos_device.py"
REQUIREMENTS = ("enos-mqtt-sdk-python==0.1.1", "paho-mqtt<2")
# pip may have to fetch both packages; generous, but bounded.
BUILD_TIMEOUT = 600.0


class EnosVenvError(RuntimeError):
    """The EnOS SDK venv could not be built (the message has pip's output)."""


def _stamp() -> str:
    # The base interpreter, not sys.executable: .venv and .venv-test share one EnOS venv.
    text = "\n".join([sys.version, sys.base_prefix, *REQUIREMENTS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnosVenvError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise EnosVenvError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def ensure_enos_venv(venv: Path = VENV) -> Path:
    """The venv's python, building the venv first when missing or stale. Raises EnosVenvError.

    Safe to call from several processes at once (a lock file serialises the build).
    """
    venv.parent.mkdir(parents=True, exist_ok=True)
    stamp_file = venv / ".stamp"
    stamp = _stamp()
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = venv_python(venv)
        if python.exists() and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)])
        env_pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run([*env_pip, *REQUIREMENTS])
        # Prove the SDK imports before declaring the venv good.
        _run([str(python), "-c", "import enos.core.MqttClient, paho.mqtt.client"])
        stamp_file.write_text(stamp + "\n")
        return python
