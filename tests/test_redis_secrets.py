"""The Redis password kept off the command line: from a file or the environment.

A real twistd talks to a real redis-server that requires the password; the
process's argv (what ``ps`` and /proc/PID/cmdline show everyone) and its log
never contain it.
"""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.redis_server import RedisServer
from tests.support import Twistd, slow
from webchat.tap import Options

PASSWORD = "s3cret-Redis pass"


@slow
class PasswordOutOfArgvTests(SynchronousTestCase):
    def setUp(self):
        self.redis = RedisServer(password=PASSWORD)
        self.addCleanup(self.redis.stop)
        self.redis.start()
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)

    def start(self, *args: str, env: dict[str, str] | None = None) -> Twistd:
        server = Twistd(
            self.workdir, "--port", "tcp:0:interface=127.0.0.1", *args, env=env
        )
        self.addCleanup(server.stop, signal.SIGKILL)
        server.wait_for_log("Redis link up")
        return server

    def assert_secret_kept(self, server: Twistd) -> None:
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        self.assertIn(b"webchat", cmdline)
        self.assertNotIn(b"s3cret", cmdline)
        self.assertNotIn("s3cret", server.log())
        self.assertIn(f"Redis link up (redis://127.0.0.1:{self.redis.port}/0)",
                      server.log())  # fmt: skip

    def test_password_from_a_file(self):
        secret = self.workdir / "redis-password"
        secret.write_text(PASSWORD + "\n")
        server = self.start(
            "--redis", f"redis://127.0.0.1:{self.redis.port}/0",
            "--redis-password-file", str(secret),
        )  # fmt: skip
        self.assert_secret_kept(server)

    def test_url_from_the_environment(self):
        url = f"redis://:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{self.redis.port}/0"
        server = self.start(env={"WEBCHAT_REDIS_URL": url})
        self.assert_secret_kept(server)


class PasswordOptionTests(SynchronousTestCase):
    def parse(self, *args: str, environ: dict[str, str] | None = None) -> Options:
        options = Options(environ=environ or {})
        options.parseOptions(list(args))
        return options

    def test_command_line_wins_over_the_environment(self):
        options = self.parse(
            "--redis", "redis://a:6379/0", environ={"WEBCHAT_REDIS_URL": "redis://b/0"}
        )
        self.assertEqual(options["redis"], "redis://a:6379/0")
        self.assertEqual(self.parse()["redis"], None)

    def test_two_passwords_are_an_error_that_does_not_repeat_them(self):
        secret = Path(self.mktemp())
        secret.write_text("from-file\n")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(
                "--redis", "redis://:in-url@127.0.0.1/0",
                "--redis-password-file", str(secret),
            )  # fmt: skip
        self.assertIn(
            "both in the URL and in --redis-password-file", str(caught.exception)
        )
        self.assertNotIn("in-url", str(caught.exception))
        self.assertNotIn("from-file", str(caught.exception))

    def test_a_missing_or_empty_file_is_a_usage_error(self):
        for problem in ("missing", "empty"):
            path = Path(self.mktemp())
            if problem == "empty":
                path.write_text("")
            with self.assertRaises(usage.UsageError):
                self.parse("--redis", "redis://127.0.0.1/0",
                           "--redis-password-file", str(path))  # fmt: skip
