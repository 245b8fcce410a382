"""The plugin and the page are found after `pip install .` and `pip install -e .`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

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
