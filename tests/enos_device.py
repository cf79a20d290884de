#!/usr/bin/env python3
"""A device driven by the STOCK EnOS Python SDK, used to prove otabox speaks EnOS.

This script is NOT part of the pytest suite and must not be imported by it: it needs
`enos-mqtt-sdk-python==0.1.1` and `paho-mqtt<2`, which live in their own virtualenv
so they never collide with otabox's own MQTT dependencies:

    python3.11 -m venv /work/venvs/enos
    /work/venvs/enos/bin/pip install enos-mqtt-sdk-python==0.1.1 'paho-mqtt<2'
    /work/venvs/enos/bin/python tests/enos_device.py --host 127.0.0.1 --port 1883 \
        --product-key PK --device-key DK --secret S --version 1.0.0 --mode push

Over TLS add `--ca ca.pem` (and `--cert dev.pem --key dev.key` for two-way TLS): the SDK's
own `Profile.set_ssl_context`, and the download over HTTPS checks the server against the same
CA. With `--product-secret PS` instead of `--secret`, the SDK activates the device first
(secure mode 3) and the run goes on with the secret it received (secure mode 2).

All MQTT traffic goes through the SDK's own classes, unmodified; only the firmware
download (plain urllib GET, as a real device would do) is ours. Every observable step
is printed to stdout as one JSON object per line so a test can parse the transcript.
Exit status: 0 on success, 1 on any failure or timeout. SDK logs go to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import re
import ssl
import sys
import threading
import urllib.request
from typing import Any

from enos.core.MqttClient import MqttClient
from enos.core.internal.Profile import Profile
from enos.core.message.IConnectCallback import IConnectCallback
from enos.message.downstream.ota.OtaUpgradeCommand import OtaUpgradeCommand
from enos.message.downstream.ota.OtaUpgradeReply import OtaUpgradeReply
from enos.message.upstream.ota.OtaGetVersionRequest import OtaGetVersionRequest
from enos.message.upstream.ota.OtaGetVersionResponse import OtaGetVersionResponse
from enos.message.upstream.ota.OtaProgressReportRequest import OtaProgressReportRequest
from enos.message.upstream.ota.OtaVersionReportRequest import OtaVersionReportRequest


def emit(event: str, **fields: Any) -> None:
    # One flushed line per event: the caller may read stdout while we are still running.
    print(json.dumps(dict(event=event, **fields), default=str), flush=True)


class ConnackWatcher(logging.Handler):
    """The SDK swallows a refused CONNACK (it only logs 'bad connection, error code: N'
    while paho keeps retrying), so we listen to its logger to report *why* a login
    failed, and to stop waiting at once instead of running into the timeout.

    It swallows a connection the server ended too ('bad disconnection, error code: N', no
    on_disconnect callback; paho reconnects by itself): reported as `connection_lost`."""

    def __init__(self, settled: threading.Event, on_refused: Any = None) -> None:
        super().__init__()
        self.refused_rc: int | None = None
        self.settled = settled
        self.on_refused = on_refused  # called once, on the first refusal

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        lost = re.search(r"bad disconnection, error code: (\d+)", message)
        if lost:
            if self.refused_rc is None:  # not paho closing after a refused CONNACK
                emit("connection_lost", rc=int(lost.group(1)))
            return
        m = re.search(r"bad connection, error code: (\d+)", message)
        if m and self.refused_rc is None:
            self.refused_rc = int(m.group(1))
            emit("connect_refused", rc=self.refused_rc)
            self.settled.set()
            if self.on_refused is not None:
                self.on_refused()


class ConnectWaiter(IConnectCallback):  # type: ignore[misc]  # the SDK ships no types
    """Why async connect: the SDK's sync connect() waits on a Condition that the paho
    thread may notify *before* the wait starts (CONNACK from a fast local server), and
    then blocks a full 10 s. The SDK's own callback API avoids that race."""

    def __init__(self, settled: threading.Event) -> None:
        self.settled = settled

    def on_connect(self) -> None:
        self.settled.set()

    def on_disconnect(self) -> None:
        emit("sdk_on_disconnect")  # also fires on our own clean disconnect

    def on_connect_failed(self) -> None:
        emit("connect_failed")
        self.settled.set()


def build_client(args: argparse.Namespace, secret: str | None = None) -> Any:
    """The SDK client for the device secret (`secret`, else --secret), or, with neither,
    for dynamic activation with --product-secret (secure mode 3)."""
    secret = secret or args.secret
    # The SDK parses the URL by splitting on ':' and ignores the scheme; TLS is only
    # used if set_ssl_context() is called, so "tcp://host:port" is plain TCP.
    url = "%s://%s:%d" % ("ssl" if args.ca else "tcp", args.host, args.port)
    if secret:
        client = MqttClient(url, args.product_key, args.device_key, secret)
    else:
        # As the SDK's own dynamic activation sample: a Profile with the product secret
        # and no device secret makes it log in with secure mode 3.
        profile = Profile(url, args.product_key, args.device_key, None, args.product_secret)
        client = MqttClient(profile=profile)
    profile = client.get_profile()
    if args.ca:
        # The SDK's own TLS: it checks the server's chain against the CA (not its host
        # name) and presents the client certificate when one is given (None: none).
        profile.set_ssl_context(args.ca, args.cert, args.key)
    # EnOS names the plain digests "hmac*"; the CLI takes the short names.
    profile.set_sign_method("hmac" + args.sign_method)
    # Sync publish() waits this long for a *_reply before raising.
    profile.set_operation_timeout(args.timeout)
    return client


def request_payload(builder: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What the SDK would put on the wire for a request (it fills id/pk/dk at publish)."""
    req = builder.set_product_key(args.product_key).set_device_key(args.device_key).build()
    req.set_id("1")  # the SDK numbers requests "1", "2", ... (a string) per process
    return {"topic": req.get_message_topic(), "reply_topic": req.get_answer_topic(),
            "payload": json.loads(req.encode())}


def dry_run(args: argparse.Namespace) -> int:
    # Show the login triplet and the payloads without touching the network, so the
    # server side can be checked against them (and against the spec) by eye.
    client = build_client(args)
    p = client.get_profile()
    emit("login", clientId=p.get_client_id(), username=p.get_mqtt_username(),
         password=p.get_mqtt_password(), keepalive=p.get_keep_alive_interval(),
         clean_session=p.get_mqtt_clean_session(), mqtt_protocol=Profile.MQTTv3_1_1)
    emit("would_publish", **request_payload(OtaVersionReportRequest.builder().set_version(args.version), args))
    emit("would_publish", **request_payload(OtaProgressReportRequest.builder().set_step("50").set_desc("downloaded"), args))
    emit("would_publish", **request_payload(OtaGetVersionRequest.builder(), args))
    return 0


def publish(client: Any, builder: Any) -> Any:
    """Sync SDK publish: it subscribes to <topic>_reply on first use, then blocks until a
    reply with the same id arrives on that topic (or the operation timeout)."""
    return client.publish(builder.build())


def report_version(client: Any, version: str | None) -> bool:
    rsp = publish(client, OtaVersionReportRequest.builder().set_version(version))
    code: int = rsp.get_code()
    emit("inform_reply", code=code, message=rsp.get_message())
    return code == 200


def report_progress(client: Any, step: str, desc: str) -> bool:
    # Steps are strings, as in the SDK's own sample and OTAUpdateFailureCause constants.
    rsp = publish(client, OtaProgressReportRequest.builder().set_step(step).set_desc(desc))
    code: int = rsp.get_code()
    emit("progress_sent", step=step, desc=desc, code=code)
    return code == 200


def upgrade(client: Any, params: dict[str, Any], timeout: float, ca: str | None = None) -> bool:
    """Download, verify and 'install' one firmware offer/push, reporting like a device.
    With `ca`, an https fileUrl is checked against that CA (chain and host name)."""
    url, size = params.get("fileUrl"), params.get("fileSize")
    method = (params.get("signMethod") or "md5").lower()
    report_progress(client, "10", "downloading")
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        if url is None:
            raise ValueError("no fileUrl")
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            blob = r.read()
    except Exception as e:  # noqa: BLE001 - any failure here is a download failure
        emit("error", message="download failed: %s" % e)
        report_progress(client, "-2", "download failed: %s" % e)  # -2 = download failed
        return False
    if method not in ("md5", "sha256"):
        emit("error", message="unsupported signMethod %r" % method)
        report_progress(client, "-3", "unsupported signMethod")
        return False
    digest = hashlib.new(method, blob).hexdigest()
    sign_ok = digest.lower() == str(params.get("sign", "")).lower()
    size_ok = size is None or int(size) == len(blob)
    emit("downloaded", size=len(blob), size_ok=size_ok, sign_ok=sign_ok, digest=digest)
    if not (sign_ok and size_ok):
        report_progress(client, "-3", "verification failed")  # -3 = verification failed
        return False
    report_progress(client, "50", "downloaded and verified")
    report_progress(client, "100", "installed")
    # The new version report is what completes the task on the server.
    if not report_version(client, params.get("version")):
        return False
    emit("done", version=params.get("version"))
    return True


SDK_LOGGER = logging.getLogger("enos.core.internal.MqttConnection")


def connect(client: Any, timeout: float) -> ConnackWatcher | None:
    """Connect and wait for the CONNACK; the watcher (it listens until close(), so a later
    refusal is seen too) or None when the login did not succeed (the reason is emitted)."""
    settled = threading.Event()  # set on CONNACK accepted, refused, or connect error
    watcher = ConnackWatcher(settled)
    SDK_LOGGER.addHandler(watcher)
    p = client.get_profile()
    emit("connecting", clientId=p.get_client_id(), username=p.get_mqtt_username())
    try:
        client.connect(ConnectWaiter(settled))  # async: paho connects in its own thread
    except Exception as e:  # noqa: BLE001 - SDK wraps socket errors in EnvisionException
        emit("error", message="connect failed: %s" % e)
        SDK_LOGGER.removeHandler(watcher)
        return None
    settled.wait(timeout)
    if not client.is_connected():
        emit("error", message="not connected", connack_rc=watcher.refused_rc)
        SDK_LOGGER.removeHandler(watcher)
        return None
    emit("connected")
    return watcher


def close(client: Any, watcher: ConnackWatcher | None) -> None:
    if watcher is not None:
        SDK_LOGGER.removeHandler(watcher)  # what this client logs from now on is not news
    try:
        # Disconnects and stops the SDK's worker pool. It takes the SDK's client lock, which
        # its activation handler holds until its info_reply is published: that goes out first.
        client.close()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def activate(args: argparse.Namespace) -> str | None:
    """Dynamic activation: log in with the product secret, take the device secret the
    server sends, and let the SDK answer it; the secret, or None (the reason is emitted)."""
    client = build_client(args)
    secrets: queue.Queue[str] = queue.Queue()
    # Called by the SDK on its executor thread with params.deviceSecret; the SDK itself
    # then answers on .../thing/activate/info_reply.
    client.on_device_dynamic_active = secrets.put
    watcher = connect(client, args.timeout)
    if watcher is None:
        return None
    try:
        secret = secrets.get(timeout=args.timeout)
    except queue.Empty:
        emit("error", message="no thing.activate.info within %ss" % args.timeout)
        return None
    finally:
        close(client, watcher)
        emit("disconnected")
    emit("activated", deviceSecret=secret)
    return secret


def run(args: argparse.Namespace) -> int:
    secret = None
    if not args.secret:
        # A real device would now store its secret; from here on it is a device like any other.
        secret = activate(args)
        if secret is None:
            return 1
    client = build_client(args, secret)
    # None: the connection was lost and the SDK's own reconnect refused.
    pushes: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def on_upgrade(cmd: Any, path_list: list[str]) -> Any:
        # Runs on the SDK's executor thread. Hand the work to the main thread and return
        # at once: the SDK publishes the returned reply to .../ota/device/upgrade_reply
        # (with the push's id). Had we registered no handler, the SDK would itself reply
        # code "1101" (a string) "downstream command handler not registered".
        fw = cmd.get_firmware_info()  # the SDK's own parse of the push
        emit("upgrade", id=cmd.get_id(), method=cmd.get_method(), params=cmd.get_params(),
             sdk_firmware=vars(fw), topic_args=list(path_list))
        pushes.put(cmd.get_params())
        return OtaUpgradeReply.builder().set_code(200).set_message("accepted").build()

    # Register before connecting: the server may deliver a pending push right after CONNACK.
    client.register_arrived_message_handler(OtaUpgradeCommand.get_class(), on_upgrade)
    watcher = connect(client, args.timeout)
    if watcher is None:
        return 1
    watcher.on_refused = lambda: pushes.put(None)
    try:
        if not report_version(client, args.version):
            return 1
        if args.mode == "login":
            return 0
        if args.mode == "push":
            try:
                params = pushes.get(timeout=args.timeout)
            except queue.Empty:
                emit("error", message="no ota.device.upgrade push within %ss" % args.timeout)
                return 1
            if params is None:
                emit("error", message="connection lost, and the SDK's reconnect was refused")
                return 1
            return 0 if upgrade(client, params, args.timeout, args.ca) else 1
        # mode == "request": ask for offers instead of waiting for a push.
        rsp = publish(client, OtaGetVersionRequest.builder())
        data = rsp.get_data()
        # SDK bug: OtaGetVersionResponse lacks decode_to_object, so the reply arrives as a
        # plain BaseResponse without get_firmware_info(); apply the SDK's parser by hand.
        sdk_fw = OtaGetVersionResponse.get_firmware_info(rsp) if isinstance(data, list) else None
        emit("offers", code=rsp.get_code(), data=data,
             sdk_firmware=[vars(f) for f in (sdk_fw or [])])
        if rsp.get_code() != 200 or not isinstance(data, list):
            emit("error", message="bad getversion reply (want code 200 and a list)")
            return 1
        if not data:
            emit("done", version=args.version, upgraded=False)
            return 0
        return 0 if upgrade(client, data[0], args.timeout, args.ca) else 1
    except Exception as e:  # noqa: BLE001 - SDK raises EnvisionException on reply timeout
        emit("error", message=str(e))
        return 1
    finally:
        close(client, watcher)
        emit("disconnected")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--product-key", required=True)
    ap.add_argument("--device-key", required=True)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--secret", help="the device secret (secure mode 2)")
    who.add_argument("--product-secret", help="no device secret: dynamic activation first (secure mode 3)")
    ap.add_argument("--ca", help="PEM file of the CA to pin: MQTT over TLS, downloads over HTTPS")
    ap.add_argument("--cert", help="the device certificate (PEM) for two-way TLS; needs --ca and --key")
    ap.add_argument("--key", help="the device certificate's private key (PEM)")
    ap.add_argument("--version", required=True, help="firmware version the device runs now")
    ap.add_argument("--mode", choices=("push", "request", "login"), default="login")
    ap.add_argument("--sign-method", choices=("sha256", "sha1", "md5"), default="sha256")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per wait")
    ap.add_argument("--dry-run", action="store_true", help="print login and payloads, no network")
    ap.add_argument("--verbose", action="store_true", help="SDK debug logs on stderr")
    args = ap.parse_args(argv)
    if (args.cert or args.key) and not (args.cert and args.key and args.ca):
        ap.error("--cert and --key go together, and with --ca")
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.WARNING)
    return dry_run(args) if args.dry_run else run(args)


if __name__ == "__main__":
    sys.exit(main())
