"""The plugin and the page are found after `pip install .` and `pip install -e .`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from twisted.trial.unittest import SynchronousTestCase

from tests.support import ROOT, slow

FIND_PLUGIN = """
import sys
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
import webchat.web
makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
print(makers["webchat"].module)
print(webchat.web.__file__)
print(webchat.web.default_web_root())
"""


def run_python(code: str, path: list[str] | None = None) -> list[str]:
    """Run ``code`` in a fresh interpreter, optionally on exactly ``path``."""
    if path is None:
        argv = [sys.executable, "-c", code]
    else:
        # -S: no site-packages processing, so no editable-install .pth sneaks in.
        prelude = f"import sys; sys.path[:0] = {path!r}\n"
        argv = [sys.executable, "-S", "-c", prelude + code]
    out = subprocess.run(argv, capture_output=True, text=True, cwd="/", check=False)
    if out.returncode:
        raise AssertionError(out.stderr)
    return out.stdout.splitlines()


#: What the console script ``twistd`` runs (Twisted's entry point), as a
#: ``-c`` program for a venv that has no scripts of its own.
TWISTD = (
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
)


def runtime_closure(requirements: list[str]) -> list[str]:
    """
    The distributions ``requirements`` pull in, recursively, as this
    environment has them: what ``pip install webchat.whl`` would install.
    """
    found: dict[str, set[str]] = {}
    pending = [(Requirement(r), "") for r in requirements]
    while pending:
        requirement, extra = pending.pop()
        marker = requirement.marker
        if marker is not None and not marker.evaluate({"extra": extra}):
            continue
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            raise AssertionError(f"{requirement.name} is not installed here") from None
        key = dist.metadata["Name"].lower()
        wanted = found.get(key, set()) | {""} | set(requirement.extras)
        if found.get(key) == wanted:
            continue
        found[key] = wanted
        for line in dist.requires or []:
            for name in wanted:
                pending.append((Requirement(line), name))
    return sorted(found)


def link_distributions(names: list[str], into: Path) -> None:
    """Symlink each distribution's top-level files and folders into ``into``."""
    for name in names:
        dist = distribution(name)
        if dist.files is None:
            raise AssertionError(f"{name} has no RECORD: cannot tell its files")
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "")}:
            if not (into / top).exists() and (site / top).exists():
                (into / top).symlink_to(site / top)


@slow
class WheelTests(SynchronousTestCase):
    def setUp(self):
        self.out = Path(self.mktemp()).resolve()
        self.out.mkdir(parents=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(self.out),
                str(ROOT),
            ],
            check=True,
            capture_output=True,
        )
        (self.wheel,) = self.out.glob("webchat-*.whl")

    def test_wheel_ships_dropin_and_page_but_no_twisted_package_files(self):
        names = set(zipfile.ZipFile(self.wheel).namelist())
        for required in (
            "twisted/plugins/webchat_plugin.py",
            "webchat/tap.py",
            "webchat/web/index.html",
            "webchat/web/webchat.js",
            "webchat/web/webchat.css",
        ):
            self.assertIn(required, names)
        for forbidden in ("twisted/__init__.py", "twisted/plugins/__init__.py"):
            self.assertNotIn(forbidden, names)
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])

    def test_wheel_ships_no_benchmark_code(self):
        archive = zipfile.ZipFile(self.wheel)
        names = archive.namelist()
        self.assertFalse(
            [n for n in names if {"bench", "benchmarks"} & set(n.split("/"))], names
        )
        self.assertFalse([n for n in names if "loadgen" in n], names)
        for name in names:
            if name.endswith(".dist-info/entry_points.txt"):
                self.assertNotIn(b"bench", archive.read(name))  # no webchat-bench

    def test_twistd_webchat_help_with_only_the_runtime_dependencies(self):
        """
        A venv holding the wheel and what its Requires-Dist pulls in (linked
        from this environment, so no network), and nothing else: no test
        extras, no checkout on the path, no compiler on PATH.
        """
        archive = zipfile.ZipFile(self.wheel)
        (metadata,) = [
            n for n in archive.namelist() if n.endswith(".dist-info/METADATA")
        ]
        requires = (
            Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist")
        )
        closure = runtime_closure(requires)
        self.assertIn("twisted", closure)
        self.assertFalse({"pytest", "websockets", "hypothesis"} & set(closure))

        venv = self.out / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            check=True,
            capture_output=True,
        )
        python = str(venv / "bin" / "python")
        wheel_site, deps = self.out / "wheel-site", self.out / "deps"
        deps.mkdir()
        link_distributions(closure, deps)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-index", "--target", str(wheel_site), str(self.wheel)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        (site,) = (venv / "lib").glob("python*/site-packages")
        (site / "webchat-test.pth").write_text(f"{wheel_site}\n{deps}\n")
        env = {"PATH": str(venv / "bin"), "CC": "/nonexistent/gcc", "HOME": "/"}

        def run(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [python, *argv], capture_output=True, text=True, cwd="/", env=env,
                timeout=60, check=False,
            )  # fmt: skip

        helped = run("-c", TWISTD, "webchat", "--help")
        self.assertEqual(helped.returncode, 0, helped.stderr)
        self.assertIn("webchat [options]", helped.stdout)
        self.assertIn("--max-connections", helped.stdout)
        # Really nothing else: the test extras and the benchmarks are absent.
        for absent in ("pytest", "websockets", "benchmarks", "tests"):
            missing = run("-c", f"import {absent}")
            self.assertIn("ModuleNotFoundError", missing.stderr, absent)

    def test_installed_wheel_finds_plugin_and_page(self):
        target = self.out / "site"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(target),
                str(self.wheel),
            ],
            check=True,
            capture_output=True,
        )
        deps = sysconfig.get_paths()["purelib"]
        module, web_module, web_root = run_python(FIND_PLUGIN, [str(target), deps])
        self.assertEqual(module, "webchat.tap")
        self.assertTrue(web_module.startswith(str(target)), web_module)
        self.assertTrue(web_root.startswith(str(target)), web_root)
        self.assertTrue((Path(web_root) / "index.html").is_file())


@slow
class InstalledEnvironmentTests(SynchronousTestCase):
    def test_this_environment_finds_plugin_and_page(self):
        # `make test` runs on an editable install: this is that mode's proof.
        module, _, web_root = run_python(FIND_PLUGIN)
        self.assertEqual(module, "webchat.tap")
        self.assertTrue((Path(web_root) / "index.html").is_file())
