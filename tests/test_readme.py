"""What the README shows is what happens: its commands run, its log lines appear."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.redis_server import RedisServer
from tests.support import ROOT, Twistd, free_port, slow, twistd_command

README = (ROOT / "README.md").read_text()


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def twistd_commands(text: str) -> list[str]:
    """Every hand-run ``twistd -n ...`` line of the README's shell blocks."""
    lines = [
        line.strip().removeprefix("# or:").strip()
        for block in shell_blocks(text)
        for line in block.splitlines()
    ]
    return [
        line.split(" #", 1)[0].strip() for line in lines if line.startswith("twistd -n")
    ]


@slow
class ReadmeCommandTests(SynchronousTestCase):
    def test_every_hand_run_command_writes_no_pidfile(self):
        commands = twistd_commands(README)
        self.assertGreaterEqual(len(commands), 3, commands)
        for command in commands:
            self.assertIn(" --pidfile= ", command)

    def test_the_two_node_example_runs_as_written(self):
        """Both nodes of "Scaling out", started in one directory, come up."""
        redis = RedisServer()
        self.addCleanup(redis.stop)
        redis.start()
        commands = [c for c in twistd_commands(README) if "--redis" in c]
        self.assertEqual(len(commands), 2, commands)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        for n, command in enumerate(commands):
            argv = shlex.split(command)
            argv = [
                arg.replace("redis://127.0.0.1:6379/0", redis.url) for arg in argv[1:]
            ]
            argv[argv.index("--port") + 1] = f"tcp:{free_port()}:interface=127.0.0.1"
            log = workdir / f"node{n}.log"
            out = log.open("wb")
            self.addCleanup(out.close)
            process = subprocess.Popen(
                [*twistd_command(), *argv],
                cwd=workdir,  # the same directory, as a person would
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            self.addCleanup(process.wait, 15)
            self.addCleanup(process.send_signal, signal.SIGTERM)
            # One after the other, as a person would: the first is up (and
            # would have written its pid file) before the second starts.
            deadline = time.monotonic() + 20
            while "Redis link up" not in log.read_text():
                self.assertIsNone(process.poll(), log.read_text())
                self.assertLess(time.monotonic(), deadline, log.read_text())
                time.sleep(0.05)


@slow
class ReadmeLogTests(SynchronousTestCase):
    def test_the_sample_log_lines_are_what_the_server_writes(self):
        sample = README.split("### What it logs", 1)[1].split("```\n", 2)[1]
        expected = sample.strip().splitlines()
        self.assertEqual(len(expected), 5, sample)

        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        server = Twistd(workdir, "--port", "tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop, signal.SIGKILL)
        log = server.wait_for_log("Site starting on")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))
        # What the sample shows: two clients, a message, a binary frame.
        with (
            connect(f"ws://127.0.0.1:{port}/") as one,
            connect(f"ws://127.0.0.1:{port}/") as two,
        ):
            one.send("hello")
            self.assertEqual(two.recv(timeout=5), "id 1: hello")
            one.send(b"\x00")
            with self.assertRaises(ConnectionClosed):
                one.recv(timeout=5)
            server.wait_for_log("Connection 1 has disconnected")
        ours = [
            line.split("[webchat#", 1)[1].split("] ", 1)[1]
            for line in server.log().splitlines()
            if "[webchat#" in line
        ]
        for line in expected:
            # Durations vary; everything else is exactly as printed.
            pattern = re.escape(line).replace(r"0\.2\ s", r"\d+\.\d\ s")
            self.assertTrue(
                any(re.fullmatch(pattern, got) for got in ours),
                f"{line!r} not among {ours!r}",
            )
