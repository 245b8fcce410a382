"""`twistd --logger webchat.logs.json`: one JSON object per line, parsed back."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from io import StringIO
from pathlib import Path

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase
from websockets.sync.client import connect

from tests.support import slow, twistd_command
from webchat.logs import json_observer


class JsonObserverTests(SynchronousTestCase):
    def test_event_fields_and_formatted_text(self):
        out = StringIO()
        log = Logger(namespace="webchat", observer=json_observer(out))
        log.info(
            "Connection {id} sending message {text} to {count} other(s)",
            id=3,
            text="a\\nb",
            count=2,
        )
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(
            record["text"], "Connection 3 sending message a\\nb to 2 other(s)"
        )
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "webchat")
        self.assertEqual((record["id"], record["count"]), (3, 2))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_failures_carry_their_traceback(self):
        out = StringIO()
        log = Logger(namespace="webchat", observer=json_observer(out))
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            log.failure(
                "An error has occurred: {what}", what="boom", level=LogLevel.error
            )
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "error")
        self.assertIn("ZeroDivisionError", record["traceback"])


@slow
class JsonLoggerProcessTests(SynchronousTestCase):
    def test_twistd_writes_json_lines(self):
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        process = subprocess.Popen(
            [
                *twistd_command(),
                "-n",
                "--pidfile=",
                "--logger",
                "webchat.logs.json",
                "webchat",
                "--port",
                "tcp:0:interface=127.0.0.1",
            ],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(process.kill)
        records = []
        port = None
        for line in process.stdout:
            records.append(json.loads(line))
            match = re.search(r"Site starting on (\d+)", records[-1]["text"])
            if match:
                port = int(match.group(1))
                break
        self.assertIsNotNone(port)
        with (
            connect(f"ws://127.0.0.1:{port}/") as a,
            connect(f"ws://127.0.0.1:{port}/"),
        ):
            a.send("hello\nforged")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
        self.assertEqual(process.returncode, 0, err)
        records += [json.loads(line) for line in out.splitlines()]  # every line is JSON
        ours = [r for r in records if r["namespace"] == "webchat"]
        texts = [r["text"] for r in ours]
        self.assertIn("New connection! (1) from 127.0.0.1 in room lobby", texts)
        sent = next(r for r in ours if r["text"].startswith("Connection 1 sending"))
        self.assertEqual(
            sent["text"],
            "Connection 1 sending message hello\\nforged to 1 other connection(s)",
        )
        self.assertEqual((sent["id"], sent["count"]), (1, 1))
        self.assertTrue(
            all(set(r) >= {"time", "level", "namespace", "text"} for r in records)
        )
