"""A complete OTA-capable device on the otabox device SDK. Copy it and replace the marked parts.

    python examples/device.py --host 127.0.0.1 --port 1883 --product thermo \\
        --device dev-001 --secret <deviceSecret> --slots ./dev-001-slots

Flow: receive an offer (push, or --poll for request mode) -> confirm -> download and verify
(the SDK reports progress and failures) -> "flash" into the inactive slot folder -> "reboot"
(reconnect as the new firmware) -> the new version is reported on connect, which completes
the upgrade on the server. With `--trust-server URL` the device stores the server's Ed25519
public key once and from then on flashes only firmware the server signed.
A/B slots: `<slots>/a` and `<slots>/b`, `<slots>/state.json` says
which is active and what version it holds, so an interrupted flash never bricks the device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

from otabox.device import Device, FlashFailed, Offer, fetch_signing_key

log = logging.getLogger("device")


class Slots:
    """A/B firmware slots in a folder; replace with your bootloader's API."""

    def __init__(self, root: Path, factory_version: str) -> None:
        self.root = root
        self.state_file = root / "state.json"
        root.mkdir(parents=True, exist_ok=True)
        if not self.state_file.exists():
            self._save({"active": "a", "version": factory_version})

    @property
    def signing_key(self) -> str | None:
        key = self.root / "signing-key.pub"
        return key.read_text().strip() if key.exists() else None

    def _save(self, state: dict[str, str]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # atomic: a power cut leaves the old or the new state

    @property
    def state(self) -> dict[str, str]:
        data: dict[str, str] = json.loads(self.state_file.read_text())
        return data

    @property
    def version(self) -> str:
        return self.state["version"]

    @property
    def running(self) -> Path | None:
        """The image the device runs (None before the first upgrade: the factory image is not here)."""
        path = self.root / self.state["active"] / "firmware.bin"
        return path if path.exists() else None

    @property
    def inactive(self) -> Path:
        path = self.root / ("b" if self.state["active"] == "a" else "a")
        path.mkdir(exist_ok=True)
        return path

    def flash(self, image: Path, version: str) -> None:
        """Write the verified image into the inactive slot, then switch the boot pointer to it."""
        slot = self.inactive
        shutil.copyfile(image, slot / "firmware.bin")
        image.unlink()
        self._save({"active": slot.name, "version": version})


async def run_once(args: argparse.Namespace, slots: Slots) -> None:
    """Run one "boot" of the device: until an upgrade asks for a reboot."""
    reboot = asyncio.Event()
    device: Device

    def confirm(offer: Offer) -> bool | None:
        # YOUR POLICY: False declines (the server records step -5), None defers (ask again later,
        # e.g. when the battery is charged or the machine is idle), True goes ahead.
        return offer.version != slots.version

    async def on_upgrade(offer: Offer) -> None:
        # The SDK reports download progress (0..80) and, if it fails, step -2 or -3 itself.
        # With the running image, the SDK takes a delta when the server offers one (and falls
        # back to the full image if it does not work out).
        image = await device.download(offer, slots.root / "download.bin", running_image=slots.running)
        await device.report_progress(90, "flashing")
        try:
            await asyncio.to_thread(slots.flash, image, offer.version)  # YOUR FLASH WRITE
        except OSError as exc:
            raise FlashFailed(f"flash write failed: {exc}") from exc  # reported as step -4
        await device.report_progress(100, "rebooting")
        reboot.set()

    device = Device(
        args.host,
        args.port,
        args.product,
        args.device,
        args.secret,
        version=slots.version,  # reported on every connect: after a reboot this completes the upgrade
        sign_method=args.sign_method,
        on_upgrade=on_upgrade,
        confirm=confirm,
        # The server's public key, stored at provisioning: then only firmware that the server
        # signed is flashed (a bad or missing signature is reported as step -3).
        signing_key=slots.signing_key,
    )
    async with device:
        log.info("running firmware %s", device.version)
        if args.poll:
            poller = asyncio.create_task(poll(device, args.poll))
        await reboot.wait()
        if args.poll:
            poller.cancel()


async def poll(device: Device, every: float) -> None:
    """Request mode: ask the server for offers now and then."""
    while True:
        try:
            for offer in await device.get_offers():
                await device.process(offer)  # confirm -> on_upgrade, the same path a push takes
        except Exception as exc:
            log.warning("asking for offers failed: %s", exc)
        await asyncio.sleep(every)


async def main(args: argparse.Namespace) -> None:
    slots = Slots(Path(args.slots), args.factory_version)
    if args.trust_server and not slots.signing_key:
        # Provisioning, once (on the factory floor): from now on this device trusts this key only.
        key = await fetch_signing_key(args.trust_server)
        (slots.root / "signing-key.pub").write_text(key + "\n")
        log.info("stored the server's signing key; unsigned firmware will be refused")
    while True:
        await run_once(args, slots)
        # "Reboot": a real device restarts here and boots the active slot. The next run_once
        # connects with the new version, and that version report tells the server it worked.
        log.info("rebooting into %s", slots.version)
        await asyncio.sleep(args.reboot_time)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="An otabox example device with A/B slots.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--product", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--sign-method", default="hmacsha256", choices=["hmacsha256", "hmacsha1", "hmacmd5"])
    p.add_argument("--slots", default="./device-slots", help="folder holding the A/B slots")
    p.add_argument("--factory-version", default="1.0.0", help="version of a fresh device")
    p.add_argument("--poll", type=float, default=0, help="request mode: ask for offers every N seconds")
    p.add_argument("--reboot-time", type=float, default=1.0)
    p.add_argument(
        "--trust-server",
        metavar="URL",
        help="provision: fetch and keep this server's firmware signing key (http://host:8080), then require it",
    )
    return p.parse_args()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        asyncio.run(main(parse_args()))
    except KeyboardInterrupt:
        pass
