"""
The cluster examples in contrib/: the webchat@.service template unit, the
nginx and the HAProxy configurations, each checked by the tool that will
load it (systemd-analyze verify, nginx -t, haproxy -c).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ROOT, require
from tests.test_systemd import SERVICE, seconds, unit_values, with_local_binary
from tests.tls_cert import make_certificate
from webchat.limits import SHUTDOWN_GRACE
from webchat.relay import parse_redis_url

TEMPLATE = ROOT / "contrib" / "systemd" / "webchat@.service"
NGINX = ROOT / "contrib" / "nginx" / "webchat-cluster.conf"
HAPROXY = ROOT / "contrib" / "haproxy" / "webchat-cluster.cfg"

#: The nodes the balancers spread browsers over: webchat@8081 .. webchat@8084.
NODES = [f"127.0.0.1:{port}" for port in range(8081, 8085)]


def workdir(case: SynchronousTestCase, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def hardening(text: str) -> dict[str, list[str]]:
    """Every setting in a unit's hardening block (from its marker to [Install])."""
    block = text.split("# -- hardening", 1)[1].split("[Install]", 1)[0]
    keys = re.findall(r"^([A-Za-z]+)=", block, re.MULTILINE)
    return {key: unit_values(block, key) for key in keys}


class TemplateUnitTests(SynchronousTestCase):
    def test_command_line(self) -> None:
        (line,) = unit_values(TEMPLATE.read_text(), "ExecStart")
        args = shlex.split(line)
        self.assertEqual(
            args[:4], ["/opt/webchat/venv/bin/twistd", "-n", "--pidfile=", "webchat"]
        )
        options = dict(zip(args[4::2], args[5::2], strict=True))
        self.assertEqual(options["--port"], "tcp:%i:interface=127.0.0.1")
        self.assertEqual(options["--trust-proxy"], "127.0.0.1")
        self.assertEqual(
            parse_redis_url(options["--redis"]).display, "redis://127.0.0.1:6379/0"
        )

    def test_same_hardening_and_stop_as_the_single_service(self) -> None:
        template, single = TEMPLATE.read_text(), SERVICE.read_text()
        self.assertEqual(hardening(template), hardening(single))
        self.assertGreater(len(hardening(single)), 20)
        for key in ["KillSignal", "TimeoutStopSec", "Restart", "LimitNOFILE"]:
            self.assertEqual(unit_values(template, key), unit_values(single, key), key)
        (timeout,) = unit_values(template, "TimeoutStopSec")
        self.assertGreater(seconds(timeout), SHUTDOWN_GRACE)

    def test_systemd_analyze_verify_accepts_an_instance(self) -> None:
        code, output, ours = self.verify(TEMPLATE.read_text())
        self.assertEqual(ours, [], output)
        self.assertEqual(code, 0, output)

    def test_systemd_analyze_verify_catches_a_misspelt_setting(self) -> None:
        broken = TEMPLATE.read_text().replace("ProtectClock=yes", "ProtectClocks=yes")
        self.assertNotEqual(broken, TEMPLATE.read_text())
        _, output, ours = self.verify(broken)
        self.assertTrue(any("ProtectClocks" in line for line in ours), output)

    def verify(self, template: str) -> tuple[int, str, list[str]]:
        """
        ``systemd-analyze verify`` on instance 8081 of the template, the way
        tests/test_systemd.py checks webchat.service: ExecStart's binary is
        this venv's twistd, and only lines naming our unit count as findings.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise require("systemd-analyze", "install systemd to check the units")
        directory = workdir(self, "webchat-units-")
        (directory / "webchat@.service").write_text(with_local_binary(template))
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(directory / "webchat@8081.service")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        ours = [line for line in output.splitlines() if "webchat@" in line]
        return result.returncode, output, ours


class BalancerTests(SynchronousTestCase):
    def test_both_balance_the_template_nodes_by_least_connections(self) -> None:
        nginx, haproxy = NGINX.read_text(), HAPROXY.read_text()
        self.assertEqual(re.findall(r"^\s*server (\S+) max_fails", nginx, re.M), NODES)
        self.assertEqual(re.findall(r"^\s*server node\d+ (\S+)$", haproxy, re.M), NODES)
        self.assertRegex(nginx, r"(?m)^\s*least_conn;")
        self.assertRegex(haproxy, r"(?m)^\s*balance leastconn$")
        self.assertRegex(haproxy, r"(?m)^\s*http-check send meth GET uri /healthz ")

    def test_nginx_accepts_its_config(self) -> None:
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        if nginx is None:
            raise require("nginx", "apt-get install nginx-light")
        directory = workdir(self, "webchat-nginx-")
        site = self.with_test_certificate(NGINX.read_text(), directory)
        (directory / "webchat-cluster.conf").write_text(site)
        (directory / "nginx.conf").write_text(
            f"pid {directory}/nginx.pid;\n"
            "events {}\n"
            f"http {{ include {directory}/webchat-cluster.conf; }}\n"
        )
        result = subprocess.run(
            [nginx, "-t", "-p", str(directory), "-e", "stderr",
             "-c", str(directory / "nginx.conf")],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("test is successful", result.stderr)

    def test_haproxy_accepts_its_config(self) -> None:
        haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if haproxy is None:
            raise require("haproxy", "apt-get install haproxy")
        directory = workdir(self, "webchat-haproxy-")
        config = self.with_test_certificate(HAPROXY.read_text(), directory)
        (directory / "haproxy.cfg").write_text(config)
        result = subprocess.run(
            [haproxy, "-c", "-f", str(directory / "haproxy.cfg")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertNotIn("WARNING", output)

    def with_test_certificate(self, text: str, directory: Path) -> str:
        """
        The config with its certificate paths pointing at a throwaway
        certificate: both tools load the files they name.  Nothing else changes.
        """
        cert = make_certificate(directory)
        replaced = (
            text.replace("/etc/ssl/chat.example.com/fullchain.pem", str(cert.cert))
            .replace("/etc/ssl/chat.example.com/privkey.pem", str(cert.key))
            .replace("/etc/haproxy/certs/chat.example.com.pem", str(cert.combined))
        )
        self.assertNotEqual(replaced, text)
        return replaced
