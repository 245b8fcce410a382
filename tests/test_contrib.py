"""
The cluster examples in contrib/: the webchat@.service template unit, the
nginx and the HAProxy configurations, each checked by the tool that will
load it (systemd-analyze verify, nginx -t, haproxy -c).
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import (
    ROOT,
    ChatClient,
    cancel_batched_timers,
    free_port,
    require,
    slow,
)
from tests.test_systemd import SERVICE, seconds, unit_values, with_local_binary
from tests.tls_cert import make_certificate
from webchat.access import AccessPolicy
from webchat.chat import WebChatFactory
from webchat.limits import SHUTDOWN_GRACE
from webchat.redis import parse_redis_url
from webchat.web import make_site

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

    @slow
    def test_systemd_analyze_verify_accepts_an_instance(self) -> None:
        code, output, ours = self.verify(TEMPLATE.read_text())
        self.assertEqual(ours, [], output)
        self.assertEqual(code, 0, output)

    @slow
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

    @slow
    def test_nginx_accepts_its_config(self) -> None:
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        if nginx is None:
            raise require("nginx", "apt-get install nginx")
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

    @slow
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


# -- nginx, running, in front of real nodes ------------------------------------------


@slow
class NginxInFrontTests(TestCase):
    """
    The shipped nginx config, running, in front of two webchat nodes in this
    process.  Only addresses change: nginx listens on a free loopback port and
    its upstream names the nodes' ports, the certificate is a throwaway one.
    """

    @inlineCallbacks
    def test_websockets_pass_through_and_spread_over_the_nodes(self):
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        if nginx is None:
            raise require("nginx", "apt-get install nginx")
        first = yield self.start_node()
        second = yield self.start_node()
        port = self.start_nginx(nginx, [first, second])
        yield self.wait_for_port(port)

        # Through TLS, Upgrade, Host and X-Forwarded-Proto: a browser on
        # https://localhost is let in (its Origin is the host it reached).
        one = yield self.connect(port)
        two = yield self.connect(port)
        # least_conn: the second goes to the node that had none.
        self.assertEqual(sorted([len(first.rooms), len(second.rooms)]), [1, 1])

        three = yield self.connect(port)
        four = yield self.connect(port)
        self.assertEqual([len(first.rooms), len(second.rooms)], [2, 2])
        # Two on one node hear each other, through nginx; the others, on the
        # other node, cannot without a relay between the nodes.
        one.send_text("hello through nginx")
        yield deferLater(reactor, 0.3, lambda: None)
        heard = [c.pending() for c in (two, three, four)]
        self.assertEqual(sorted(map(len, heard)), [0, 0, 1], heard)
        self.assertRegex(max(heard)[0], r"^id \d+: hello through nginx$")

        # A node that is gone (refuses connections) is skipped.
        yield first.listening.stopListening()
        for _ in range(3):
            yield self.connect(port)
        self.assertEqual([len(first.rooms), len(second.rooms)], [2, 5])

    # -- helpers ----------------------------------------------------------------------

    @inlineCallbacks
    def start_node(self):
        factory = WebChatFactory(
            reactor, quiet=True, access=AccessPolicy.from_options(proxies=["127.0.0.1"])
        )
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        factory.listening = yield endpoint.listen(make_site(factory))
        self.addCleanup(self.stop_node, factory)
        return factory

    @inlineCallbacks
    def stop_node(self, factory):
        if factory.listening.connected:
            yield factory.listening.stopListening()
        yield factory.close_all(grace=1.0)
        yield deferLater(reactor, 0, lambda: None)
        cancel_batched_timers()

    def start_nginx(self, nginx: str, nodes: list[WebChatFactory]) -> int:
        directory = workdir(self, "webchat-nginx-")
        cert = make_certificate(directory)
        port, redirect_port = free_port(), free_port()
        site = NGINX.read_text()
        upstreams = "".join(
            f"    server 127.0.0.1:{node.listening.getHost().port} "
            "max_fails=1 fail_timeout=10s;\n"
            for node in nodes
        )
        site = re.sub(r"(?m)^    server 127\.0\.0\.1:808\d .*\n", "", site, count=4)
        site = site.replace("    least_conn;\n", "    least_conn;\n" + upstreams)
        site = (
            site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
            .replace("listen [::]:443 ssl;", "")
            .replace("listen 80;", f"listen 127.0.0.1:{redirect_port};")
            .replace("listen [::]:80;", "")
            .replace("/etc/ssl/chat.example.com/fullchain.pem", str(cert.cert))
            .replace("/etc/ssl/chat.example.com/privkey.pem", str(cert.key))
        )
        self.assertIn(upstreams, site)
        (directory / "site.conf").write_text(site)
        (directory / "nginx.conf").write_text(
            f"pid {directory}/nginx.pid;\n"
            "error_log stderr;\n"
            "events {}\n"
            f"http {{ access_log off; include {directory}/site.conf; }}\n"
        )
        process = subprocess.Popen(
            [nginx, "-p", str(directory), "-e", "stderr", "-c",
             str(directory / "nginx.conf"), "-g", "daemon off; master_process off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.nginx = process
        self.addCleanup(self.stop_nginx, process)
        self.ca = cert.ca
        return port

    def stop_nginx(self, process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    @inlineCallbacks
    def wait_for_port(self, port: int):
        for _ in range(500):
            if self.nginx.poll() is not None:
                error = self.nginx.stderr.read().decode(errors="replace")
                self.fail(f"nginx exited with {self.nginx.returncode}: {error}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("nginx did not start listening")

    @inlineCallbacks
    def connect(self, port: int):
        # A browser's Origin names the port when it is not 443.
        factory = WebSocketClientFactory(
            f"wss://localhost:{port}/", origin=f"https://localhost:{port}"
        )
        factory.protocol = ChatClient
        factory.setProtocolOptions(failByDrop=False, openHandshakeTimeout=5)
        trust = Certificate.loadPEM(self.ca.read_bytes())
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5),
        )
        client = yield endpoint.connect(factory)
        self.addCleanup(self.close_client, client)
        yield client.opened
        return client

    @inlineCallbacks
    def close_client(self, client: ChatClient):
        if client.transport is not None and not client.closed.called:
            client.transport.abortConnection()
        yield client.closed


# -- the documented single-node nginx example, through a browser ----------------------

OPERATIONS = ROOT / "docs" / "operations.md"


def documented_nginx_site() -> str:
    """The nginx example of docs/operations.md ("nginx in front"), as printed."""
    section = OPERATIONS.read_text().split("### nginx in front", 1)[1]
    return section.split("```nginx\n", 1)[1].split("```", 1)[0]


@slow
class NginxBrowserTests(SynchronousTestCase):
    """
    The README's and docs' nginx example on a port that is not 443, in front
    of a real ``twistd webchat`` node, with headless Chromium as the visitor:
    the page loads through nginx and its WebSocket is let in.
    """

    def test_browser_chats_through_nginx_on_a_non_default_port(self) -> None:
        from tests.support import Twistd
        from tests.test_page import CHROMIUM_ARGS, QUICK, chromium_path

        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        if nginx is None:
            raise require("nginx", "apt-get install nginx")
        try:
            from playwright.sync_api import expect, sync_playwright
        except ImportError as e:
            raise require("Playwright", f"cannot import playwright ({e})") from e
        chromium = chromium_path()
        if chromium is None:
            raise require("Chromium", "no executable chromium on PATH")

        directory = workdir(self, "webchat-nginx-")
        node_port, port = free_port(), free_port()
        node = Twistd(
            directory,
            "--port", f"tcp:{node_port}:interface=127.0.0.1",
            "--trust-proxy", "127.0.0.1",
        )  # fmt: skip
        self.addCleanup(node.stop)
        node.wait_for_log("Site starting on")

        cert = make_certificate(directory)
        site = documented_nginx_site()
        for old, new in (
            ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
            (
                "proxy_pass http://127.0.0.1:8080;",
                f"proxy_pass http://127.0.0.1:{node_port};",
            ),
            ("/etc/ssl/chat.example.com/fullchain.pem", str(cert.cert)),
            ("/etc/ssl/chat.example.com/privkey.pem", str(cert.key)),
        ):
            self.assertIn(old, site)
            site = site.replace(old, new)
        (directory / "site.conf").write_text(site)
        (directory / "nginx.conf").write_text(
            f"pid {directory}/nginx.pid;\n"
            "error_log stderr;\n"
            "events {}\n"
            f"http {{ access_log off; include {directory}/site.conf; }}\n"
        )
        process = subprocess.Popen(
            [nginx, "-p", str(directory), "-e", "stderr", "-c",
             str(directory / "nginx.conf"), "-g", "daemon off; master_process off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)

        playwright = sync_playwright().start()
        self.addCleanup(playwright.stop)
        browser = playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        self.addCleanup(browser.close)
        pages = []
        for _ in range(2):
            context = browser.new_context(ignore_https_errors=True)
            page = context.new_page()
            for _ in range(100):  # nginx takes a moment to listen
                try:
                    page.goto(f"https://localhost:{port}/")
                    break
                except Exception:
                    if process.poll() is not None:
                        self.fail(f"nginx exited with {process.returncode}")
                    page.wait_for_timeout(50)
            expect(page.locator("#status")).to_have_text("Connected", timeout=QUICK)
            pages.append(page)

        a, b = pages
        a.locator("#message-input").fill("hello through nginx on another port")
        a.locator("#message-input").press("Enter")
        expect(b.locator("#messages > li.message .text")).to_have_text(
            ["hello through nginx on another port"], timeout=QUICK
        )
        self.assertNotIn("Refused connection", node.log())
